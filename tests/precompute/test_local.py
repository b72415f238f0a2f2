"""The local executor (vlp.precompute.local): the Ray graph's output without Ray, the choice between the two,
decode processes that die, and a driver killed outright."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

import crash_decoder  # noqa: F401  (registers crash-pyav)
from conftest import dotted
from featrows import feature_rows
from vlp.config import ConfigError, validate
from vlp.data.tario import RawSample, iter_tar_samples
from vlp.precompute import PrecomputeConfig, committed_shards, run_precompute
from vlp.precompute import local
from vlp.precompute.pipeline import choose_executor

TESTS = Path(__file__).resolve().parents[1]


def _cfg(shards, out, **kw) -> PrecomputeConfig:
    d = {"data": {"shards": [str(s) for s in shards]}, "output": {"uri": str(out)}, "ray": {"progress_bars": False}}
    return validate(PrecomputeConfig, dotted(d, **kw))


def _rows(out) -> dict:
    return {r["uid"]: r for r in feature_rows(str(out))}


@pytest.mark.ray
def test_local_writes_what_the_ray_graph_writes(ray_local, synth_shards, tmp_path):
    shards = [synth_shards / "webvid-00000.tar", synth_shards / "cc3m-00000.tar"]
    logs: list[str] = []
    s_local = run_precompute(_cfg(shards, tmp_path / "local", executor="local"), log=logs.append)
    s_ray = run_precompute(_cfg(shards, tmp_path / "ray", executor="ray"), log=lambda *_: None)
    assert any("executor local" in line for line in logs)
    assert s_local["samples_ok"] == s_ray["samples_ok"] == 12 and s_local["samples_failed"] == 0
    assert s_local["items_by_modality"] == s_ray["items_by_modality"] == {"video": 6, "image": 6}
    assert s_local["this_run"]["decoders"] == s_ray["this_run"]["decoders"]
    a, b = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    assert a.keys() == b.keys() and len(a) == 12
    for uid, r in a.items():
        assert r["shape"] == b[uid]["shape"] and r["timestamps"] == b[uid]["timestamps"]
        assert r["caption"] == b[uid]["caption"] and r["meta"] == b[uid]["meta"]
        assert all(np.array_equal(x, y) for x, y in zip(r["blocks"], b[uid]["blocks"]))  # the same numbers
    assert committed_shards(str(tmp_path / "local")).keys() == committed_shards(str(tmp_path / "ray")).keys()
    run_precompute(_cfg(shards, tmp_path / "again", executor="local", **{"data.decode_workers": 2}),
                   log=lambda *_: None)
    assert _parts(tmp_path / "again") == _parts(tmp_path / "local")  # the same parts, rows in the same order


def _parts(out) -> list[list[str]]:
    """Each committed part's uids in row order (parts sorted by their first uid)."""
    import pyarrow.parquet as pq

    parts = [pq.read_table(out / p, columns=["uid"]).column("uid").to_pylist()
             for rec in committed_shards(str(out)).values() for p in rec.parts]
    return sorted(parts)


