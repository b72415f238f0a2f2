"""Jobs on a Ray cluster: the resources they ask for (pure functions, no cluster), how they ship vlp to the
workers, and end to end with the real job client: ``ray start --head`` on loopback with token auth,
``ray job submit --working-dir`` of this repo for precompute then training, a failing job's status and logs."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, dotted, free_port
from vlp.config import ConfigError, load_config, validate
from vlp.precompute import PrecomputeConfig
from vlp.precompute.pipeline import encoder_on_gpu, stage_resources
from vlp.runtime import code_runtime_env, known_accelerator_types
from vlp.train import TrainConfig
from vlp.train.trainer import scaling_kwargs

RAY = Path(sys.executable).parent / "ray"
DECOY = "decoy vlp: this process did not get the shipped code: "


# ---------------------------------------------------------------- resources (no cluster)

def _pre(**over) -> PrecomputeConfig:
    return validate(PrecomputeConfig, dotted({"data": {"shards": ["s"]}, "output": {"uri": "o"}}, **over))


def test_precompute_stages_ask_for_cpus_and_the_encoder_for_gpus_of_a_type():
    from ray._common.ray_option_utils import validate_actor_options, validate_task_options

    cfg = load_config(PrecomputeConfig, ROOT / "configs/webvid_s3/precompute.yaml")
    assert cfg.encoder.accelerator_type == "A100" and encoder_on_gpu(cfg, cluster_gpus=0)
    res = stage_resources(cfg, on_gpu=True)
    assert res["encode"] == {"num_cpus": 1.0, "num_gpus": 1.0, "accelerator_type": "A100"}
    assert res["decode"] == {"num_cpus": 1, "memory": 512 << 20} and res["read"] == {"num_cpus": 0.25}
    assert all("num_gpus" not in res[k] for k in ("read", "decode", "write"))
    validate_actor_options(res["encode"], in_options=False)  # Ray accepts them as they are
    for k in ("read", "decode", "write"):
        validate_task_options(res[k], in_options=False)

    cpu = _pre(**{"encoder.tower.device": "cpu", "data.decode_cpus": 2, "encoder.cpus_per_actor": 3})
    assert not encoder_on_gpu(cpu, cluster_gpus=8)
    assert stage_resources(cpu, on_gpu=False)["encode"] == {"num_cpus": 3.0, "num_gpus": 0}
    assert stage_resources(cpu, on_gpu=False)["decode"]["num_cpus"] == 2
    auto = _pre()  # device auto: GPUs when the cluster has some
    assert not encoder_on_gpu(auto, 0) and encoder_on_gpu(auto, 1)
    assert stage_resources(_pre(**{"encoder.num_gpus_per_actor": 0.5}), True)["encode"]["num_gpus"] == 0.5


def test_training_workers_ask_for_a_gpu_of_a_type():
    from ray.train import ScalingConfig

    cfg = load_config(TrainConfig, ROOT / "configs/valley7b/train_stage1.yaml")
    kw = scaling_kwargs(cfg)
    assert kw == {"num_workers": 8, "use_gpu": True, "resources_per_worker": {"CPU": 8, "GPU": 1},
                  "accelerator_type": "A100"}
    sc = ScalingConfig(**kw)  # what Ray Train asks the scheduler (and the autoscaler) for per worker
    assert sc._resources_per_worker_not_none == {"CPU": 8, "GPU": 1, "accelerator_type:A100": 0.001}
    s2 = load_config(TrainConfig, ROOT / "configs/valley7b/train_stage2.yaml")
    assert ScalingConfig(**scaling_kwargs(s2))._resources_per_worker_not_none["accelerator_type:A100-80G"] > 0
    local = load_config(TrainConfig, ROOT / "configs/local/train_stage1.yaml")
    kw = scaling_kwargs(local)
    assert kw["resources_per_worker"] == {"CPU": 0.5} and not kw["use_gpu"] and kw["accelerator_type"] is None
    assert ScalingConfig(**kw)._resources_per_worker_not_none == {"CPU": 0.5}


def test_accelerator_type_is_checked_against_rays_names():
    assert {"A100", "A100-40G", "A100-80G", "H100"} <= set(known_accelerator_types())
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, ROOT / "configs/valley7b/train_stage1.yaml", ["scaling.accelerator_type=A1000"])
    assert "scaling.accelerator_type" in str(e.value) and "did you mean A100" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, ROOT / "configs/local/train_stage1.yaml", ["scaling.accelerator_type=A100"])
    assert "scaling" in str(e.value) and "needs use_gpu=true" in str(e.value)
    with pytest.raises(ConfigError) as e:
        _pre(**{"encoder.accelerator_type": "A100", "encoder.tower.device": "cpu"})
    assert "encoder" in str(e.value) and "needs GPU actors" in str(e.value)
    with pytest.raises(ConfigError, match="encoder.accelerator_type"):
        _pre(**{"encoder.accelerator_type": "a100"})


def test_code_shipping_plan():
    src = Path("/repo/platform/vlp")
    wheel = Path("/opt/venv/lib/python3.11/site-packages/vlp")
    env, why = code_runtime_env("auto", "auto", src, {"working_dir": "gcs://_ray_pkg_x.zip"})
    assert env == {"py_modules": [str(src)]} and "py_modules" in why  # only py_modules: merged with the job's
    assert code_runtime_env("auto", None, src, {})[0] is None  # local Ray: same machine, same code
    assert code_runtime_env("auto", "auto", wheel, {})[0] is None  # installed wheel: the image has it
    assert code_runtime_env("installed", "auto", src, {})[0] is None
    assert code_runtime_env("py_modules", None, wheel, {})[0] == {"py_modules": [str(wheel)]}
    env, why = code_runtime_env("py_modules", "auto", src, {"py_modules": ["s3://b/vlp.zip"]})
    assert env is None and "s3://b/vlp.zip" in why  # Ray cannot merge two py_modules lists: keep the job's


def test_runtime_env_file_excludes_what_must_not_be_uploaded():
    env = yaml.safe_load((ROOT / "cluster/runtime_env.yaml").read_text())
    assert set(env) == {"excludes"}  # working_dir comes from --working-dir; py_modules from init_ray
    assert {".git", ".venv", "runs/"} <= set(env["excludes"])


def test_job_scripts_put_their_checkouts_platform_first(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for job in ("precompute", "train", "pipeline"):
        src = (ROOT / "jobs" / f"{job}.py").read_text()
        assert len(src.splitlines()) < 150
        probe = tmp_path / job / "jobs" / "probe.py"
        probe.parent.mkdir(parents=True)
        # the job's own preamble, then report where vlp came from
        probe.write_text(src.split("from vlp.cli import main")[0] + "import vlp; print(vlp.__file__)\n")
        shutil.copy(ROOT / "jobs" / "_checkout.py", probe.parent)
        (tmp_path / job / "platform").symlink_to(ROOT / "platform")
        r = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == str(tmp_path / job / "platform" / "vlp" / "__init__.py")


# ---------------------------------------------------------------- end to end with the real job client

def _sweep(tag: str) -> None:
    """Kill (by pid) processes of this test's cluster that outlived it: their command line or cwd holds
    the cluster's private temp dir. Never touches other Ray instances on the machine."""
    import psutil

    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            if p.info["pid"] == me:
                continue
            if tag in " ".join(p.info["cmdline"] or []) or tag in (p.info["cwd"] or ""):
                p.kill()
        except psutil.Error:
            pass


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when this test process dies (killed by a timeout, say), which
    makes `ray start --block` stop its node, so no head outlives the test."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _http(url: str, token: str | None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):  # not listening yet
        return 0


