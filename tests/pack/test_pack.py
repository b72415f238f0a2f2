"""vlp pack: annotations + a media folder -> WebDataset shards that precompute reads unchanged.

Unit tests build samples from made media without Ray; the runs pack made LLaVA-format annotations (images, a
video, text-only rows, several images, missing and non-media files, a malformed record) on the session's local
Ray, then on the loopback S3 server, and the LLaMA-Factory demo files when ../shared is present.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from conftest import SHARED_MEDIA, make_bucket
from media_makers import encode, frames_of, pil_bytes
from vlp.config import validate
from vlp.pack import PackConfig
from vlp.pack.formats import PackItem, PackRecord
from vlp.pack.group import build_sample, media_uri


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    (root / "coco").mkdir()
    frames = frames_of(4)
    for i in range(3):
        (root / "coco" / f"{i}.jpg").write_bytes(pil_bytes(frames[i], "JPEG"))
    (root / "clips").mkdir()
    (root / "clips" / "a.mp4").write_bytes(encode(frames))
    (root / "clips" / "nokey").write_bytes(encode(frames))  # a WebVid-style key without extension
    (root / "coco" / "notes.jpg").write_text("not an image\n")
    return root


def cfg_for(media: Path, out: str = "unused", **kw) -> PackConfig:
    return validate(PackConfig, {"format": {"type": "llava"}, "annotations": ["unused.json"],
                                 "media_root": str(media), "out": out, **kw})


def record(items: list[tuple[str, str]], conv: str = "<image>\nWhat is it?", index: int = 7) -> PackRecord:
    return PackRecord(index=index, items=[PackItem(m, p) for m, p in items], caption=None, source={"id": "x"},
                      conversations=[{"from": "human", "value": conv}, {"from": "gpt", "value": "A shape."}])


def test_a_sample_holds_its_items_numbered_per_modality_and_the_record(media):
    one = build_sample(record([("image", "coco/0.jpg")]), cfg_for(media))
    assert sorted(one) == ["__key__", "jpg", "json"] and one["__key__"] == "000000007"
    assert one["jpg"] == (media / "coco" / "0.jpg").read_bytes()
    meta = json.loads(one["json"])
    assert meta["source"] == {"id": "x"} and meta["media"] == ["coco/0.jpg"] and meta["format"] == "llava"
    assert "images" not in meta  # the reader would take a top-level list as the sample's media references
    mixed = build_sample(record([("image", "coco/0.jpg"), ("video", "clips/a.mp4"), ("image", "coco/1.jpg")],
                                "<image><video><image> Compare."), cfg_for(media))
    assert sorted(k for k in mixed if k not in ("__key__", "json")) == ["0.jpg", "0.mp4", "1.jpg"]
    assert mixed["1.jpg"] == (media / "coco" / "1.jpg").read_bytes()
    nokey = build_sample(record([("video", "clips/nokey")], "<video> What?"), cfg_for(media))
    assert "mp4" in nokey  # no extension: the sniffed container names the member


@pytest.mark.parametrize("path,why", [
    ("coco/9.jpg", "coco/9.jpg: no such file under media root"),
    ("coco/notes.jpg", "not an image or video"),
    ("../media/coco/0.jpg", "leaves the media root"),
    ("coco", "is a folder"),
])
def test_media_problems_name_the_item(media, path, why):
    with pytest.raises(ValueError, match=r"item 0 \(image " + path.replace(".", r"\.") + r"\): .*" + why):
        build_sample(record([("image", path)]), cfg_for(media))


def test_limits_and_candidates(media):
    with pytest.raises(ValueError, match="over max_item_bytes=100"):
        build_sample(record([("image", "coco/0.jpg")]), cfg_for(media, max_item_bytes=100))
    rec = record([("video", "clips/a.mkv")], "<video> What?")
    rec.items[0].candidates = ["clips/a.webm", "clips/a.mp4"]
    assert "mp4" in build_sample(rec, cfg_for(media))
    assert "jpg" in build_sample(record([("image", "coco/notes.jpg")]), cfg_for(media, media_check="none"))
    assert media_uri("s3://b/m", "x/y.jpg") == "s3://b/m/x/y.jpg" and media_uri("r", "/abs/y.jpg") == "/abs/y.jpg"


ANNOTATIONS = [  # LLaVA's released shape (llava_v1_5_mix665k.json), with the rows a real file has and bad ones
    {"id": "000000033471", "image": "coco/0.jpg",
     "conversations": [{"from": "human", "value": "<image>\nWhat colour is the shape?"},
                       {"from": "gpt", "value": "Red."}, {"from": "human", "value": "And its shape?"},
                       {"from": "gpt", "value": "A square."}]},
    {"id": "t1", "conversations": [{"from": "human", "value": "What is 2 + 2?"}, {"from": "gpt", "value": "4"}]},
    {"id": "missing", "image": "coco/404.jpg",
     "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]},
    {"id": "two", "image": ["coco/1.jpg", "coco/2.jpg"],
     "conversations": [{"from": "human", "value": "<image> and <image>: same?"}, {"from": "gpt", "value": "No."}]},
    {"id": "broken", "image": "coco/0.jpg", "conversations": "not a list"},
    {"id": "noplaceholder", "image": "coco/2.jpg",
     "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A red square."}]},
    {"id": "notmedia", "image": "coco/notes.jpg",
     "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]},
]


def shard_samples(folder: Path) -> dict[str, dict]:
    """key -> {ext: bytes} over every shard of a packed folder, read with vlp's reader."""
    from vlp.data.tario import RawSample, iter_tar_samples

    out = {}
    for tar in sorted(folder.glob("*.tar")):
        with open(tar, "rb") as f:
            for s in iter_tar_samples(f):
                assert isinstance(s, RawSample), s
                out[s.key] = s.members
    return out


