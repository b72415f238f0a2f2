"""Helpers shared by the benchmark scripts (not a test module, not part of the vlp package)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHARED_MEDIA = ROOT.parent / "shared" / "media" / "llamafactory_mllm_demo"
# generated inputs (reused between runs) and scratch outputs: under the vlp cache ($VLP_CACHE, default
# ~/.cache/vlp), outside the repo so that `make clean` (rm -rf runs) or a test run cannot pull them away
# mid-benchmark
WORK = Path(os.environ.get("VLP_CACHE", Path.home() / ".cache" / "vlp")) / "bench"


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for mod in ("numpy", "torch", "decord", "av", "ray", "webdataset", "transformers", "pyarrow", "vlp"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
            if mod == "vlp":
                out["vlp_path"] = str(Path(m.__file__).parent)  # which checkout (PYTHONPATH can point elsewhere)
        except Exception as e:  # a missing optional package is recorded, not fatal
            out[mod] = f"unavailable ({type(e).__name__})"
    return out


def machine() -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return {"host": platform.node(), "os": platform.platform(), "cpu_model": cpu, "logical_cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)), "gpu": gpu,
            "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def write_json(name: str, quick: bool, payload: dict) -> Path:
    """bench/results/<name>.json (or <name>.quick.json for --quick, so sanity checks never overwrite
    the numbers that docs/benchmarks.md quotes)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}{'.quick' if quick else ''}.json"
    payload = {"benchmark": name, "quick": quick, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
               "versions": versions(), **payload}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def spread(xs: list[float]) -> dict:
    """min / median / max of a list of per-round ratios (how noisy the machine was)."""
    if not xs:
        return {}
    return {"min": round(min(xs), 3), "median": round(statistics.median(xs), 3), "max": round(max(xs), 3),
            "n": len(xs)}


# ---------------------------------------------------------------------------------------------- CPU accounting

class CpuAccount:
    """Where the machine's CPU time went while a block of code ran: every process, from /proc.

    Polls /proc every ``period`` s from a thread (so processes that exit mid-run still count up to
    their last sample) and classifies processes as this process ("driver"), its descendants (Ray's
    workers and daemons when this process started Ray, by the names they carried) or "other" (anything
    else on the machine: a noisy neighbour shows up here). Linux only; returns {} elsewhere.
    """

    def __init__(self, period: float = 0.5):
        import threading

        self.period = period
        self.hz = os.sysconf("SC_CLK_TCK")
        self.me = os.getpid()
        self.first = self._snap()
        self.last = dict(self.first)
        self.names: dict = {k: {v[2]} for k, v in self.first.items()}
        self._stop = threading.Event()
        self.t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _snap(self) -> dict:
        out = {}
        try:
            pids = [p for p in os.listdir("/proc") if p.isdigit()]
        except OSError:
            return out
        for p in pids:
            try:
                with open(f"/proc/{p}/stat") as f:
                    st = f.read()
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    cmd = [c.decode(errors="replace") for c in f.read().split(b"\0")]
            except OSError:
                continue
            comm = st[st.index("(") + 1: st.rindex(")")]
            r = st[st.rindex(")") + 2:].split()
            name = cmd[0] if cmd and cmd[0] else comm
            if name.startswith("ray::"):
                name = name.split()[0]
            elif len(cmd) > 1 and cmd[0].endswith(("python", "python3")) and cmd[1:]:
                name = "python " + Path(cmd[1]).name
            else:
                name = Path(name).name
            out[(int(p), int(r[19]))] = (int(r[1]), (int(r[11]) + int(r[12])) / self.hz, name)
        return out

    def _run(self):
        while not self._stop.wait(self.period):
            self._merge(self._snap())

    def _merge(self, snap):
        for k, v in snap.items():
            self.last[k] = v
            self.names.setdefault(k, set()).add(v[2])

    @staticmethod
    def _category(names: set, driver_names: set) -> str:
        """A descendant's role by the names it carried; one named as the driver is a fork of it (vlp's local
        executor's decode processes)."""
        if names <= driver_names:
            return "forked_children"
        s = " ".join(sorted(names))
        if "EncodeFeatures" in s:
            return "encoder_actor"
        if any(x in s for x in ("DecodeFrames", "ReadShard", "WriteParts", "ray::IDLE", "_map_task", "FlatMap",
                                "MapBatches")) and "MapWorker" not in s:
            return "ray_task_workers"
        return "ray_system"

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self._merge(self._snap())
        wall = time.perf_counter() - self.t0
        ppid = {k[0]: v[0] for k, v in self.last.items()}

        def mine(pid: int) -> bool:
            for _ in range(64):
                if pid == self.me:
                    return True
                if pid not in ppid or pid <= 1:
                    return False
                pid = ppid[pid]
            return False

        mine_names = set().union(*(n for k, n in self.names.items() if k[0] == self.me))
        cats: dict[str, float] = {}
        procs: dict[str, int] = {}
        started: dict[str, int] = {}
        for k, (_, cpu, _) in self.last.items():
            d = cpu - self.first.get(k, (0, 0.0, ""))[1]
            if d <= 0:
                continue
            c = "driver" if k[0] == self.me else (self._category(self.names[k], mine_names) if mine(k[0])
                                                  else "other_processes")
            cats[c] = cats.get(c, 0.0) + d
            procs[c] = procs.get(c, 0) + 1
            if k not in self.first:
                started[c] = started.get(c, 0) + 1
        ncpu = os.cpu_count() or 1  # the whole machine, also when this process is pinned
        used = sum(cats.values())
        return {"wall_s": round(wall, 2), "cpu_s_available": round(wall * ncpu, 1),
                "cpu_s": {k: round(v, 1) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
                "idle_s": round(max(0.0, wall * ncpu - used), 1),
                "processes_busy": procs, "processes_started_during": started}


def cpu_idle_share(window: float = 5.0) -> float:
    """Share of the machine's CPU time that was idle over the next ``window`` seconds (/proc/stat)."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)  # idle + iowait, total

    i0, t0 = read()
    time.sleep(window)
    i1, t1 = read()
    return (i1 - i0) / max(1, t1 - t0)


def wait_quiet(max_wait: float, idle: float = 0.9, window: float = 5.0, log=print) -> dict:
    """Wait (at most ``max_wait`` s) until the machine has been at least ``idle`` idle for ``window`` s.
    For shared machines; returns what it saw so that the results can say so."""
    t0 = time.perf_counter()
    share = cpu_idle_share(window)
    told = False
    while share < idle and time.perf_counter() - t0 < max_wait:
        if not told:
            log(f"  waiting for a quiet machine (idle {share:.0%} < {idle:.0%}, at most {max_wait:.0f}s)")
            told = True
        share = cpu_idle_share(window)
    return {"waited_s": round(time.perf_counter() - t0, 1), "idle_share": round(share, 3), "quiet": share >= idle}