class Head:
    def __init__(self, env: dict, dash: str, temp: Path, token: str):
        self.env, self.dash, self.temp, self.token = env, dash, temp, token

    def ray(self, *args, timeout=300, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(RAY), *args], capture_output=True, text=True, timeout=timeout,
                              env=env or self.env)

    def status(self, job_id: str, cli: bool = True) -> tuple[str, str]:
        """(what ``ray job status`` prints, the status the job API returns)."""
        out = self.ray("job", "status", "--address", self.dash, job_id).stdout if cli else ""
        out = re.sub(r"\x1b\[[0-9;]*m", "", out)
        req = urllib.request.Request(f"{self.dash}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return out, json.loads(r.read())["status"]

    def submit(self, job_id: str, *entrypoint: str) -> subprocess.CompletedProcess:
        deadline = time.time() + 120
        while True:
            r = self.ray("job", "submit", "--address", self.dash, "--submission-id", job_id,
                         "--working-dir", str(ROOT), "--runtime-env", str(ROOT / "cluster/runtime_env.yaml"),
                         "--", *entrypoint, timeout=600)
            # right after `ray start` the head's job agent may not have registered yet; the job was not created
            if "No available agent to submit job" not in r.stderr + r.stdout or time.time() > deadline:
                return r
            time.sleep(2)


@pytest.fixture(scope="module")
def head(tiny_clip_path):
    from vlp.models.presets import resolve_model_path

    resolve_model_path("preset:tiny-llama")  # presets built once here, not by the jobs
    temp = Path(tempfile.mkdtemp(prefix="vlpj-", dir="/tmp"))  # short: Ray's socket paths live under it
    token = secrets.token_hex(32)
    (temp / "auth_token").write_text(token)
    home_token = Path.home() / ".ray" / "auth_token"
    home_before = home_token.stat().st_mtime_ns if home_token.exists() else None
    # The cluster must not see this checkout, nor the venv's editable vlp: its PYTHONPATH holds a decoy vlp
    # that raises on import. Entries a job's runtime_env adds (working_dir, py_modules) come before it, so
    # every process that imports vlp without the shipped code fails loudly instead of passing by luck.
    decoy = temp / "decoy" / "vlp"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text(f"raise ImportError({DECOY!r} + __file__)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(PYTHONPATH=str(decoy.parent), PATH=f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(temp / "auth_token"), RAY_USAGE_STATS_ENABLED="0")
    port, dash_port = free_port(), free_port()
    log = temp / "ray_start.log"
    proc = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--include-dashboard=true",
         "--num-cpus=2", "--num-gpus=0", f"--object-store-memory={400 << 20}", f"--temp-dir={temp}",
         f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--node-manager-port={free_port()}",
         f"--object-manager-port={free_port()}", "--disable-usage-stats"],
        env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
    dash = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.time() + 180
        while _http(f"{dash}/api/version", token) != 200:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start --head failed:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield Head(env, dash, temp, token)
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops every process of its node on SIGTERM
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        _sweep(str(temp))  # not `ray stop`: that kills every Ray on the machine, other tests' included
        shutil.rmtree(temp, ignore_errors=True)
        if home_before is not None:  # (a local ray.init() elsewhere on the machine may create a missing one)
            assert home_token.stat().st_mtime_ns == home_before, "the test must not write ~/.ray/auth_token"


@pytest.mark.ray
@pytest.mark.slow
def test_jobs_submitted_with_the_real_client_ship_code_and_report_failures(head, synth_shards, tmp_path):
    h = head
    t0 = time.time()
    # token auth is on: the dashboard refuses requests without the token or with another one
    assert _http(f"{h.dash}/api/version", None) == 401
    assert _http(f"{h.dash}/api/version", secrets.token_hex(32)) == 403

    # control: a job that imports vlp without the jobs/ preamble gets the decoy, not some installed vlp
    r = h.submit("vlp-control", "python", "-c", "import vlp")
    assert r.returncode != 0 and DECOY in h.ray("job", "logs", "--address", h.dash, "vlp-control").stdout

    feats, runs = tmp_path / "features", tmp_path / "runs"
    r = h.submit("vlp-precompute", "python", "jobs/precompute.py", "--config", "configs/local/precompute.yaml",
                 f"data.shards=[{synth_shards}/webvid-*.tar]", f"output.uri={feats}", "ray.progress_bars=false")
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    print(f"\n[test] control + precompute jobs done after {time.time() - t0:.0f} s")
    out, status = h.status("vlp-precompute")
    assert status == "SUCCEEDED" and "Job 'vlp-precompute' succeeded" in out, out
    man = json.loads((feats / "manifest.json").read_text())
    assert man["totals"] == {"samples_ok": 12, "samples_failed": 0, "samples_text": 0,
                             "items_by_modality": {"video": 12}} and len(man["shards"]) == 2

    # the job ran the uploaded copy of this repo: the driver imported vlp from the working dir Ray unpacked,
    # the workers from the py_modules package init_ray shipped; neither from this checkout or an install
    logs = h.ray("job", "logs", "--address", h.dash, "vlp-precompute").stdout
    driver = _logged_path(logs, "[vlp] code: driver imports vlp from ")
    worker = _logged_path(logs, "[vlp] code: workers import vlp from ")
    runtime = str(h.temp)
    assert driver.startswith(runtime) and "/runtime_resources/working_dir_files/" in driver
    assert driver.endswith("/platform/vlp"), driver
    assert worker.startswith(runtime) and "/runtime_resources/py_modules_files/" in worker and worker.endswith("/vlp")
    assert not any(p.startswith(str(ROOT)) for p in (driver, worker))
    print(f"[test] driver vlp: {driver}\n[test] worker vlp: {worker}")

    r = h.submit("vlp-train", "python", "jobs/train.py", "--config", "configs/local/train_stage1.yaml",
                 "run_name=job", f"output_dir={runs}", f"data.sets=[{{uri: {feats}}}]", "batch.global_size=4",
                 "batch.micro_size=2", "scaling.num_workers=1", "scaling.cpus_per_worker=0.5", "max_steps=2",
                 "epochs=1", "checkpoint.every_n_steps=1", "tensorboard=false", "ray.progress_bars=false")
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    print(f"[test] train job done after {time.time() - t0:.0f} s")
    assert h.status("vlp-train", cli=False)[1] == "SUCCEEDED"
    summary = json.loads((runs / "job" / "train_summary.json").read_text())
    assert summary["steps"] == 2
    assert json.loads((runs / "job" / "export" / "vlp_model.json").read_text())["template"] == "plain"
    assert "[vlp] code: workers import vlp from " + runtime in r.stdout

    # a job that fails inside the library: FAILED, and `ray job logs` shows the reason
    r = h.submit("vlp-bad", "python", "jobs/precompute.py", "--config", "configs/local/precompute.yaml",
                 f"data.shards=[{tmp_path}/nowhere/webvid-*.tar]", f"output.uri={tmp_path / 'bad'}")
    assert r.returncode != 0
    out, status = h.status("vlp-bad")
    assert status == "FAILED" and "Job 'vlp-bad' failed" in out, out
    logs = h.ray("job", "logs", "--address", h.dash, "vlp-bad").stdout
    assert "shard spec matched nothing" in logs and f"{tmp_path}/nowhere/webvid-*.tar (glob matched nothing)" in logs


def _logged_path(logs: str, prefix: str) -> str:
    line = next((ln for ln in logs.splitlines() if prefix in ln), None)
    assert line is not None, f"no {prefix!r} line in the job logs:\n{logs[-4000:]}"
    return line.split(prefix, 1)[1].split(";", 1)[0].strip()
