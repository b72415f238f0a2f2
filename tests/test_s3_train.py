"""Training end to end on S3 (the loopback S3 server): feature sets, run folders and stage 2's
``model.connector.init_from`` all s3:// paths, stage 1 -> stage 2 -> export -> `vlp eval`, with a worker failure
injected in stage 1 and the run resumed from its checkpoint on S3. The endpoint comes from AWS_ENDPOINT_URL, as on a
cluster whose object store is not AWS's."""

from __future__ import annotations

import json
import uuid

import pytest

from conftest import make_bucket
from sequences import run_sequence
from vlp.storage import StorageConfig, get_fs, read_appended

SHRINK = ["epochs=1", "batch.global_size=2", "batch.micro_size=1", "tensorboard=true", "ray.progress_bars=false"]


@pytest.mark.slow
@pytest.mark.ray
def test_stage1_stage2_export_eval_all_on_s3_with_a_failure_and_resume(s3_server, tmp_path):
    bucket = f"e2e-{uuid.uuid4().hex[:8]}"
    make_bucket(s3_server, bucket)
    s3 = f"s3://{bucket}"
    pre = ["precompute", "--config", "configs/local/precompute.yaml", "ray.progress_bars=false"]
    cmds = [
        ["make-shards", "--config", "configs/local/make_shards.yaml", "out=shards", "videos=4", "images=2",
         "instructions=0", "heldout=4", "samples_per_shard=4", "num_frames=8"],
        [*pre, "data.shards=[shards/webvid-*.tar,shards/cc3m-*.tar]", f"output.uri={s3}/features/pretrain"],
        [*pre, "data.shards=[shards/heldout-*.tar]", f"output.uri={s3}/features/heldout"],
        ["train", "--config", "configs/local/train_stage1.yaml", f"output_dir={s3}/runs", *SHRINK,
         f"data.sets=[{{uri: {s3}/features/pretrain}}]", "checkpoint.every_n_steps=1", "debug.fail_at_step=2",
         "max_steps=3"],
        ["train", "--config", "configs/local/train_stage2.yaml", f"output_dir={s3}/runs", *SHRINK,
         f"data.sets=[{{uri: {s3}/features/heldout}}]", f"model.connector.init_from={s3}/runs/stage1/export",
         "max_steps=2"],
        ["eval", "--model", f"{s3}/runs/stage2/export", "--features", f"{s3}/features/heldout", "--max-samples", "2"],
    ]
    p = run_sequence(cmds, tmp_path, env={"AWS_ENDPOINT_URL": s3_server}, timeout=1500)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-6000:]
    assert "injected failure at step 2" in p.stdout + p.stderr
    assert "[vlp] train stage1: a worker failed (rank 0: RuntimeError: injected failure at step 2" in p.stdout
    assert "(RayTrainWorker pid=" not in p.stdout + p.stderr  # the workers' output went to the run's log on S3:
    log = read_appended(f"{s3}/runs/stage1/logs/ray.log", StorageConfig(endpoint_url=s3_server))
    assert "Traceback" in log and "RuntimeError: injected failure at step 2 on rank 0" in log
    assert "(RayTrainWorker pid=" in log and "[vlp] step 3/3" in log
    fs, _ = get_fs(s3, StorageConfig(endpoint_url=s3_server))
    st = StorageConfig(endpoint_url=s3_server)
    summaries = {}
    for run in ("stage1", "stage2"):
        summaries[run] = json.loads(fs.cat(f"{bucket}/runs/{run}/train_summary.json"))
        assert fs.exists(f"{bucket}/runs/{run}/export/vlp_model.json")
        assert not fs.exists(f"{bucket}/runs/{run}/.vlp-writer.json")  # released
        assert fs.glob(f"{bucket}/runs/{run}/tensorboard/events.out.tfevents.*")  # synced from the worker
    steps = [json.loads(x)["step"] for x in read_appended(f"{s3}/runs/stage1/metrics.jsonl", st).splitlines()]
    assert summaries["stage1"]["steps"] == 3 and steps.count(2) >= 1 and max(steps) == 3  # on after the failure
    assert summaries["stage2"]["steps"] == 2
    evals = [x for x in p.stdout.splitlines() if x.startswith("[readme] vlp eval --model s3://")]
    assert len(evals) == 1 and ": exit 0 " in evals[0]  # the stage-2 export read back from S3
