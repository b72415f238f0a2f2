"""One writer per feature set: a second `vlp precompute` into the same output.uri is refused with one line naming
the first, while the first finishes a consistent set; parts no commit names are removed on resume."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from vlp.cli import main
from vlp.precompute import committed_shards
from vlp.writer_lock import WriterLock


def config(tmp_path, shards, out, **ray) -> str:
    p = tmp_path / f"p{len(list(tmp_path.glob('p*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump({"data": {"shards": [str(s) for s in shards]}, "output": {"uri": str(out)},
                                 "ray": {"progress_bars": False, **ray}}))
    return str(p)


def test_a_held_feature_set_is_refused_before_any_work(synth_shards, tmp_path, capsys):
    out = tmp_path / "feat"
    with WriterLock(str(out), "output.uri", command="vlp precompute") as first:
        capsys.readouterr()
        rc = main(["precompute", "--config", config(tmp_path, [synth_shards / "cc3m-00000.tar"], out)])
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.startswith("vlp precompute: error:")]
        assert rc == 1 and "Traceback" not in err and len(lines) == 1
        assert f"{out} is being written by vlp precompute (pid {first.record['pid']}" in lines[0]
        assert sorted(p.name for p in out.iterdir()) == [".vlp-writer.json"]


@pytest.mark.ray
@pytest.mark.slow
def test_two_precomputes_a_second_apart_one_refused_and_orphans_cleaned(ray_local, synth_shards, tmp_path):
    out = tmp_path / "feat"
    cfg = config(tmp_path, [synth_shards / "webvid-*.tar", synth_shards / "cc3m-00000.tar"], out,
                 address=ray_local.get_runtime_context().gcs_address)
    cmd = [sys.executable, "-m", "vlp.cli", "precompute", "--config", cfg]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out1, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1[-3000:]
    assert second.returncode == 1 and "is being written by vlp precompute" in second.stderr, second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    done = committed_shards(str(out))
    assert len(done) == 3 and not (out / ".vlp-writer.json").exists()  # released

    shard = sorted(done)[0]
    (out / "parts" / shard / "stale-writer.parquet").write_bytes(b"x")  # what a lost race used to leave
    (out / "errors" / shard).mkdir(parents=True, exist_ok=True)
    (out / "errors" / shard / "stale-writer.jsonl").write_text("{}\n")
    logs: list[str] = []
    from vlp.config import validate
    from vlp.precompute import PrecomputeConfig, run_precompute

    s = run_precompute(validate(PrecomputeConfig, yaml.safe_load(open(cfg))), log=logs.append)
    assert s["shards_skipped_complete"] == 3
    assert not (out / "parts" / shard / "stale-writer.parquet").exists()
    assert not (out / "errors" / shard / "stale-writer.jsonl").exists()
    assert any("removed 2 part file(s)" in x for x in logs)
    assert all((out / p).exists() for rec in done.values() for p in rec.parts)