@pytest.fixture(scope="module")
def packed(ray_local, media, tmp_path_factory):
    from vlp.pack import run_pack

    d = tmp_path_factory.mktemp("pack")
    (d / "ann.json").write_text(json.dumps(ANNOTATIONS))
    cfg = cfg_for(media, str(d / "out"), annotations=[str(d / "ann.json")], samples_per_shard=3,
                  ray={"progress_bars": False})
    lines = []
    man = run_pack(cfg, lines.append)
    return d, cfg, man, lines


def test_pack_writes_shards_errors_and_a_manifest(packed):
    from vlp.data.sample import parse_sample
    from vlp.data.tario import RawSample
    from vlp.pack.pipeline import errors_of

    d, cfg, man, lines = packed
    out = d / "out"
    assert man["shards"] == ["data-000000.tar", "data-000001.tar"]  # group 2's one record failed: no shard
    assert man["totals"]["records"] == 7 and man["totals"]["packed"] == 4 and man["totals"]["errors"] == 3
    assert man["totals"]["text_only"] == 1 and man["totals"]["items_image"] == 4
    errs = {e["id"]: e for e in errors_of(str(out))}
    assert set(errs) == {"missing", "broken", "notmedia"}
    assert errs["broken"]["stage"] == "annotation" and errs["missing"]["key"] == "000000002"
    assert "coco/404.jpg: no such file" in errs["missing"]["reason"]
    assert "packed 4 of 7 record(s) into 2 shard(s)" in lines[-2] and "3 error(s)" in lines[-2]
    assert lines[-1] == f"[vlp] full log: {out}/logs/ray.log"  # Ray's output (vlp.runlog)
    samples = shard_samples(out)
    assert sorted(samples) == ["000000000", "000000001", "000000003", "000000005"]
    parsed = {k: parse_sample(RawSample(k, m)) for k, m in samples.items()}
    assert parsed["000000001"].text_only and parsed["000000003"].modalities == ["image", "image"]
    assert parsed["000000005"].conversations[0]["value"].startswith("<image>\n")  # placeholder added
    assert [t["from"] for t in parsed["000000000"].conversations] == ["human", "gpt", "human", "gpt"]


def test_packing_again_gives_the_same_bytes_and_resumes_per_group(packed):
    from vlp.pack import run_pack
    from vlp.pack.pipeline import PackMismatch

    d, cfg, man, _ = packed
    out = d / "out"
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.tar")}
    lines = []
    run_pack(cfg, lines.append)
    assert "3 group(s) of 3: 3 already packed, 0 to do" in lines[0]
    (out / "_pack" / "groups" / "000001.json").unlink()  # as if killed before group 1 committed
    (out / "data-000001.tar").unlink()
    lines = []
    assert run_pack(cfg, lines.append)["totals"]["packed"] == 4
    assert "3 group(s) of 3: 2 already packed, 1 to do" in lines[0]
    assert run_pack(cfg.model_copy(update={"out": str(d / "out2")}), lines.append)["totals"]["packed"] == 4
    for folder in (out, d / "out2"):
        assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.tar")} == digest
    assert not list((out / "_pack" / "plan").glob("*.jsonl"))
    with pytest.raises(PackMismatch, match="different samples_per_shard"):
        run_pack(cfg.model_copy(update={"samples_per_shard": 2}), lines.append)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.tar")}


