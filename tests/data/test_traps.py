"""The data-ingestion trap list: every bad sample either decodes or becomes a clean error record with a
clear reason; nothing raises out of ReadShard / DecodeFrames. Every trap is a real file in a real tar."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from vlp.data.media import DecodeConfig, SamplingConfig
from vlp.data.sample import SampleConfig
from media_makers import encode, encode_vfr
from media_makers import frames_of as make_frames
from media_makers import mjpeg_still as make_still
from vlp.synth.shards import encode_jpeg, encode_mp4
from vlp.data.tario import write_tar
from vlp.precompute.stages import DecodeFrames, ReadShard, rows_batch, batch_rows
from featrows import feature_rows

SIZE = 32  # crop size for DecodeFrames in these tests (small: fast)


# ------------------------------------------------------------------------------------------------ makers

def frames_of(n: int, h: int = 64, w: int = 96, seed: int = 0) -> np.ndarray:
    return make_frames(n, h, w, seed, direction="left", color="green", shape="square")


def mp4(n: int = 12, seed: int = 0) -> bytes:
    return encode_mp4(frames_of(n, seed=seed), 8)


def jpeg(seed: int = 0) -> bytes:
    return encode_jpeg(frames_of(1, seed=seed)[0])


def mjpeg_still(fmt: str = "mp4") -> bytes:
    """One MJPEG frame in an mp4/mov container: a still image saved as a "video"."""
    return make_still(frames_of(1, 65, 97)[0], fmt)


def bad_fourcc(data: bytes) -> bytes:
    at = data.index(b"avc1", data.index(b"stsd"))  # the sample entry's codec, not the ftyp brand
    return data[:at] + b"zzzz" + data[at + 4:]


class Evil:
    """Unpickling this creates a file: a harmless stand-in for arbitrary code execution."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def armed_pickle(marker: Path) -> bytes:
    payload = pickle.dumps(Evil(marker))
    pickle.loads(payload)  # prove the trap works: loading it does create the marker ...
    assert marker.exists()
    marker.unlink()  # ... then reset, so a later load would be seen
    return payload


def cap(text: str = "A green square moves left.") -> dict[str, bytes]:
    return {"txt": text.encode()}


def shard(tmp_path: Path, samples, name: str = "traps.tar", cut_at: int | None = None) -> Path:
    buf = io.BytesIO()
    write_tar(buf, samples)
    data = buf.getvalue()
    p = tmp_path / name
    p.write_bytes(data if cut_at is None else data[:cut_at])
    return p


def member_offset(path_or_bytes, name: str) -> tuple[int, int]:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for ti in tf:
            if ti.name == name:
                return ti.offset, ti.offset_data
    raise KeyError(name)


def run(path: Path, sampling: SamplingConfig | None = None, decode: DecodeConfig | None = None,
        sample: SampleConfig | None = None) -> dict[str, dict]:
    """ReadShard -> DecodeFrames (through the numpy batch format Ray uses). Checks the row contract and
    returns {key: row} of the sample/error rows."""
    rows = list(ReadShard(sample=sample)({"shard": "traps", "uri": str(path)}))
    assert rows and rows[-1]["kind"] == "end" and [r["kind"] for r in rows].count("end") == 1
    body = rows[:-1]
    assert rows[-1]["expected"] == len(body)
    stage = DecodeFrames(sampling or SamplingConfig(), decode or DecodeConfig(), SIZE)
    out = []
    for i in range(0, len(body), 3):  # batches of 3, like decode_batch_size
        out += batch_rows(stage(rows_batch(body[i:i + 3])))
    assert len(out) == len(body)
    for r in out:
        assert r["kind"] in ("sample", "error"), r["kind"]
        assert r["media"] == []  # media bytes are dropped after decode, for samples and errors alike
        if r["kind"] == "error":
            assert r["stage"] in ("read", "decode") and r["error"], r
    by_key = {r["key"]: r for r in out}
    assert len(by_key) == len(out), "duplicate keys"
    return by_key


def frames_shape(r: dict) -> tuple[int, ...]:
    return tuple(int(x) for x in one(r, "frames_shape").split(","))


def one(r: dict, field: str):
    """The value of a per-item field of a one-item row."""
    assert len(r[field]) == 1, r[field]
    return r[field][0]