def test_auto_is_local_on_one_machine_and_ray_on_a_cluster_or_for_gpu_decoding(tmp_path, monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    cfg = lambda **kw: _cfg(["x.tar"], tmp_path, **kw)  # noqa: E731
    assert choose_executor(cfg()) == "local"
    assert choose_executor(cfg(**{"ray.address": "auto"})) == "ray"
    assert choose_executor(cfg(**{"data.decode.device": "cuda"})) == "ray"
    assert choose_executor(cfg(executor="ray")) == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a ray job submit driver
    assert choose_executor(cfg()) == "ray" and choose_executor(cfg(executor="local")) == "local"
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # Ray already runs in this process
    assert choose_executor(cfg()) == "ray"
    with pytest.raises(ConfigError, match="executor=local decodes in CPU processes"):
        cfg(executor="local", **{"data.decode.device": "cuda", "data.decode.backend": "decord"})


def _clip_digests(shard: Path) -> list[str]:
    with open(shard, "rb") as f:
        return [crash_decoder.md5(s.members["mp4"]) for s in iter_tar_samples(f)
                if isinstance(s, RawSample) and "mp4" in s.members]


def test_a_clip_that_kills_its_decode_process_is_one_recorded_error(synth_shards, tmp_path, monkeypatch):
    shard = synth_shards / "webvid-00000.tar"
    digests = _clip_digests(shard)
    assert len(digests) == 6
    monkeypatch.setenv(crash_decoder.ENV, digests[3])
    logs: list[str] = []
    s = run_precompute(_cfg([shard], tmp_path / "f", executor="local", **{"data.decode.backend": "crash-pyav",
                                                                         "data.decode_batch_size": 2}),
                       log=logs.append)
    assert s["samples_ok"] == 5 and s["samples_failed"] == 1
    [(reason, n)] = s["errors_by_reason"].items()
    assert reason.startswith("decode: the decode process died") and n == 1
    [err] = [json.loads(x) for x in (tmp_path / "f" / "errors.jsonl").read_text().splitlines()]
    assert err["stage"] == "decode" and err["reason"] == local.DIED
    assert len(_rows(tmp_path / "f")) == 5
    assert sum("a decode process died" in line for line in logs) == 1


def test_decode_processes_dying_on_every_clip_stop_the_run_in_one_line(synth_shards, tmp_path, monkeypatch):
    monkeypatch.setenv(crash_decoder.ENV, "all")
    monkeypatch.setattr(local, "MAX_CRASHES_IN_A_ROW", 3)
    cfg = _cfg([synth_shards / "webvid-00000.tar"], tmp_path / "f", executor="local",
               **{"data.decode.backend": "crash-pyav"})
    with pytest.raises(local.DecodeWorkersDying, match="died on 3 samples in a row") as e:
        run_precompute(cfg, log=lambda *_: None)
    assert "\n" not in str(e.value)


def _gone(pids: list[int]) -> bool:
    def alive(p: int) -> bool:
        try:
            return psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    return not any(alive(p) for p in pids)


def test_a_killed_driver_takes_its_decode_processes_along_and_the_rerun_ends_exactly_once(tmp_path):
    """SIGKILL to the driver alone (not its process group): its decode processes end too; resume is exact."""
    from vlp.synth.shards import MakeShardsConfig, make_shards

    shards = tmp_path / "shards"
    make_shards(MakeShardsConfig(out=str(shards), videos=40, images=0, instructions=0, heldout=0,
                                 samples_per_shard=4, num_frames=12, seed=3))
    out = tmp_path / "feat"
    cfg_path = tmp_path / "p.yaml"
    cfg_path.write_text(yaml.safe_dump({"data": {"shards": [str(shards / "webvid-*.tar")], "decode_workers": 2},
                                        "output": {"uri": str(out)}, "encoder": {"batch_size": 2}}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "vlp.cli", "precompute", "--config", str(cfg_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    children: list[int] = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            done = list((out / "shards").glob("*.json")) if (out / "shards").exists() else []
            children = [c.pid for c in psutil.Process(proc.pid).children()]
            if len(done) >= 2 and len(children) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        deadline = time.time() + 30
        while time.time() < deadline and not _gone(children):
            time.sleep(0.1)
        assert _gone(children), "decode processes outlived their driver"
    finally:
        for p in [proc.pid, *children]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    committed = committed_shards(str(out))
    assert 2 <= len(committed) < 10 and not (out / "manifest.json").exists()
    s = run_precompute(_cfg([shards / "webvid-*.tar"], out, executor="local", **{"encoder.batch_size": 2}),
                       log=lambda *_: None)
    assert s["shards_skipped_complete"] == len(committed)
    keys = Counter(r["uid"] for r in feature_rows(str(out)))
    assert len(keys) == 40 and set(keys.values()) == {1} and s["samples_failed"] == 0


def test_progress_lines_count_samples_failures_and_shards():
    lines: list[str] = []
    p = local.Progress(shards=3, log=lines.append, every=3600)
    meta = lambda kind, ok=0, err=0: {"kind": kind, "n_ok": ok, "n_err": err}  # noqa: E731
    assert p.count([meta("part", 4, 1), meta("end")]) == [meta("part", 4, 1), meta("end")]
    assert lines == []  # not yet time
    p.every = 0
    p.count([meta("part", 2)])
    assert len(lines) == 1 and lines[0].startswith("[vlp] precompute: 6 samples written, 1 failed, 1/3 shard(s) read, ")


def test_vlp_precompute_on_one_machine_starts_no_ray_and_prints_only_its_own_lines(synth_shards, tmp_path):
    out = tmp_path / "features"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VLP_VERBOSE")}
    p = subprocess.run([sys.executable, "-m", "vlp.cli", "precompute", "--config",
                        str(TESTS.parent / "configs/local/precompute.yaml"), f"data.shards=[{synth_shards}/cc3m-*.tar]",
                        f"output.uri={out}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert lines and all(line.startswith("[vlp] ") for line in lines), p.stdout
    assert any("executor local" in line for line in lines) and "[vlp] done: 6 ok, 0 failed" in p.stdout
    assert p.stderr.strip() == "", p.stderr  # no Ray banner, no weight-loading bars
    assert not (out / "logs").exists() or "Ray" not in "".join(f.read_text() for f in (out / "logs").iterdir())
