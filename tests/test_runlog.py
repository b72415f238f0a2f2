"""Where Ray's output goes (vlp.runlog): real commands in a subprocess (a local Ray, Ray Data, Ray Train with
DeepSpeed) print vlp's lines and warnings on the terminal, and everything Ray and the workers print into the run
folder's logs/ray.log; a training's worker failure is one line on the terminal. Plus the log itself without Ray:
nothing when Ray never printed, nested commands, an S3 run folder, the driver's loggers gated."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, make_bucket
from vlp.runlog import LOG_FILE, VERBOSE_ENV, gate_ray_loggers, one_line, ray_output, to_logs
from vlp.storage import StorageConfig, read_appended

WORKER_LINE = re.compile(r"^(\x1b\[\d+m)?\(\S.* pid=\d+\)", re.M)  # a worker's line, as Ray prefixes it (colour)
TRAIN = ["train", "--config", str(ROOT / "configs/local/train_stage1.yaml"), "batch.global_size=2",
         "batch.micro_size=1", "scaling.num_workers=1", "max_steps=3", "checkpoint.every_n_steps=1"]


def vlp(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    """``vlp ARGS`` in a fresh process, as a user runs it (stdout and stderr apart; ``env``: more variables)."""
    env = {**{k: v for k, v in os.environ.items() if k != VERBOSE_ENV}, "PYTHONPATH": str(ROOT / "platform"), **env}
    return subprocess.run([sys.executable, "-m", "vlp.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def terminal_is_quiet(p: subprocess.CompletedProcess) -> None:
    """stdout holds vlp's lines only (a ``[vlp]`` line, or the indented continuation of one: the memory
    preflight's report); neither stream has Ray's INFO logs, its banner or a worker's line."""
    lines = p.stdout.splitlines()
    assert lines and lines[0].startswith("[vlp] "), p.stdout
    assert all(line.startswith(("[vlp] ", "  ")) for line in lines), p.stdout
    both = p.stdout + p.stderr
    assert "Started a local Ray instance" not in both and " INFO " not in both, both
    assert not WORKER_LINE.search(both) and "pid=" not in both, both


@pytest.fixture(scope="module")
def precomputed(synth_shards, tmp_path_factory):
    """``vlp precompute`` of the synthetic webvid + cc3m shards on Ray (the executor a cluster uses; on one machine
    ``auto`` picks the local one, which starts no Ray): (the finished process, the feature set)."""
    out = tmp_path_factory.mktemp("runlog") / "features"
    p = vlp(["precompute", "--config", str(ROOT / "configs/local/precompute.yaml"), "executor=ray",
             f"data.shards=[{synth_shards}/webvid-*.tar,{synth_shards}/cc3m-*.tar]", f"output.uri={out}"], out.parent)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p, out


@pytest.mark.slow
@pytest.mark.ray
def test_precompute_prints_vlp_lines_and_logs_ray_in_the_feature_set(precomputed):
    p, out = precomputed
    terminal_is_quiet(p)
    log = out / LOG_FILE
    assert p.stdout.splitlines()[-1] == f"[vlp] full log: {log}"
    text = log.read_text()
    assert "INFO worker.py" in text and "Started a local Ray instance" in text  # the driver's Ray logs
    assert "Starting execution of Dataset" in text  # Ray Data's
    assert WORKER_LINE.search(text)  # the encoder actors' output
    assert "[vlp] done: 18 ok" in text  # and the command's own lines, in order with Ray's