def test_the_local_executor_packs_the_same_bytes_and_resumes(packed, tmp_path):
    """executor=local (threads in this process, no Ray) gives the ray executor's shards, errors and totals, byte
    for byte; a resume packs only the uncommitted group and removes the plan files a killed ray run left."""
    from vlp.pack import run_pack
    from vlp.pack.pipeline import errors_of

    d, cfg, man, _ = packed
    local = cfg.model_copy(update={"out": str(tmp_path / "out"), "executor": "local", "workers": 2})
    lines = []
    got = run_pack(local, lines.append)
    assert "in this process (2 group(s) at once" in lines[0]
    assert digests(tmp_path / "out") == digests(d / "out")
    assert got["totals"] == man["totals"] and got["shards"] == man["shards"]
    assert errors_of(str(tmp_path / "out")) == errors_of(str(d / "out"))
    (tmp_path / "out" / "_pack" / "groups" / "000001.json").unlink()  # as if killed before group 1 committed
    (tmp_path / "out" / "data-000001.tar").unlink()
    (tmp_path / "out" / "_pack" / "plan").mkdir()
    (tmp_path / "out" / "_pack" / "plan" / "000001.jsonl").write_text("{}\n")  # left by a killed ray run
    lines = []
    assert run_pack(local, lines.append)["totals"] == man["totals"]
    assert "2 group(s) already packed" in lines[0]
    assert digests(tmp_path / "out") == digests(d / "out")
    assert not (tmp_path / "out" / "_pack" / "plan").exists()


def test_an_error_free_group_writes_no_error_file_and_a_stale_one_is_not_read(media, tmp_path):
    """Error files are read where the group's marker counts errors: one left by an attempt killed before its
    commit (the media fixed since) is not reported."""
    from vlp.pack import run_pack
    from vlp.pack.pipeline import errors_of

    (tmp_path / "ann.json").write_text(json.dumps(ANNOTATIONS[:2]))
    cfg = cfg_for(media, str(tmp_path / "out"), annotations=[str(tmp_path / "ann.json")], executor="local")
    assert run_pack(cfg, lambda *a: None)["totals"]["errors"] == 0
    errors_dir = tmp_path / "out" / "_pack" / "errors"
    assert not errors_dir.exists()
    (tmp_path / "out" / "_pack" / "groups" / "000000.json").unlink()
    errors_dir.mkdir()
    (errors_dir / "000000.jsonl").write_text(json.dumps({"key": "000000000", "reason": "stale"}) + "\n")
    assert run_pack(cfg, lambda *a: None)["totals"]["errors"] == 0
    assert errors_of(str(tmp_path / "out")) == []


def test_the_executor_is_ray_on_a_cluster_or_a_running_ray_else_local(ray_local, monkeypatch, media):
    import sys

    from vlp.pack.group import fetch_threads
    from vlp.pack.pipeline import choose_executor

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert choose_executor(cfg_for(media)) == "ray"  # this process runs Ray (the session's)
    assert choose_executor(cfg_for(media, executor="local")) == "local"
    monkeypatch.delitem(sys.modules, "ray")  # a process that never imported Ray
    assert choose_executor(cfg_for(media)) == "local"
    assert choose_executor(cfg_for(media, ray={"address": "auto"})) == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")  # every `ray job submit` driver has it
    assert choose_executor(cfg_for(media)) == "ray"
    assert fetch_threads(cfg_for(media)) == 0 and fetch_threads(cfg_for(media, fetch_threads=3)) == 3
    assert fetch_threads(cfg_for(media, media_root="s3://b/media")) == 8


