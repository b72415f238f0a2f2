"""S3 paths against a real S3-speaking server on loopback (moto server mode), through s3fs."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import make_bucket
from vlp.config import validate
from featrows import feature_rows
from vlp.precompute import PrecomputeConfig, open_feature_dataset, run_precompute
from vlp.storage import StorageConfig, StorageError, expand_shards, get_fs

pytestmark = pytest.mark.ray


def _upload(endpoint: str, bucket: str, local_dir, prefix: str) -> None:
    fs, _ = get_fs(f"s3://{bucket}", StorageConfig(endpoint_url=endpoint))
    for p in sorted(local_dir.glob("*.tar")):
        fs.put_file(str(p), f"{bucket}/{prefix}/{p.name}")


def test_expand_shards_on_s3(s3_server, synth_shards):
    make_bucket(s3_server, "expand")
    _upload(s3_server, "expand", synth_shards, "wds")
    st = StorageConfig(endpoint_url=s3_server)
    assert expand_shards(["s3://expand/wds/webvid-{00000..00001}.tar"], st) == [
        "s3://expand/wds/webvid-00000.tar", "s3://expand/wds/webvid-00001.tar"]
    assert len(expand_shards(["s3://expand/wds/*.tar"], st)) == 5
    assert len(expand_shards(["s3://expand/wds/"], st)) == 5
    with pytest.raises(StorageError, match="does not exist"):
        expand_shards(["s3://expand/wds/webvid-00009.tar"], st)


def test_precompute_s3_to_s3_and_resume(ray_local, s3_server, synth_shards, tmp_path):
    make_bucket(s3_server, "data")
    make_bucket(s3_server, "feats")
    _upload(s3_server, "data", synth_shards, "webvid")
    st = {"endpoint_url": s3_server}
    cfg = validate(PrecomputeConfig, {
        "data": {"shards": ["s3://data/webvid/webvid-{00000..00001}.tar", "s3://data/webvid/cc3m-00000.tar"],
                 "storage": st},
        "output": {"uri": "s3://feats/run1", "storage": st}, "ray": {"progress_bars": False}})
    s = run_precompute(cfg, log=lambda *_: None)
    assert s["samples_ok"] == 18 and s["samples_failed"] == 0
    sto = StorageConfig(endpoint_url=s3_server)
    fs, _ = get_fs("s3://feats/run1", sto)
    names = {p.rsplit("/", 1)[-1] for p in fs.ls("feats/run1")}
    assert {"manifest.json", "config.yaml", "errors.jsonl", "summary.json", "fingerprint.json", "shards", "parts"} <= names
    man = json.loads(fs.cat("feats/run1/manifest.json"))
    assert man["inputs"][0].startswith("s3://data/webvid/") and man["totals"]["samples_ok"] == 18
    rows = feature_rows("s3://feats/run1", sto)
    assert len(rows) == 18 and len({r["uid"] for r in rows}) == 18 and man["format"] == "vlp-features/2"
    assert all(len(r["blocks"]) == 1 and r["blocks"][0].shape[1] == 64 for r in rows)
    ds = open_feature_dataset("s3://feats/run1", sto, decode=False)
    assert ds.count() == 18
    # the same command again: everything is reused, nothing recomputed or duplicated
    s2 = run_precompute(cfg, log=lambda *_: None)
    assert s2["shards_skipped_complete"] == 3 and s2["shards_run"] == 0
    assert Counter(r["uid"] for r in feature_rows("s3://feats/run1", sto)).most_common(1)[0][1] == 1


def test_bad_credentials_surface_as_a_clear_message(s3_server_strict, tmp_path, capsys):
    st = StorageConfig(endpoint_url=s3_server_strict)
    with pytest.raises(StorageError) as ei:
        expand_shards(["s3://any-bucket/webvid-{00000..00001}.tar"], st)
    msg = str(ei.value)
    assert "s3://any-bucket/webvid-00000.tar" in msg and "credentials were rejected or missing" in msg

    from vlp.cli import main

    rc = main(["precompute", "data.shards=[s3://any-bucket/x.tar]", f"data.storage.endpoint_url={s3_server_strict}",
               f"output.uri={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert rc == 1 and "credentials were rejected or missing" in err and "Traceback" not in err


def test_unreachable_shard_in_a_run_becomes_an_error_record(ray_local, s3_server, synth_shards, tmp_path):
    """A shard that vanishes between listing and reading is recorded, not a crash."""
    from vlp.precompute.stages import ReadShard

    rows = list(ReadShard(StorageConfig(endpoint_url=s3_server))({"shard": "gone", "uri": "s3://nobucket/gone.tar"}))
    assert [r["kind"] for r in rows] == ["error", "end"]
    assert rows[0]["stage"] == "open" and "nobucket" in rows[0]["error"] and rows[1]["expected"] == 1