def assert_decoded(r: dict, media_type: str, t: int) -> None:
    assert r["kind"] == "sample", r["error"]
    assert r["media_type"] == media_type and frames_shape(r) == (t, 3, SIZE, SIZE)
    assert len(np.frombuffer(one(r, "frames"), np.uint8)) == t * 3 * SIZE * SIZE
    assert len(one(r, "timestamps").split(",")) == t
    assert r["modalities"] == [media_type]


def assert_error(r: dict, stage: str, *needles: str) -> None:
    assert r["kind"] == "error", r
    assert r["stage"] == stage, r["stage"]
    for n in needles:
        assert n.lower() in r["error"].lower(), r["error"]


# ------------------------------------------------------------------------------------------------ the trap list

def test_good_samples_baseline(tmp_path):
    rows = run(shard(tmp_path, [("v", {"mp4": mp4(), **cap()}), ("i", {"jpg": jpeg(), **cap()})]))
    assert_decoded(rows["v"], "video", 8)
    assert_decoded(rows["i"], "image", 1)
    assert one(rows["v"], "n_source_frames") == 12 and rows["v"]["caption"] == "A green square moves left."


@pytest.mark.parametrize("fmt", ["mp4", "mov"])
@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_trap1_single_mjpeg_frame_named_mp4_is_an_image(tmp_path, fmt, backend):
    rows = run(shard(tmp_path, [("still", {"mp4": mjpeg_still(fmt), **cap()})]), decode=DecodeConfig(backend=backend))
    assert_decoded(rows["still"], "image", 1)
    assert one(rows["still"], "n_source_frames") == 1 and one(rows["still"], "timestamps") == "0.0000"
    if backend == "pyav":
        assert one(rows["still"], "decoder") == "pyav"


def test_trap2_zero_length_media(tmp_path):
    rows = run(shard(tmp_path, [("empty", {"mp4": b"", **cap()}), ("empty_img", {"jpg": b"", **cap()})]))
    assert_error(rows["empty"], "decode", "empty media")
    assert_error(rows["empty_img"], "decode", "empty media")