def test_packed_shards_go_through_precompute_and_train(packed, tmp_path):
    """Precompute reads the packed folder unchanged: the two-image row encodes both, the text-only row is kept;
    one training step (one worker, all four rows in its batch) trains on them."""
    from featrows import feature_rows
    from vlp.precompute import PrecomputeConfig, run_precompute
    from vlp.train import TrainConfig, run_train

    d, _, _, _ = packed
    run_precompute(validate(PrecomputeConfig, {
        "data": {"shards": [str(d / "out")]}, "output": {"uri": str(tmp_path / "f")},
        "ray": {"progress_bars": False}}), log=lambda *a: None)
    rows = {r["key"]: r for r in feature_rows(str(tmp_path / "f"))}
    assert sorted(rows) == ["000000000", "000000001", "000000003", "000000005"]
    assert rows["000000003"]["modalities"] == ["image", "image"] and rows["000000001"]["modalities"] == []
    res = run_train(validate(TrainConfig, {
        "run_name": "packed", "output_dir": str(tmp_path / "runs"), "max_steps": 1, "epochs": 1,
        "data": {"sets": [{"uri": str(tmp_path / "f")}], "max_length": 1024}, "batch": {"global_size": 4,
        "micro_size": 4}, "scaling": {"num_workers": 1}, "tensorboard": False, "ray": {"progress_bars": False}}),
        log=lambda *a: None)
    assert res["steps"] == 1
    seen = json.loads((tmp_path / "runs" / "packed" / "samples.jsonl").read_text().splitlines()[0])["uids"]
    assert len(seen) == 4 and any(u.endswith("/000000001") for u in seen)  # the text-only row trained


@pytest.mark.parametrize("executor", ["ray", "local"])
def test_pack_on_s3(ray_local, media, s3_server, tmp_path, executor):
    """Annotations, media and shards on the loopback S3 server, with either executor."""
    import boto3

    from vlp.pack import run_pack

    bucket = f"pack-{executor}"
    make_bucket(s3_server, bucket)
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.put_object(Bucket=bucket, Key="ann/a.json", Body=json.dumps(ANNOTATIONS[:4]).encode())
    for name in ("0.jpg", "1.jpg", "2.jpg"):
        s3.put_object(Bucket=bucket, Key=f"media/coco/{name}", Body=(media / "coco" / name).read_bytes())
    storage = {"endpoint_url": s3_server}
    cfg = validate(PackConfig, {"format": {"type": "llava"}, "annotations": [f"s3://{bucket}/ann/*.json"],
                                "media_root": f"s3://{bucket}/media", "out": f"s3://{bucket}/shards",
                                "storage": storage, "samples_per_shard": 10, "ray": {"progress_bars": False}, "executor": executor})
    man = run_pack(cfg, lambda *a: None)
    assert man["totals"]["packed"] == 3 and man["shards"] == ["data-000000.tar"]
    body = s3.get_object(Bucket=bucket, Key="shards/data-000000.tar")["Body"].read()
    names = tarfile.open(fileobj=io.BytesIO(body)).getnames()
    assert "000000003.0.jpg" in names and "000000003.1.jpg" in names and "000000001.json" in names


@pytest.mark.skipif(not SHARED_MEDIA.exists(), reason="../shared/media not present (optional realism check)")
def test_the_llamafactory_demo_files_pack(ray_local, tmp_path):
    """LLaMA-Factory's mllm demo (sharegpt format): its mllm_demo_data/ are links to the real files (in a git
    checkout without symlinks they are 8-byte text files, which the sniff check refuses); made here as links."""
    from vlp.pack import run_pack

    root = tmp_path / "root"
    (root / "mllm_demo_data").mkdir(parents=True)
    for f in SHARED_MEDIA.iterdir():
        if f.is_file() and f.suffix != ".json":
            (root / "mllm_demo_data" / f.name).symlink_to(f)
    cfg = validate(PackConfig, {"format": {"type": "sharegpt"}, "annotations": [str(SHARED_MEDIA / "mllm_*.json")],
                                "media_root": str(root), "out": str(tmp_path / "out"), "ray": {"progress_bars": False}})
    man = run_pack(cfg, lambda *a: None)
    t = man["totals"]
    assert t["errors"] == 0 and t["packed"] == t["records"] == 15, t
    assert t["items_image"] > 0 and t["items_video"] > 0 and t["items_audio"] > 0
    # and every item, the real mp3/wav/flac ones too, goes through precompute with an audio tower
    from vlp.precompute import PrecomputeConfig, run_precompute

    pc = validate(PrecomputeConfig, {"data": {"shards": [str(tmp_path / "out")]},
                                     "encoder": {"tower": {"path": "preset:tiny-clip"}, "audio_tower": {"type": "ast"}},
                                     "output": {"uri": str(tmp_path / "feat")}, "ray": {"progress_bars": False}})
    s = run_precompute(pc, log=lambda *_: None)
    assert s["samples_failed"] == 0 and s["samples_ok"] == 15, s["errors_by_reason"]
    assert s["items_by_modality"] == {m: t[f"items_{m}"] for m in ("image", "video", "audio")}