@pytest.mark.slow
@pytest.mark.ray
def test_verbose_puts_rays_output_on_the_terminal_too(synth_shards, tmp_path):
    out = tmp_path / "features"
    p = vlp(["precompute", "--config", str(ROOT / "configs/local/precompute.yaml"), "executor=ray",
             f"data.shards=[{synth_shards}/cc3m-*.tar]", f"output.uri={out}"], tmp_path, **{VERBOSE_ENV: "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Started a local Ray instance" in p.stderr and WORKER_LINE.search(p.stdout + p.stderr)
    assert "Started a local Ray instance" in (out / LOG_FILE).read_text()  # the log has it all the same


def train_failing(precomputed, tmp_path, name: str, fail_at_step: int, max_failures: int, rc: int):
    """`vlp train` run ``name`` with a failure injected at ``fail_at_step``: its exit code is ``rc``, the terminal
    stays quiet and shows no traceback."""
    _, features = precomputed
    p = vlp([*TRAIN, f"output_dir={tmp_path}", f"run_name={name}", f"data.sets=[{{uri: {features}}}]",
             f"debug.fail_at_step={fail_at_step}", f"max_failures={max_failures}"], tmp_path)
    assert p.returncode == rc, p.stdout[-3000:] + p.stderr[-3000:]
    terminal_is_quiet(p)
    assert "Traceback" not in p.stdout + p.stderr
    return p


@pytest.mark.slow
@pytest.mark.ray
def test_a_worker_failure_and_restart_is_one_line_and_each_step_prints_once(precomputed, tmp_path):
    p = train_failing(precomputed, tmp_path, "restart", fail_at_step=2, max_failures=1, rc=0)
    lines = p.stdout.splitlines()
    assert "[vlp] train restart: a worker failed (rank 0: RuntimeError: injected failure at step 2 on rank 0); " \
           "restarting the workers from the last checkpoint (failure 1 of at most 1)" in lines
    steps = [ln.split(" loss")[0] for ln in lines if ln.startswith("[vlp] step ")]
    assert steps == ["[vlp] step 1/3", "[vlp] step 2/3", "[vlp] step 2/3", "[vlp] step 3/3"]  # step 2 redone
    text = (tmp_path / "restart" / LOG_FILE).read_text()
    assert re.search(r"^\(RayTrainWorker pid=\d+\) Traceback", text, re.M)  # the worker's traceback
    assert re.search(r"^\(RayTrainWorker pid=\d+\) Reporting training result", text, re.M)  # Ray Train's INFO


@pytest.mark.slow
@pytest.mark.ray
def test_a_failed_training_says_why_in_one_line(precomputed, tmp_path):
    p = train_failing(precomputed, tmp_path, "dies", fail_at_step=1, max_failures=0, rc=1)
    log = tmp_path / "dies" / LOG_FILE
    assert p.stderr.strip().splitlines()[-1] == ("vlp train: error: training dies failed: rank 0: RuntimeError: "
                                                 f"injected failure at step 1 on rank 0 (tracebacks: {log})")
    assert p.stdout.splitlines()[-1] == f"[vlp] full log: {log}"
    text = log.read_text()
    assert "Traceback" in text and "RuntimeError: injected failure at step 1 on rank 0" in text


def test_a_command_ray_never_printed_for_leaves_no_log(tmp_path):
    said = []
    with ray_output(str(tmp_path / "run"), log=said.append) as log:
        log("[vlp] checking the inputs")
    assert said == ["[vlp] checking the inputs"] and not (tmp_path / "run").exists()


def test_nested_commands_each_log_their_part_and_the_outer_says_where(tmp_path):
    said = []
    with ray_output(str(tmp_path / "demo"), log=said.append) as log:
        log("[vlp] step 1")
        with ray_output(str(tmp_path / "demo" / "train"), log=log) as inner:
            inner("[vlp] train: starting")
            to_logs("(RayTrainWorker pid=1) hello")
        to_logs("after")
    assert said == ["[vlp] step 1", "[vlp] train: starting", f"[vlp] full log: {tmp_path}/demo/{LOG_FILE}"]
    assert (tmp_path / "demo" / LOG_FILE).read_text() == \
        "[vlp] step 1\n[vlp] train: starting\n(RayTrainWorker pid=1) hello\nafter\n"
    assert (tmp_path / "demo" / "train" / LOG_FILE).read_text() == \
        "[vlp] train: starting\n(RayTrainWorker pid=1) hello\n"


def test_a_run_folder_on_s3_gets_its_log_as_parts(s3_server):
    make_bucket(s3_server, "runlog")
    st = StorageConfig(endpoint_url=s3_server)
    with ray_output("s3://runlog/runs/s1", storage=st, log=lambda _: None) as log:
        log("[vlp] train s1")
        to_logs("(RayTrainWorker pid=1) step")
    assert read_appended(f"s3://runlog/runs/s1/{LOG_FILE}", st) == "[vlp] train s1\n(RayTrainWorker pid=1) step\n"


def test_rays_driver_logs_go_to_the_log_and_its_warnings_to_the_terminal_too(tmp_path):
    """Ray's console handlers write to a buffer here: they hold the stderr of when Ray configured its loggers, which
    in a suite worker is an earlier test's captured stream, out of reach of capsys and capfd."""
    import io

    gate_ray_loggers()
    handlers = {id(h): h for name in ("ray", "ray.data") for h in logging.getLogger(name).handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)}
    handlers = list(handlers.values())  # once each: a handler on both loggers (in a suite, pytest's own report
    assert handlers                     # handler can be) would otherwise get its stream back as None
    terminal = io.StringIO()
    before = [h.setStream(terminal) for h in handlers]
    try:
        ray_log = logging.getLogger("ray.data._internal.test")
        with ray_output(str(tmp_path), log=lambda _: None):
            ray_log.info("an execution plan")
            ray_log.warning("a warning you need")
            ray_log.warning("Progress bars disabled. To enable, ...")
        err = terminal.getvalue()
        assert "a warning you need" in err and "an execution plan" not in err and "Progress bars" not in err
        text = (tmp_path / LOG_FILE).read_text()
        assert "INFO" in text and "an execution plan" in text and "a warning you need" in text
        ray_log.info("no command running")  # outside a command Ray's console handler prints as it did
        assert "no command running" in terminal.getvalue()
    finally:
        for h, stream in zip(handlers, before):
            h.setStream(stream)


def test_the_workers_stream_shows_vlp_lines_and_memory_kills_and_logs_the_rest(tmp_path, capsys):
    """WorkerPrinter on records as Ray's log thread hands them over; ``printed`` stands for Ray's printer."""
    from vlp.runlog import WorkerPrinter

    printed: list[dict] = []
    route = WorkerPrinter(printed.append)
    train = {"pid": 7, "actor_name": "RayTrainWorker", "ip": "10.0.0.1", "localhost": "10.0.0.1", "is_err": False,
             "lines": ["Reporting training result 1", "[vlp] step 1/3 loss 6.2"]}
    raylet = {"pid": "raylet", "ip": "10.0.0.1", "localhost": "10.0.0.1", "is_err": True,
              "lines": ["Task ServeController.graceful_shutdown failed", "Ray killed this worker: memory 0.96 > 0.95"]}
    with ray_output(str(tmp_path), log=lambda _: None):
        route(train)
        route(raylet)
    assert capsys.readouterr().out == "[vlp] step 1/3 loss 6.2\n"  # bare, once
    assert printed == [{**raylet, "lines": ["Ray killed this worker: memory 0.96 > 0.95"]}]
    assert (tmp_path / LOG_FILE).read_text().splitlines() == [
        "(RayTrainWorker pid=7) Reporting training result 1", "(RayTrainWorker pid=7) [vlp] step 1/3 loss 6.2",
        "(raylet) Task ServeController.graceful_shutdown failed", "(raylet) Ray killed this worker: memory 0.96 > 0.95"]
    route(train)  # no command running: Ray's printer, as before
    with ray_output(str(tmp_path / "v"), ray_verbose=True, log=lambda _: None):
        route(train)  # verbose: Ray's printer too
    assert printed[1:] == [train, train] and capsys.readouterr().out == ""


def test_the_raylets_messages_to_the_driver_go_to_the_log_and_only_memory_kills_to_the_terminal(tmp_path, capsys):
    """Ray's error thread prints the raylet's messages with ray._private.worker.print_to_stdstream, not through the
    workers' stream: route_worker_output routes that function as well (the worker-pool warning reached the
    terminal at every LEGO training's start before)."""
    import ray._private.worker as ray_worker

    from vlp.runlog import route_worker_output

    route_worker_output()
    route_worker_output()  # idempotent: wrapped once
    pool = ("WARNING: 8 PYTHON worker processes have been started on node: abc with address: 192.0.2.2, which is "
            "4x the maximum expected startup concurrency (2).")
    killed = "Ray killed this worker (ID: 1) because the node's memory usage 0.96 > 0.95"

    def say(line: str) -> None:  # exactly as listen_error_messages calls it
        ray_worker.print_to_stdstream({"lines": [line], "pid": "raylet", "is_err": False}, ignore_prefix=False)

    with ray_output(str(tmp_path), log=lambda _: None):
        say(pool)
        say(killed)
    out = capsys.readouterr().out
    assert "PYTHON worker" not in out and "memory usage 0.96" in out
    assert (tmp_path / LOG_FILE).read_text().splitlines() == [f"(raylet) {pool}", f"(raylet) {killed}"]
    say(pool)  # no command running: Ray's printer, as before
    assert "PYTHON worker processes" in capsys.readouterr().out


def test_a_log_that_cannot_be_written_warns_once_and_the_terminal_gets_everything(tmp_path, capsys):
    from vlp.runlog import WorkerPrinter

    (tmp_path / "notes.txt").write_text("a file, not a folder")
    printed: list[dict] = []
    line = {"pid": 7, "actor_name": "RayTrainWorker", "ip": "h", "localhost": "h", "is_err": False,
            "lines": ["Reporting training result 1"]}
    said: list[str] = []
    with ray_output(str(tmp_path / "notes.txt" / "run"), log=said.append) as log:
        log("[vlp] train s1: starting")
        to_logs("2026-12-03 INFO worker.py -- Started a local Ray instance.")  # the log cannot be made
        WorkerPrinter(printed.append)(line)  # so the terminal gets Ray's output
        to_logs("another")
    err = capsys.readouterr().err
    assert err.count("[vlp] warning: cannot write ") == 1 and f"{tmp_path}/notes.txt/run/{LOG_FILE}" in err
    assert printed == [line] and said == ["[vlp] train s1: starting"]  # and no "full log" line


def test_one_line_takes_a_tracebacks_last_line():
    assert one_line(RuntimeError("boom")) == "RuntimeError: boom"
    tb = "Traceback (most recent call last):\n  File x\nValueError: bad shape\n"
    assert one_line(RuntimeError(tb)) == "ValueError: bad shape"
    assert one_line(KeyError()) == "KeyError"


def test_ray_trains_teardown_chatter_after_a_command_ended_is_dropped(tmp_path, monkeypatch):
    """A finished run's Ray Train actors may still print once its log has closed ("Failed to query Ray Train
    Controller actor state"): not on the terminal; other workers' lines still are (Ray's printer), as is
    everything under VLP_VERBOSE."""
    from vlp.runlog import WorkerPrinter

    printed: list[dict] = []
    route = WorkerPrinter(printed.append)
    with ray_output(str(tmp_path), log=lambda _: None):
        pass
    late = {"pid": 9, "actor_name": "PlacementGroupCleaner", "ip": "h", "localhost": "h", "is_err": False,
            "lines": ["Failed to query Ray Train Controller actor state."]}
    user = {**late, "actor_name": "MyActor", "lines": ["a user's actor"]}
    route(late)
    route(user)
    assert printed == [user]
    monkeypatch.setenv(VERBOSE_ENV, "1")
    route(late)
    assert printed == [user, late]