def test_trap3_truncated_mp4(tmp_path):
    data = mp4()
    rows = run(shard(tmp_path, [("half", {"mp4": data[: len(data) // 2], **cap()}),
                                ("ok", {"mp4": data, **cap()})]))
    # PyAV writes the moov index last: half a file has no index, neither decoder can use it (deterministic)
    assert_error(rows["half"], "decode", "decord:", "pyav:")
    assert_decoded(rows["ok"], "video", 8)


def test_trap4_wrong_extensions_decode_by_magic(tmp_path):
    rows = run(shard(tmp_path, [("jpeg_as_mp4", {"mp4": jpeg(), **cap()}), ("mp4_as_jpg", {"jpg": mp4(), **cap()})]))
    assert_decoded(rows["jpeg_as_mp4"], "image", 1)
    assert one(rows["jpeg_as_mp4"], "decoder") == "pillow" and one(rows["jpeg_as_mp4"], "media_ext") == "mp4"
    assert_decoded(rows["mp4_as_jpg"], "video", 8)
    assert one(rows["mp4_as_jpg"], "n_source_frames") == 12 and one(rows["mp4_as_jpg"], "media_ext") == "jpg"


def test_trap5_unknown_codec_fourcc(tmp_path):
    rows = run(shard(tmp_path, [("zzzz", {"mp4": bad_fourcc(mp4()), **cap()})]))
    assert_error(rows["zzzz"], "decode", "decord:", "pyav:", "decoder not found")


@pytest.mark.parametrize("where", ["mid_member", "at_member_boundary"])
def test_trap6_tar_cut_off(tmp_path, where):
    samples = [(f"s{i}", {"mp4": mp4(6, seed=i), **cap()}) for i in range(4)]
    full = shard(tmp_path, samples, "full.tar")
    header, data = member_offset(full, "s2.mp4")
    cut = data + 700 if where == "mid_member" else header
    rows = run(shard(tmp_path, samples, "cut.tar", cut_at=cut))  # run() checks expected == rows
    assert_decoded(rows["s0"], "video", 8)
    lost = "s2" if where == "mid_member" else "s1"  # at a boundary, the sample being read is s1
    assert_error(rows[lost], "read", "truncated")
    assert set(rows) == ({"s0", "s1", "s2"} if where == "mid_member" else {"s0", "s1"})
    if where == "mid_member":
        assert_decoded(rows["s1"], "video", 8)


def test_trap6_missing_and_garbage_shards(tmp_path):
    rows = list(ReadShard()({"shard": "gone", "uri": str(tmp_path / "nope.tar")}))
    assert [r["kind"] for r in rows] == ["error", "end"] and rows[0]["stage"] == "open" and rows[1]["expected"] == 1
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all\n" * 64)
    rows = run(tmp_path / "junk.tar")
    assert_error(rows["<shard>"], "read", "truncated or corrupt")


def test_trap7_missing_caption(tmp_path):
    rows = run(shard(tmp_path, [
        ("nothing", {"mp4": mp4()}),
        ("json_no_caption", {"mp4": mp4(), "json": json.dumps({"url": "x", "status": "success"}).encode()}),
        ("empty_txt", {"mp4": mp4(), "txt": b"  \n"}),
        ("json_caption", {"mp4": mp4(), "json": json.dumps({"caption": "from json"}).encode()}),
        ("conversations_only", {"jpg": jpeg(), "json": json.dumps(
            {"conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A square."}]}).encode()}),
    ]))
    for k in ("nothing", "json_no_caption", "empty_txt"):
        assert_error(rows[k], "read", "missing caption")
    assert_decoded(rows["json_caption"], "video", 8)
    assert rows["json_caption"]["caption"] == "from json"
    assert_decoded(rows["conversations_only"], "image", 1)
    assert json.loads(rows["conversations_only"]["conversations"])[1]["value"] == "A square."


def test_trap8_non_utf8_caption(tmp_path):
    rows = run(shard(tmp_path, [
        ("latin1_txt", {"mp4": mp4(), "txt": b"caf\xe9 au lait"}),
        ("latin1_json", {"mp4": mp4(), "json": b'{"caption": "caf\xe9"}'}),
    ]))
    assert_error(rows["latin1_txt"], "read", "utf-8", ".txt")
    assert_error(rows["latin1_json"], "read", "utf-8", "json")


def test_trap9_pickle_members_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    payload = armed_pickle(marker)
    video = mp4()
    samples = [("with_pickles", {"mp4": video, "pyd": payload, "pickle": payload, **cap()}),
               ("only_pickle", {"pkl": payload, **cap()})]
    rows = run(shard(tmp_path, samples))
    assert not marker.exists()
    assert_decoded(rows["with_pickles"], "video", 8)  # still used: it has media and a caption
    assert rows["with_pickles"]["ignored"] == "pyd,pickle"
    assert rows["with_pickles"]["bytes_in"] == len(video) + len(cap()["txt"])  # pickles not even counted in
    assert rows["only_pickle"]["kind"] == "sample" and rows["only_pickle"]["media_type"] == "text"  # text-only
    assert rows["only_pickle"]["modalities"] == [] and rows["only_pickle"]["frames"] == []
    assert rows["only_pickle"]["ignored"] == "pkl"
    strict = run(shard(tmp_path, samples, "strict.tar"), sample=SampleConfig(text_only=False))
    assert_error(strict["only_pickle"], "read", "no media member")
    assert strict["only_pickle"]["ignored"] == "pkl" and not marker.exists()


# ------------------------------------------------------------------------------------------------ more traps

def test_sample_over_max_sample_bytes_and_unused_members(tmp_path):
    video = mp4()
    samples = [("heavy", {"0.mp4": video, "1.mp4": video, **cap()}),
               ("extras", {"mp4": video, "npy": bytes(5000), "seg.json": b"[]", **cap()})]
    rows = run(shard(tmp_path, samples), sample=SampleConfig(max_sample_bytes=len(video) + 100))
    assert_error(rows["heavy"], "read", "sample 'heavy' is over the max_sample_bytes limit", "heavy.1.mp4",
                 str(len(video) + 100))
    assert_decoded(rows["extras"], "video", 8)
    assert rows["extras"]["ignored"] == "npy,seg.json"  # streamed past, never held, and counted
    assert rows["extras"]["bytes_in"] == len(video) + len(cap()["txt"])
    heavy = run(shard(tmp_path, samples, "default.tar"))["heavy"]  # the default limit is 1 GiB
    assert heavy["kind"] == "sample" and heavy["modalities"] == ["video", "video"]


def test_deeply_nested_json_is_an_error_not_a_crash(tmp_path):
    # json.loads raises RecursionError (not ValueError) on this; it used to escape ReadShard
    rows = run(shard(tmp_path, [("deep", {"mp4": mp4(), **cap(), "json": b"[" * 100_000 + b"]" * 100_000}),
                                ("after", {"mp4": mp4(), **cap()})]))
    assert_error(rows["deep"], "read", "json")
    assert_decoded(rows["after"], "video", 8)


def test_bad_json_and_conversations(tmp_path):
    rows = run(shard(tmp_path, [
        ("not_json", {"mp4": mp4(), **cap(), "json": b"{oops"}),
        ("json_list", {"mp4": mp4(), **cap(), "json": b"[1, 2]"}),
        ("bad_conv", {"mp4": mp4(), **cap(), "json": json.dumps({"conversations": [{"from": "human"}]}).encode()}),
        ("empty_conv", {"mp4": mp4(), "json": json.dumps({"conversations": []}).encode()}),
    ]))
    assert_error(rows["not_json"], "read", "json")
    assert_error(rows["json_list"], "read", "not an object")
    assert_error(rows["bad_conv"], "read", "conversations")
    assert_error(rows["empty_conv"], "read", "conversations")


def test_no_media_member(tmp_path):
    samples = [("audio", {"mp3": b"ID3\x03", **cap()}), ("nothing", {**cap()})]
    rows = run(shard(tmp_path, samples))
    assert_error(rows["audio"], "decode", "no audio tower is set (encoder.audio_tower)", "mp3")
    assert rows["nothing"]["kind"] == "sample" and rows["nothing"]["media_type"] == "text"  # a text-only sample
    strict = run(shard(tmp_path, samples, "strict.tar"), sample=SampleConfig(text_only=False))
    assert_error(strict["nothing"], "read", "no media member")


def test_resolution_change_mid_stream_does_not_kill_decode(tmp_path):
    # two h264 elementary streams of different sizes back to back; PyAV used to raise ValueError here
    data = encode(frames_of(6, 64, 96), "h264") + encode(frames_of(6, 48, 64, seed=1), "h264")
    rows = run(shard(tmp_path, [("resize", {"mp4": data, **cap()}), ("ok", {"mp4": mp4(), **cap()})]))
    assert_decoded(rows["resize"], "video", 8)
    assert_decoded(rows["ok"], "video", 8)


def test_corrupt_image_and_garbage_video(tmp_path):
    j = jpeg()
    rows = run(shard(tmp_path, [("half_jpeg", {"jpg": j[: len(j) // 2], **cap()}),
                                ("garbage", {"mp4": b"\x00garbage" * 100, **cap()})]))
    assert_error(rows["half_jpeg"], "decode", "image decode failed")
    assert_error(rows["garbage"], "decode", "unrecognised media")


def test_short_clip_odd_size_and_vfr_in_a_shard(tmp_path):
    vfr = encode_vfr(frames_of(5), [0, 0.1, 2.0, 2.1, 3.0])  # variable frame rate: pts by hand
    samples = [("short", {"mp4": mp4(3), **cap()}), ("odd", {"mp4": encode_mp4(frames_of(5, 65, 97), 8), **cap()}),
               ("odd_img", {"png": _png(frames_of(1, 65, 97)[0]), **cap()}), ("vfr", {"mp4": vfr, **cap()})]
    rows = run(shard(tmp_path, samples))
    assert_decoded(rows["short"], "video", 8)
    assert one(rows["short"], "timestamps").split(",") == ["0.0000"] * 3 + ["0.1250"] * 2 + ["0.2500"] * 3
    assert_decoded(rows["odd"], "video", 8)
    assert_decoded(rows["odd_img"], "image", 1)
    fps = run(shard(tmp_path, samples[3:], "vfr.tar"), sampling=SamplingConfig(mode="fps", fps=1.0))
    assert_decoded(fps["vfr"], "video", 4)
    assert one(fps["vfr"], "timestamps") == "0.0000,0.1000,2.0000,3.0000"


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(img).save(b, format="PNG")
    return b.getvalue()


# ------------------------------------------------------------------------------------------------ end to end

@pytest.mark.ray
def test_end_to_end_pipeline_with_traps(ray_local, tmp_path):
    from vlp.config import validate
    from vlp.precompute import PrecomputeConfig, run_precompute

    marker = tmp_path / "pwned"
    payload = armed_pickle(marker)
    v = mp4()
    good = {
        "v1": {"mp4": mp4(8, seed=1), **cap()},
        "v2": {"mp4": mp4(10, seed=2), **cap(), "json": json.dumps({"caption": "x", "src": "webvid"}).encode()},
        "img": {"jpg": jpeg(3), **cap("A green square.")},
        "still": {"mp4": mjpeg_still(), **cap()},  # trap 1: decodes as an image
        "jpeg_as_mp4": {"mp4": jpeg(4), **cap()},  # trap 4
        "mp4_as_jpg": {"jpg": mp4(6, seed=5), **cap()},  # trap 4
        "pickled": {"mp4": mp4(4, seed=6), "pyd": payload, "pickle": payload, **cap()},  # trap 9
    }
    bad = {  # key -> (stage, word in the reason)
        "empty": ({"mp4": b"", **cap()}, "decode", "empty media"),
        "half": ({"mp4": v[: len(v) // 2], **cap()}, "decode", "pyav"),
        "zzzz": ({"mp4": bad_fourcc(v), **cap()}, "decode", "decoder not found"),
        "nocap": ({"mp4": v, "json": b'{"url": "x"}'}, "read", "missing caption"),
        "latin1": ({"mp4": v, "txt": b"caf\xe9"}, "read", "utf-8"),
    }
    samples = []
    for i, k in enumerate(["v1", "empty", "img", "half", "still", "zzzz", "jpeg_as_mp4", "nocap", "mp4_as_jpg",
                           "latin1", "pickled", "v2"]):
        samples.append((k, good[k] if k in good else bad[k][0]))
    mixed = shard(tmp_path, samples, "mixed-00000.tar")
    # a second shard cut off in the middle of its third sample
    cut_samples = [(f"c{i}", {"mp4": mp4(6, seed=10 + i), **cap()}) for i in range(4)]
    _, off = member_offset(shard(tmp_path, cut_samples, "tmp.tar"), "c2.mp4")
    cut = shard(tmp_path, cut_samples, "cut-00000.tar", cut_at=off + 600)
    (tmp_path / "tmp.tar").unlink()

    out = tmp_path / "features"
    cfg = validate(PrecomputeConfig, {
        "data": {"shards": [str(mixed), str(cut)], "decode_batch_size": 4},
        "encoder": {"tower": {"path": "preset:tiny-clip"}, "batch_size": 8},
        "output": {"uri": str(out)}, "ray": {"progress_bars": False}})
    summary = run_precompute(cfg, log=lambda *_: None)

    good_keys = {("mixed-00000", k) for k in good} | {("cut-00000", "c0"), ("cut-00000", "c1")}
    bad_keys = {("mixed-00000", k) for k in bad} | {("cut-00000", "c2")}
    assert summary["samples_ok"] == len(good_keys) == 9
    assert summary["samples_failed"] == len(bad_keys) == 6
    assert not marker.exists()

    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == len(bad_keys)
    assert {(e["shard"], e["key"]) for e in errors} == bad_keys
    for e in errors:
        assert set(e) >= {"shard", "key", "stage", "reason"} and e["reason"]
        if e["shard"] == "cut-00000":
            assert e["stage"] == "read" and "truncated" in e["reason"]
        else:
            _, stage, word = bad[e["key"]]
            assert e["stage"] == stage and word in e["reason"].lower(), e

    rows = feature_rows(str(out))
    assert sorted((r["shard"], r["key"]) for r in rows) == sorted(good_keys)  # each good key exactly once
    by_key = {r["key"]: r for r in rows}
    assert {k for k, r in by_key.items() if r["media_type"] == "image"} == {"img", "still", "jpeg_as_mp4"}
    assert by_key["v1"]["num_frames"] == [8] and by_key["still"]["num_frames"] == [1]
    assert all(len(r["blocks"]) == 1 and np.isfinite(r["blocks"][0].astype(np.float32)).all() for r in rows)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"]["mixed-00000"]["ignored_members"] == {"pyd": 1, "pickle": 1}
    assert manifest["shards"]["cut-00000"]["expected"] == 3 and manifest["shards"]["mixed-00000"]["expected"] == 12
    assert sum(summary["errors_by_reason"].values()) == 6


def test_blank_txt_falls_back_to_json_caption():
    from vlp.data.tario import RawSample
    from vlp.data.sample import parse_sample

    raw = RawSample("k", {"jpg": jpeg(), "txt": b"  \n", "json": json.dumps({"caption": "A red circle."}).encode()})
    assert parse_sample(raw).caption == "A red circle."
    raw = RawSample("k", {"jpg": jpeg(), "txt": b"", "json": b"{}"})
    with pytest.raises(ValueError, match="missing caption"):
        parse_sample(raw)
