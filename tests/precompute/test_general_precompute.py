"""Precompute over general samples (vlp-features/2): several items per sample in placeholder order, mixed
image+video, text-only samples, and the errors that name the sample or the item. Rows are read with pyarrow."""

from __future__ import annotations

import json

import numpy as np
import pytest

from featrows import feature_rows
from media_makers import frames_of, shard_file
from vlp.config import validate
from vlp.data.media import DecodeConfig, SamplingConfig
from vlp.data.sample import parse_sample
from vlp.data.tario import RawSample
from vlp.precompute.stages import DecodeFrames, ReadShard, rows_batch, batch_rows
from vlp.synth.shards import encode_jpeg, encode_mp4


def jpeg(color: str) -> bytes:
    return encode_jpeg(frames_of(1, color=color, shape="circle")[0])


def mp4() -> bytes:
    return encode_mp4(frames_of(12, color="blue"), 8)


def conv(question: str, answer: str = "Yes.") -> bytes:
    return json.dumps({"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}).encode()


RED, GREEN = jpeg("red"), jpeg("green")
SAMPLES = [
    ("two", {"0.jpg": RED, "1.jpg": GREEN, "json": conv("<image>\n<image>\nWhich one is red?", "The first.")}),
    # placeholder order (image, then video) differs from the member order of caption data (video first)
    ("mix", {"mp4": mp4(), "jpg": GREEN, "json": conv("Look: <image> and then <video>. Same colour?", "No.")}),
    ("text", {"txt": b"A sentence with no media at all."}),
    ("solo_red", {"jpg": RED, "txt": b"A red circle."}),
    ("solo_green", {"jpg": GREEN, "txt": b"A green circle."}),
    ("mismatch", {"0.jpg": RED, "1.jpg": GREEN, "json": conv("<image>\nWhat is this?")}),
    ("bad_second", {"0.jpg": RED, "1.jpg": b"\xff\xd8 not really a jpeg", "txt": b"Two circles."}),
]


@pytest.fixture(scope="module")
def general_shard(tmp_path_factory):
    return shard_file(tmp_path_factory.mktemp("general") / "general-00000.tar", SAMPLES)


def test_read_and_decode_rows_per_item_and_the_errors_they_name(general_shard):
    rows = list(ReadShard()({"shard": "g", "uri": str(general_shard)}))
    assert rows[-1]["kind"] == "end" and rows[-1]["expected"] == len(SAMPLES)
    read = {r["key"]: r for r in rows[:-1]}
    assert read["two"]["modalities"] == ["image", "image"] and read["two"]["item_names"] == ["0.jpg", "1.jpg"]
    assert read["two"]["media"] == [RED, GREEN] and read["two"]["media_type"] == "image"
    assert read["mix"]["modalities"] == ["image", "video"] and read["mix"]["item_names"] == ["jpg", "mp4"]
    assert read["mix"]["media_type"] == "mixed"
    assert read["text"]["kind"] == "sample" and read["text"]["media"] == [] and read["text"]["media_type"] == "text"
    assert read["mismatch"]["kind"] == "error" and read["mismatch"]["stage"] == "read"
    assert "'mismatch'" in read["mismatch"]["error"] and "1 <image> placeholder(s) but 2" in read["mismatch"]["error"]

    stage = DecodeFrames(SamplingConfig(), DecodeConfig(), 32)
    dec = {r["key"]: r for r in batch_rows(stage(rows_batch(rows[:-1])))}
    assert [s for s in dec["two"]["frames_shape"]] == ["1,3,32,32", "1,3,32,32"]
    assert dec["mix"]["frames_shape"] == ["1,3,32,32", "8,3,32,32"] and dec["mix"]["n_source_frames"] == [1, 12]
    assert dec["text"]["kind"] == "sample" and dec["text"]["frames"] == []
    bad = dec["bad_second"]
    assert bad["kind"] == "error" and bad["stage"] == "decode" and bad["error"].startswith("item 1 (1.jpg): ")
    assert all(r["media"] == [] for r in dec.values())


def test_a_reference_item_is_refused_at_decode():
    raw = RawSample("ref", {"txt": b"A remote image.", "json": json.dumps({"images": ["s3://bucket/x.jpg"]}).encode()})
    assert parse_sample(raw).items[0].ref == "s3://bucket/x.jpg"
    row = ReadShard().row("s", raw, 0.0)
    assert row["kind"] == "sample" and row["item_refs"] == ["s3://bucket/x.jpg"]
    out = DecodeFrames(SamplingConfig(), DecodeConfig(), 32).decode_row(row)
    assert out["kind"] == "error" and out["stage"] == "decode"
    assert out["error"] == "item 0 (s3://bucket/x.jpg): media references are not supported yet"


def test_decoded_media_type_renames_the_items_placeholder():
    """A one-frame 'mp4' decodes as an image: its modality and its placeholder in the conversation follow."""
    from media_makers import mjpeg_still

    still = mjpeg_still(frames_of(1)[0])
    raw = RawSample("s", {"mp4": still, "jpg": RED, "json": conv("<image> <video> Which is brighter?")})
    row = ReadShard().row("s", raw, 0.0)
    assert row["modalities"] == ["image", "video"] and row["media_type"] == "mixed"
    out = DecodeFrames(SamplingConfig(), DecodeConfig(), 32).decode_row(row)
    assert out["kind"] == "sample" and out["modalities"] == ["image", "image"] and out["media_type"] == "image"
    assert json.loads(out["conversations"])[0]["value"] == "<image> <image> Which is brighter?"


@pytest.mark.ray
def test_precompute_writes_per_item_rows_manifest_and_counts(ray_local, general_shard, tmp_path):
    from vlp.inspect_ import inspect_features, inspect_shards
    from vlp.precompute import PrecomputeConfig, run_precompute

    out = tmp_path / "feat"
    cfg = validate(PrecomputeConfig, {"data": {"shards": [str(general_shard)]}, "output": {"uri": str(out)},
                                      "ray": {"progress_bars": False}})
    s = run_precompute(cfg, log=lambda *_: None)
    assert s["samples_ok"] == 5 and s["samples_failed"] == 2 and s["samples_text"] == 1
    assert s["items_by_modality"] == {"image": 5, "video": 1}
    assert s["this_run"]["frames"] == 2 + 9 + 2  # summed over items; the text-only sample has none
    # reasons are classed without the sample's key or the item's name, so that like errors count together
    assert "read: placeholder/media count mismatch: N <image> placeholder but N image item" in s["errors_by_reason"]
    assert len(s["errors_by_reason"]) == 2 and not any("item" in k.split(":")[1] for k in s["errors_by_reason"])

    rows = {r["key"]: r for r in feature_rows(str(out))}
    assert set(rows) == {"two", "mix", "text", "solo_red", "solo_green"}
    two, mix, text = rows["two"], rows["mix"], rows["text"]
    assert two["modalities"] == ["image", "image"] and two["items"] == ["0.jpg", "1.jpg"]
    assert two["shape"] == [[257, 64], [257, 64]] and two["num_frames"] == [1, 1] and two["timestamps"] == [[0.0]] * 2
    # each block is its own item's features, in placeholder order (same pixels as the one-image samples)
    red, green = rows["solo_red"]["blocks"][0].astype(np.float32), rows["solo_green"]["blocks"][0].astype(np.float32)
    assert not np.allclose(red, green, atol=1e-2)
    assert np.allclose(two["blocks"][0], red, atol=1e-2) and np.allclose(two["blocks"][1], green, atol=1e-2)
    assert mix["modalities"] == ["image", "video"] and mix["items"] == ["jpg", "mp4"] and mix["media_type"] == "mixed"
    assert mix["shape"] == [[257, 64], [256 + 8, 64]] and mix["num_frames"] == [1, 8] and mix["n_source_frames"] == [1, 12]
    assert np.allclose(mix["blocks"][0], green, atol=1e-2)
    assert json.loads(mix["conversations"])[0]["value"] == "Look: <image> and then <video>. Same colour?"
    assert json.loads(rows["solo_red"]["conversations"] or "null") is None  # caption data: no conversation made up
    assert text["media_type"] == "text" and text["caption"] == "A sentence with no media at all."
    assert all(text[k] == [] for k in ("modalities", "items", "features", "shape", "timestamps", "num_frames",
                                       "n_source_frames"))

    man = json.loads((out / "manifest.json").read_text())
    assert man["format"] == "vlp-features/2" and man["totals"]["samples_text"] == 1
    assert man["totals"]["items_by_modality"] == {"image": 5, "video": 1}
    sh = man["shards"]["general-00000"]
    assert sh["media"] == {"image": 3, "mixed": 1, "text": 1} and sh["items"] == {"image": 5, "video": 1}
    errors = {e["key"]: e for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert errors["mismatch"]["stage"] == "read" and "'mismatch'" in errors["mismatch"]["reason"]
    assert errors["bad_second"]["stage"] == "decode" and errors["bad_second"]["reason"].startswith("item 1 (1.jpg)")
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["sample"] == {"max_items": 64, "max_json_bytes": 16 << 20, "max_sample_bytes": 1 << 30, "text_only": True}

    rep = inspect_features(str(out))
    assert rep["samples_text"] == 1 and rep["items_by_modality"] == {"image": 5, "video": 1}
    rep = inspect_shards([str(general_shard)])
    assert rep["ok"] == 5 and rep["errors"] == 2 and rep["samples_text"] == 1
    assert rep["items_by_modality"] == {"image": 5, "video": 1}
