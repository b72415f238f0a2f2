"""Local autoscaling: a vlp precompute job on an autoscaling cluster made of real raylets on this machine.

cluster/fake-autoscale.yaml puts Ray's fake multi-node provider behind the autoscaler (v2, the default of
`ray up` since Ray 2.50): the head has no CPUs, like the cloud configs' heads, and each worker node the
autoscaler launches is a real raylet process. The test submits a precompute job whose encoder actors and decode
tasks need CPUs that only worker nodes have, and checks that (a) the job finishes, (b) the autoscaler added
worker nodes that did not exist before, (c) the idle workers are removed after the job.

The cluster is isolated from every other Ray on the machine (the session's `ray_local`, other users): its own
temp dir (so `ray_current_cluster` is not the machine-wide one), its own ports, token authentication with a
private token, and it is torn down by killing exactly the processes that carry its marker environment
variable, never with `ray stop` (which stops every Ray on the machine). The job and the status watcher run in
subprocesses, so the test process's own Ray stays untouched.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import ROOT, free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]

FAKE_HEAD_ID = "f" * 51 + "00000"   # the fake provider's fixed head instance id (node_provider.FAKE_HEAD_NODE_ID)
MARKER = "VLP_FAKE_CLUSTER_ID"

# Polls the autoscaler's view of the cluster once a second and appends it as JSON lines to a file.
WATCHER = r"""
import json, sys, time
import psutil
from ray.autoscaler.v2.sdk import get_cluster_status
addr, out, marker, token, head_id = sys.argv[1:6]
def raylets():
    n = 0
    for p in psutil.process_iter(["name"]):
        try:
            if p.info["name"] == "raylet" and p.environ().get(marker) == token:
                n += 1
        except (psutil.Error, OSError):
            pass
    return n
while True:
    rec = {"t": time.time()}
    try:
        st = get_cluster_status(addr, timeout=10)
        workers = [n for n in st.active_nodes + st.idle_nodes if n.instance_id != head_id]
        rec["workers"] = sorted(n.instance_id for n in workers)
        rec["types"] = sorted(n.ray_node_type_name for n in workers)
        rec["pending"] = len(st.pending_nodes) + sum(r.count for r in st.pending_launches)
        rec["cpus"] = st.total_resources().get("CPU", 0.0)
    except Exception as e:  # the head is still starting: record and retry
        rec["error"] = repr(e)[:300]
    rec["raylets"] = raylets()
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    time.sleep(1)
"""


class FakeCluster:
    """A head started with `ray start --head` on cluster/fake-autoscale.yaml, isolated and killable."""

    def __init__(self):
        import ray._private.services as services

        # short path: Ray's unix sockets live under the temp dir and their paths are limited to ~107 chars
        self.dir = Path(tempfile.mkdtemp(prefix="vlpas-", dir="/tmp"))
        port = free_port()
        self.address = f"{services.get_node_ip_address()}:{port}"
        cfg = yaml.safe_load((ROOT / "cluster" / "fake-autoscale.yaml").read_text())
        cfg["provider"]["gcs_address"] = self.address     # the fake provider's workers join this head
        self.config = cfg
        (self.dir / "autoscale.json").write_text(json.dumps(cfg))
        token = self.dir / "token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        # what every process of this cluster and every client of it needs
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                    MARKER: str(self.dir)}
        self.env.pop("RAY_ADDRESS", None)
        self.watch_log = self.dir / "status.jsonl"
        self.watcher = None

    def start(self) -> None:
        env = {**self.env, "RAY_FAKE_CLUSTER": "1", "RAY_enable_autoscaler_v2": "1",
               "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_ID, "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        ray_cli = str(Path(sys.executable).with_name("ray"))
        cmd = [ray_cli, "start", "--head", f"--port={self.address.rsplit(':', 1)[1]}", "--num-cpus=0",
               "--object-store-memory=100000000", f"--temp-dir={self.dir}", "--disable-usage-stats",
               f"--autoscaling-config={self.dir / 'autoscale.json'}",
               f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}"]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, start_new_session=True)
        assert p.returncode == 0, f"ray start failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        self.watcher = subprocess.Popen([sys.executable, "-c", WATCHER, self.address, str(self.watch_log),
                                         MARKER, str(self.dir), FAKE_HEAD_ID], env=self.env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)

    def records(self) -> list[dict]:
        if not self.watch_log.exists():
            return []
        recs = []
        for line in self.watch_log.read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except ValueError:  # a line being written right now
                pass
        return recs

    def wait_for(self, pred, timeout: float, what: str) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            recs = [r for r in self.records() if "workers" in r]
            if recs and pred(recs[-1]):
                return recs[-1]
            time.sleep(1)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last status records: "
                             f"{self.records()[-5:]}\nautoscaler log:\n{self.log_tail('monitor.log')}")

    def log_tail(self, name: str, n: int = 3000) -> str:
        p = self.dir / "session_latest" / "logs" / name
        return p.read_text(errors="replace")[-n:] if p.exists() else f"({name} missing)"

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster (head, fake worker nodes, their workers, the watcher)."""
        mine = []
        for p in psutil.process_iter():
            try:
                if p.pid != os.getpid() and p.environ().get(MARKER) == str(self.dir):
                    mine.append(p)
            except (psutil.Error, OSError):
                continue
        return mine

    def shutdown(self) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def fake_cluster():
    c = FakeCluster()
    try:
        c.start()
        yield c
    finally:
        c.shutdown()
    assert not c.processes(), "fake cluster processes survived the teardown"


