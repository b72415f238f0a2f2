"""The general sample: parsing WebDataset members into text + 0..N media items, placeholders matched in order."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from vlp.config import ConfigError, validate
from vlp.data.sample import MediaItem, Sample, SampleConfig, match_placeholders, modality_of, parse_sample
from vlp.data.tario import RawSample, iter_tar_samples, write_tar
from vlp.synth.shards import encode_jpeg, encode_mp4


@pytest.fixture(scope="module")
def jpg() -> bytes:
    return encode_jpeg(np.full((16, 16, 3), 200, np.uint8))


@pytest.fixture(scope="module")
def jpg2() -> bytes:
    return encode_jpeg(np.full((16, 16, 3), 30, np.uint8))


@pytest.fixture(scope="module")
def mp4() -> bytes:
    return encode_mp4(np.zeros((4, 16, 16, 3), np.uint8), 8)


def js(obj) -> bytes:
    return json.dumps(obj).encode()


def conv(*turns: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]


def test_modality_of_extensions():
    assert [modality_of(e) for e in ("mp4", "JPG", "0.png", "gif", "wav", "1.flac", "json", "txt", "thumb.m4a")] == \
        ["video", "image", "image", "video", "audio", "audio", None, None, "audio"]


def test_todays_single_media_samples_parse_as_before(jpg, mp4):
    """What the single-media parser of vlp before the general sample returned for these (it is gone since)."""
    q_conv = conv("<video>\nColor?", "Red.")
    cases = [  # raw sample, (media, ext, caption, meta, conversations JSON) as the old parser gave them
        (RawSample("v", {"mp4": mp4, "txt": b" A red circle moves left. "}),
         (mp4, "mp4", "A red circle moves left.", {}, "")),
        (RawSample("i", {"jpg": jpg, "json": js({"caption": "A blue square."})}),
         (jpg, "jpg", "A blue square.", {"caption": "A blue square."}, "")),
        (RawSample("q", {"mp4": mp4, "txt": b"cap", "json": js({"conversations": q_conv})}),
         (mp4, "mp4", "cap", {"conversations": q_conv}, json.dumps(q_conv))),
    ]
    for raw, (media, ext, caption, meta, convs) in cases:
        s = parse_sample(raw)
        assert len(s.items) == 1 and s.items[0].index == 0 and s.items[0].ref is None
        assert (s.items[0].data, s.items[0].ext, s.items[0].name) == (media, ext, ext)
        assert s.caption == caption and s.meta == meta
        assert (json.dumps(s.conversations) if s.conversations else "") == convs
        assert s.ignored == [] and not s.text_only
    assert parse_sample(cases[0][0]).modalities == ["video"] and parse_sample(cases[1][0]).modalities == ["image"]


def test_several_images_from_a_real_tar_in_numeric_order(jpg, jpg2):
    buf = io.BytesIO()
    members = {"json": js({"conversations": conv("<image>\n<image>\nWhich is brighter?", "The first.")})}
    # written out of order on purpose, and with a two-digit position: order is numeric, not by name or arrival
    samples = [("d/s1", {"10.jpg": jpg2, "2.jpg": jpg, **members})]
    write_tar(buf, samples)
    buf.seek(0)
    [raw] = list(iter_tar_samples(buf))
    assert set(raw.members) == {"10.jpg", "2.jpg", "json"}
    s = parse_sample(raw)
    assert [(it.name, it.index, it.modality) for it in s.items] == [("2.jpg", 0, "image"), ("10.jpg", 1, "image")]
    assert s.items[0].data == jpg and s.items[1].data == jpg2
    assert s.conversations == conv("<image>\n<image>\nWhich is brighter?", "The first.")


def test_bare_member_is_position_zero_and_a_duplicate_position_is_an_error(jpg, jpg2):
    s = parse_sample(RawSample("k", {"1.jpg": jpg2, "jpg": jpg, "txt": b"two"}))
    assert [it.name for it in s.items] == ["jpg", "1.jpg"]
    with pytest.raises(ValueError, match=r"sample 'k': media members 'jpg' and '0.jpg' both take image position 0"):
        parse_sample(RawSample("k", {"jpg": jpg, "0.jpg": jpg2, "txt": b"two"}))
    with pytest.raises(ValueError, match="both take image position 1"):
        parse_sample(RawSample("k", {"1.jpg": jpg, "01.png": jpg2, "txt": b"two"}))


def test_placeholders_match_items_per_modality_in_order(jpg, mp4):
    raw = RawSample("k", {"jpg": jpg, "mp4": mp4,
                          "json": js({"conversations": conv("<image>\nThis photo, then <video> this clip.", "Ok.")})})
    s = parse_sample(raw)
    assert [(it.modality, it.index, it.name) for it in s.items] == [("image", 0, "jpg"), ("video", 1, "mp4")]
    # caption data: member order, then video before image at the same position
    s = parse_sample(RawSample("k", {"jpg": jpg, "mp4": mp4, "txt": b"Both."}))
    assert s.modalities == ["video", "image"] and s.conversations is None
    assert s.conversation() == [{"from": "human", "value": "<video><image>"}, {"from": "gpt", "value": "Both."}]
    s = parse_sample(RawSample("k", {"jpg": jpg, "2.mp4": mp4, "txt": b"Both."}))
    assert s.modalities == ["image", "video"]  # numbered across modalities: the numbers win


def test_json_names_the_order_and_unnamed_media_are_ignored(jpg, jpg2, mp4):
    meta = {"images": ["1.jpg", "k.0.jpg"], "conversations": conv("<image> vs <image>", "Same.")}
    s = parse_sample(RawSample("dir/k", {"0.jpg": jpg, "1.jpg": jpg2, "mp4": mp4, "json": js(meta)}))
    assert [(it.name, it.data) for it in s.items] == [("1.jpg", jpg2), ("0.jpg", jpg)]
    assert s.ignored == ["mp4"]  # the json's lists are the whole truth
    meta = {"videos": ["s3://bucket/clips/a.mp4"], "images": [], "caption": "A clip."}
    s = parse_sample(RawSample("k", {"jpg": jpg, "json": js(meta)}))
    [it] = s.items
    assert (it.modality, it.ref, it.data, it.ext, it.name) == ("video", "s3://bucket/clips/a.mp4", None, "mp4",
                                                                "s3://bucket/clips/a.mp4")
    assert s.ignored == ["jpg"]


@pytest.mark.parametrize("meta,match", [
    ({"images": ["2.jpg"], "caption": "x"}, r"names member '2.jpg', which the sample lacks \(it has: 0.jpg, json\)"),
    ({"videos": ["0.jpg"], "caption": "x"}, "which is not video media"),
    ({"images": "0.jpg", "caption": "x"}, "must be a list of member names"),
    ({"images": [0], "caption": "x"}, "must be a list of member names"),
    ({"images": ["0.jpg"] * 65, "caption": "x"}, "names 65 items, over the limit of 64"),
])
def test_bad_json_media_lists_are_clear_errors(jpg, meta, match):
    with pytest.raises(ValueError, match=match):
        parse_sample(RawSample("k", {"0.jpg": jpg, "json": js(meta)}))


def test_one_item_without_placeholder_gets_it_prepended(mp4):
    c = [{"from": "system", "value": "Be brief."}, *conv("What color?", "Red.")]
    meta = {"conversations": c}
    s = parse_sample(RawSample("k", {"mp4": mp4, "json": js(meta)}))
    assert s.conversations[1] == {"from": "human", "value": "<video>\nWhat color?"}
    assert s.conversations[0] == c[0] and s.meta == meta  # meta stays as read


@pytest.mark.parametrize("members,turns,match", [
    ({"0.jpg": 1}, ("<image> and <image>?", "x"), r"sample 'k': placeholder/media count mismatch: "
                                                  r"2 <image> placeholder\(s\) but 1 image item\(s\)"),
    ({"0.jpg": 1, "1.jpg": 1}, ("Compare.", "x"), r"0 <image> placeholder\(s\) but 2 image item\(s\)"),
    ({"jpg": 1, "mp4": 1}, ("<video> only", "x"), r"0 <image> placeholder\(s\) but 1 image item\(s\)$"),
    ({}, ("<video>\nWhat?", "x"), r"1 <video> placeholder\(s\) but 0 video item\(s\)"),
    ({"jpg": 1}, ("<image>", "<image>"), "placeholders may only appear in user turns, not 'gpt'"),
])
def test_count_mismatch_names_the_key_and_counts(jpg, members, turns, match):
    m = {k: jpg for k in members}
    with pytest.raises(ValueError, match=match):
        parse_sample(RawSample("k", {**m, "json": js({"conversations": conv(*turns)})}))


def test_prepending_needs_a_user_turn(jpg):
    with pytest.raises(ValueError, match="no user turn"):
        parse_sample(RawSample("k", {"jpg": jpg, "json": js({"conversations": [{"from": "gpt", "value": "x"}]})}))


def test_text_only_samples(jpg):
    s = parse_sample(RawSample("t", {"json": js({"conversations": conv("Hi", "Hello")})}))
    assert s.text_only and s.items == [] and s.modalities == [] and s.conversation() == conv("Hi", "Hello")
    s = parse_sample(RawSample("t", {"txt": b"Just words."}))
    assert s.text_only and s.conversation() == [{"from": "human", "value": ""}, {"from": "gpt", "value": "Just words."}]
    with pytest.raises(ValueError, match="has no conversations"):
        s.conversation("conversation")
    with pytest.raises(ValueError, match=r"no media member \(sample has: txt\)"):
        parse_sample(RawSample("t", {"txt": b"Just words."}), SampleConfig(text_only=False))
    with pytest.raises(ValueError, match="missing caption"):
        parse_sample(RawSample("t", {"jpg": jpg, "json": b"{}"}))
    s = parse_sample(RawSample("t", {"json": js({"conversations": conv("Hi", "Hello")})}))
    with pytest.raises(ValueError, match="has no caption"):
        s.conversation("caption")


def test_audio_items_and_a_videos_soundtrack(jpg):
    s = parse_sample(RawSample("a", {"wav": b"RIFF....WAVE", "txt": b"a sound"}))
    assert [(it.modality, it.name) for it in s.items] == [("audio", "wav")]
    assert s.conversation()[0]["value"].startswith("<audio>")
    s = parse_sample(RawSample("a", {"jpg": jpg, "flac": b"fLaC", "json": js({"conversations": conv("<image><audio>",
                                                                                                    "x")})}))
    assert s.modalities == ["image", "audio"]
    # one mp4 named as the video and as its own soundtrack: two items with the same bytes, in placeholder order
    s = parse_sample(RawSample("v", {"mp4": b"mp4 bytes", "json": js({
        "videos": ["mp4"], "audios": ["mp4"], "conversations": conv("<video> and its sound <audio>", "x")})}))
    assert [(it.modality, it.ext) for it in s.items] == [("video", "mp4"), ("audio", "mp4")]
    assert s.items[0].data is s.items[1].data
    with pytest.raises(ValueError, match="names member 'jpg', which is not audio media"):
        parse_sample(RawSample("a", {"jpg": jpg, "json": js({"audios": ["jpg"], "caption": "c"})}))
    with pytest.raises(ValueError, match=r"1 <audio> placeholder\(s\) but 0 audio item"):
        parse_sample(RawSample("a", {"jpg": jpg, "json": js({"conversations": conv("<image><audio>", "x")})}))


def test_hostile_input_is_bounded(jpg):
    many = {f"{i}.jpg": jpg for i in range(65)}
    with pytest.raises(ValueError, match="sample 'h' has 65 media items, over the limit of 64"):
        parse_sample(RawSample("h", {**many, "txt": b"x"}))
    assert len(parse_sample(RawSample("h", {**many, "txt": b"x"}), SampleConfig(max_items=65)).items) == 65
    with pytest.raises(ValueError, match="nested too deeply"):
        parse_sample(RawSample("h", {"jpg": jpg, "json": b"[" * 100000 + b"]" * 100000}))
    with pytest.raises(ValueError, match="json member is 101 bytes, over the 100 limit"):
        parse_sample(RawSample("h", {"jpg": jpg, "json": js({"caption": "x" * 86})}), SampleConfig(max_json_bytes=100))
    for bad, match in ((b"\xff", "not valid UTF-8 JSON"), (b"[1]", "not an object"),
                       (js({"conversations": [{"from": "human"}]}), "non-empty list of {from, value}")):
        with pytest.raises(ValueError, match=match):
            parse_sample(RawSample("h", {"jpg": jpg, "json": bad}))
    with pytest.raises(ValueError, match="caption .* not valid UTF-8"):
        parse_sample(RawSample("h", {"jpg": jpg, "txt": b"\xff"}))
    # not numbered, or numbered absurdly: not an item, listed as ignored (name it in the json to use it)
    s = parse_sample(RawSample("h", {"jpg": jpg, "thumb.jpg": jpg, "1234567.jpg": jpg, "txt": b"x"}))
    assert [it.name for it in s.items] == ["jpg"] and s.ignored == ["1234567.jpg", "thumb.jpg"]


def test_config_and_item_invariants():
    with pytest.raises(ConfigError) as ei:
        validate(SampleConfig, {"max_items": 0, "max_json_bytes": 0})
    assert {p for p, _ in ei.value.problems} == {"max_items", "max_json_bytes"}
    with pytest.raises(ValueError, match="either bytes or a reference"):
        MediaItem("image", "jpg", "jpg", 0)
    with pytest.raises(ValueError, match="either bytes or a reference"):
        MediaItem("image", "jpg", "jpg", 0, data=b"x", ref="a/b.jpg")
    assert Sample("k").text_only


def test_parsed_sample_tokenises_with_one_modality_per_item(jpg, mp4):
    from transformers import AutoTokenizer

    from vlp.data.conversation import VISUAL_TOKEN_INDEX, encode_conversation
    from vlp.models.presets import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("preset:tiny-tokenizer"))
    raw = RawSample("k", {"0.jpg": jpg, "1.mp4": mp4, "txt": b"A photo and a clip.",
                          "json": js({"conversations": conv("<video> after <image>?", "Yes.")})})
    s = parse_sample(raw)
    for fmt, template in (("auto", "vicuna_v1"), ("caption", "plain"), ("auto", "chatml")):
        enc = encode_conversation(s.conversation(fmt), tok, template)
        assert enc.modalities == s.modalities and enc.input_ids.count(VISUAL_TOKEN_INDEX) == len(s.items)
    assert parse_sample(raw).modalities == ["video", "image"]  # the conversation's order


def test_match_placeholders_for_rows_already_made():
    """What a reader of feature rows uses (e.g. lifting an old single-item feature set): the same rules."""
    c = conv("What color?", "Red.")
    out, order = match_placeholders("k", c, ["video"])
    assert out[0]["value"] == "<video>\nWhat color?" and order == [0] and c[0]["value"] == "What color?"
    out, order = match_placeholders("k", conv("<image> then <video> then <image>", "x"), ["video", "image", "image"])
    assert order == [1, 0, 2]  # placeholder k -> index of its item in the row's lists
    assert match_placeholders("k", conv("Hi", "Hello"), []) == (conv("Hi", "Hello"), [])
    with pytest.raises(ValueError, match=r"sample 'k': placeholder/media count mismatch: 2 <image>"):
        match_placeholders("k", conv("<image><image>", "x"), ["image"])
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        match_placeholders("k", c, ["smell"])
