"""Where a command's Ray output goes: the terminal gets vlp's own ``[vlp]`` lines, Ray Data's progress bars and the
warnings and errors a user must see; the rest of what Ray prints goes to the run folder's ``logs/ray.log``.

The rest is: the driver's ``ray`` / ``ray.data`` / ``ray.train`` / ``ray.serve`` INFO logs (the "Started a local Ray
instance" banner, Ray Data's execution plans, and outside a terminal Ray Data's logged progress), and every line the
workers print, which Ray streams to the driver with ``(RayTrainWorker pid=...)`` prefixes (Ray Train's reports,
DeepSpeed's INFO lines, transformers' loading bars, tracebacks of failed workers). ``vlp demo stage2.epochs=5``
printed 695 lines before this, each training step's line twice; now 137, 125 of them vlp's.

Why not ``ray.init(log_to_driver=False)``: the training workers' ``[vlp] step ...`` lines travel on the same
stream, and the log file should hold every worker's output (on a cluster it is otherwise spread over the nodes'
``/tmp/ray``). So the stream still comes to the driver and :func:`route_worker_output` puts :class:`WorkerPrinter`
in the place of Ray's printer (``global_worker_stdstream_dispatcher``, the hook Ray's own client server uses). On
the driver, Ray's console handlers get a :class:`ConsoleGate` filter, which writes each record to the log and lets
WARNING and above through (less :data:`QUIET_WARNINGS`).

Each command that starts Ray runs inside :func:`ray_output` with its run folder; nested ones (``vlp demo`` runs
precompute and train) write to every open log, so the demo's ``logs/ray.log`` holds everything and each training's
its own part. The log file is made when Ray first prints (a command that fails before Ray starts leaves none) and is
appended to like metrics.jsonl (:class:`vlp.storage.Appender`: on an object store, buffered parts). ``ray.verbose:
true`` or ``VLP_VERBOSE=1`` put everything on the terminal as well (Ray's own output, as before vlp filtered it).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from .storage import Appender, StorageConfig, join

LOG_FILE = "logs/ray.log"  # in the run folder
VERBOSE_ENV = "VLP_VERBOSE"
# Ray warnings that are not the user's concern: to the log only.
QUIET_WARNINGS = (
    "Token authentication is enabled for this Ray cluster",  # every local start of Ray 2.60
    "Progress bars disabled",  # the user turned them off (ray.progress_bars=false)
)
RAY_FORMAT = logging.Formatter("%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s")


def env_verbose() -> bool:
    """``VLP_VERBOSE`` set to 1 / true / yes."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


class RunLog:
    """One command's ``logs/ray.log``: Ray's lines, and the command's own lines once Ray has printed (before that
    they wait in memory, and are dropped when Ray never prints). Thread-safe: Ray's log thread writes too. A log
    that cannot be written (a full disk, the object store gone) stops neither Ray's output nor the command: one
    warning, and from then on the terminal gets everything (as verbose)."""

    def __init__(self, folder: str, storage: Optional[StorageConfig], verbose: bool):
        self.uri, self.storage, self.verbose = join(folder, LOG_FILE), storage, verbose
        self.appender: Optional[Appender] = None
        self.pending: list[str] = []
        self.broken = False
        self.lock = threading.Lock()

    def own_line(self, text: str) -> None:
        with self.lock:
            if self.appender is None:
                self.pending.append(text)
            else:
                self.guarded(self.appender.write, text + "\n")

    def ray_line(self, text: str) -> None:
        with self.lock:
            if self.appender is None and not self.broken:
                self.appender = self.guarded(Appender, self.uri, self.storage)
                if self.appender is not None:
                    self.guarded(self.appender.write, "".join(p + "\n" for p in self.pending))
                self.pending = []
            if self.appender is not None:
                self.guarded(self.appender.write, text + "\n")

    def guarded(self, fn: Callable, *args):
        """``fn(*args)``; when it fails, the warning and the switch to the terminal (once)."""
        if self.broken:
            return None
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001  (whatever the store raised: the command goes on)
            self.broken, self.verbose = True, True
            print(f"[vlp] warning: cannot write {self.uri} ({one_line(e)}); Ray's output goes to the terminal "
                  "instead", file=sys.stderr, flush=True)
            return None

    def close(self) -> bool:
        """Flush (an object store gets the last part); True when the log was written whole."""
        with self.lock:
            if self.appender is None:
                return False
            self.guarded(self.appender.close)
            return not self.broken


OPEN: list[RunLog] = []  # the logs of the commands running in this process, outermost first
ENDED = [False]  # whether a command has ended in this process (set once, never reset)
# Ray Train's own actors, which may still print while a finished run's workers are torn down (after its log closed)
TEARDOWN_ACTORS = ("PlacementGroupCleaner", "TrainController", "PreemptionWatcher", "SynchronizationActor")


def to_logs(text: str) -> None:
    """A line of Ray's into every open log."""
    for run in list(OPEN):
        run.ray_line(text)


def verbose() -> bool:
    """Whether the terminal gets everything (a running command asked for it)."""
    return any(run.verbose for run in OPEN)


@contextmanager
def ray_output(folder: str, ray_verbose: bool = False, storage: Optional[StorageConfig] = None,
               log: Callable = print) -> Iterator[Callable]:
    """Run a command's Ray work with its output routed as the module doc says; ``folder`` is the run folder (local
    or an object store), ``ray_verbose`` its ``ray.verbose``. Yields the command's ``log``, which also writes into
    the log file. At the end the outermost command says where the log is."""
    run = RunLog(folder, storage, ray_verbose or env_verbose())
    OPEN.append(run)

    def tee(text) -> None:
        log(text)
        run.own_line(str(text))

    try:
        yield tee
    finally:
        OPEN.remove(run)
        ENDED[0] = True
        if run.close() and not OPEN:
            log(f"[vlp] full log: {run.uri}")