def test_fake_autoscale_config_is_a_valid_cluster_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster" / "fake-autoscale.yaml").read_text())
    validate_config(prepare_config(cfg))
    head = cfg["available_node_types"][cfg["head_node_type"]]
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    assert head["resources"]["CPU"] == 0 and workers
    assert all(w["min_workers"] == 0 and 1 <= w["max_workers"] <= 2 for w in workers.values())  # small on a laptop
    assert 0 < cfg["idle_timeout_minutes"] <= 1


def test_precompute_job_scales_the_cluster_up_and_idle_nodes_go_away(fake_cluster, synth_shards, tiny_clip_path,
                                                                     tmp_path):
    c = fake_cluster
    before = c.wait_for(lambda r: True, 90, "the autoscaler to report the cluster")
    assert before["workers"] == [] and before["cpus"] == 0 and before["raylets"] == 1  # a head and nothing else

    out = tmp_path / "features"
    cfg = {
        "run_name": "autoscale",
        "data": {"shards": [str(synth_shards / "webvid-*.tar")], "sampling": {"mode": "uniform", "num_frames": 4},
                 "decode": {"backend": "auto", "device": "cpu"}, "decode_cpus": 0.5},
        # two encoder actors of 1 CPU each: more than the (CPU-less) cluster has when the job starts
        "encoder": {"tower": {"type": "clip", "path": tiny_clip_path, "layer": -2}, "batch_size": 4,
                    "concurrency": 2, "cpus_per_actor": 1},
        "output": {"uri": str(out), "mode": "valley_pooled"},
        "ray": {"address": "auto", "progress_bars": False},
    }
    cfg_path = tmp_path / "precompute.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    job = subprocess.run([sys.executable, str(ROOT / "jobs" / "precompute.py"), "--config", str(cfg_path)],
                         env={**c.env, "RAY_ADDRESS": c.address}, capture_output=True, text=True, timeout=300)
    log = job.stdout[-4000:] + job.stderr[-4000:]
    assert job.returncode == 0, f"precompute job failed:\n{log}\nautoscaler log:\n{c.log_tail('monitor.log')}"

    # (a) the job did its work
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples_ok"] == 12 and summary["samples_failed"] == 0

    # (b) the autoscaler launched worker nodes (real raylets) that did not exist before the job
    during = [r for r in c.records() if "workers" in r]
    launched = {w for r in during for w in r["workers"]}
    max_types = c.config["available_node_types"]
    assert launched, f"no worker node was ever launched: {during[-5:]}"
    assert max(r["raylets"] for r in during) >= 2
    assert all(t in max_types for r in during for t in r["types"])
    assert max(len(r["workers"]) for r in during) <= c.config["max_workers"]

    # (c) once the job is over, the idle workers are terminated (idle_timeout_minutes) and their raylets exit
    c.wait_for(lambda r: r["workers"] == [] and r["pending"] == 0 and r["raylets"] == 1, 150,
               "idle worker nodes to be removed")