class ConsoleGate(logging.Filter):
    """On a console handler of Ray's: the record goes to the open logs, and to the terminal when it is a warning or
    an error (or the command is verbose). Without an open log it changes nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not OPEN:
            return True
        text = RAY_FORMAT.format(record)
        to_logs(text)
        return verbose() or (record.levelno >= logging.WARNING and not any(q in text for q in QUIET_WARNINGS))


GATE = ConsoleGate()


def gate_ray_loggers() -> None:
    """Put :data:`GATE` on every console handler of Ray's loggers (``ray``, and ``ray.*`` ones with handlers of
    their own: ``ray.data``, ``ray.serve``). Idempotent; call again after a library configures its loggers."""
    import importlib

    importlib.import_module("ray.data")  # configures the "ray" and "ray.data" loggers on import

    names = ["ray", *sorted(n for n in logging.root.manager.loggerDict if n.startswith("ray."))]
    for name in names:
        logger = logging.getLogger(name)
        for h in logger.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) \
                    and GATE not in h.filters:
                h.addFilter(GATE)


def worker_prefix(data: dict) -> str:
    """Ray's prefix of a worker's lines: ``(RayTrainWorker pid=123)``, ``(raylet)``, with ``ip=`` off this node."""
    pid, who, ip = data.get("pid"), data.get("actor_name") or data.get("task_name"), data.get("ip")
    where = "" if ip == data.get("localhost") else f", ip={ip}"
    if who:
        return f"({who} pid={pid}{where})"
    return f"({pid}{where})" if pid == "raylet" else f"(pid={pid}{where})"


class WorkerPrinter:
    """Ray's stream of worker output, routed: every line to the open logs; to the terminal the workers' ``[vlp]``
    lines (bare), Ray's distributed progress bars (``tqdm_ray``), the raylet's lines about memory (a worker killed
    for it) and the autoscaler's events (nodes added), through Ray's own printer (which shows the autoscaler's
    events only, not its status reports). Without an open log, or verbose: Ray's printer gets everything."""

    def __init__(self, ray_printer: Callable):
        self.ray_printer = ray_printer

    def __call__(self, data: dict) -> None:
        from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC, safe_print  # safe_print: the bars stay whole

        lines = data.get("lines") or []
        if late_teardown(data):
            return
        if OPEN and data.get("pid") != "autoscaler":  # its status every few seconds: Ray's monitor.log has it
            prefix = worker_prefix(data)
            for line in lines:
                if RAY_TQDM_MAGIC not in line:
                    to_logs(f"{prefix} {line}")
        if not OPEN or verbose() or data.get("pid") == "autoscaler":
            self.ray_printer(data)
            return
        if data.get("pid") == "raylet":  # a worker killed for memory, not the tasks Serve's shutdown retries
            said = [ln for ln in lines if "memory" in ln.lower()]
            if said:
                self.ray_printer({**data, "lines": said})
            return
        bars = [ln for ln in lines if RAY_TQDM_MAGIC in ln]
        if bars:
            self.ray_printer({**data, "lines": bars})
        sink = sys.stderr if data.get("is_err") else sys.stdout
        for line in lines:
            if line.startswith("[vlp]"):
                safe_print(line, file=sink, flush=True)


def late_teardown(data: dict) -> bool:
    """A line of Ray Train's own actors that arrives after the command's log closed (the finished run's teardown,
    e.g. "Failed to query Ray Train Controller actor state"): neither the terminal's nor any log's."""
    return (not OPEN and ENDED[0] and not env_verbose()
            and str(data.get("actor_name") or "").startswith(TEARDOWN_ACTORS))


def route_worker_output() -> None:
    """After ``ray.init(log_to_driver=True)``: :class:`WorkerPrinter` in the place of Ray's printer (it keeps Ray's
    printer for what the terminal still gets). Idempotent; nothing to do when the workers' output does not come to
    this driver. The raylet's messages to the driver ("N PYTHON worker processes have been started ...", a worker
    killed for memory) do not come through that stream: Ray's error thread prints them with
    ``ray._private.worker.print_to_stdstream`` directly, so that is routed too (:class:`RayletPrinter`)."""
    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.handlers = [(name, WorkerPrinter(h) if name == "ray_print_logs" and not isinstance(h, WorkerPrinter)
                            else h) for name, h in dispatcher.handlers]
    if not isinstance(ray_worker.print_to_stdstream, RayletPrinter):
        ray_worker.print_to_stdstream = RayletPrinter(ray_worker.print_to_stdstream)


class RayletPrinter:
    """Ray's ``print_to_stdstream(data, ignore_prefix)`` as its error thread calls it: the record goes through
    :class:`WorkerPrinter` (to the open logs; to the terminal only a line about memory), with Ray's function as the
    printer for what the terminal gets."""

    def __init__(self, ray_print: Callable):
        self.ray_print = ray_print

    def __call__(self, data: dict, ignore_prefix: bool = False) -> None:
        WorkerPrinter(lambda d: self.ray_print(d, ignore_prefix=ignore_prefix))(data)


def one_line(exc: BaseException) -> str:
    """``Type: message`` of an exception on one line: the last line of its text when that already reads so (a
    traceback's last line), else its type and the text's first line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if lines and re.match(r"^[A-Za-z_][\w.]*(\([\w.]+\))?: ", lines[-1]):
        return lines[-1]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
