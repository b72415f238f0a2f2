"""vlp.pack.formats: annotation files (made here, in the released files' shapes) -> PackRecord / PackError."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SHARED_MEDIA

from vlp.config import Cfg, ConfigError, validate
from vlp.errors import UserError
from vlp.pack.formats import (ANNOTATION_FORMATS, AnnotationFileError, AnnotationsNotFound, PackError, PackRecord,
                              expand_annotations, read_annotations)

ROOT = Path(__file__).resolve().parents[2]


def write_json(path: Path, records) -> str:
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1))
    return str(path)


def read(fmt, paths, **kw):
    return list(read_annotations(fmt if isinstance(fmt, dict) else {"type": fmt, **kw}, paths))


def split(out):
    return [r for r in out if isinstance(r, PackRecord)], [r for r in out if isinstance(r, PackError)]


def human(v):
    return {"from": "human", "value": v}


def gpt(v):
    return {"from": "gpt", "value": v}


# --------------------------------------------------------------------------------------------------- llava

LLAVA = [
    # blip_laion_cc_sbu_558k.json
    {"id": "004539375", "image": "00453/004539375.jpg",
     "conversations": [human("Render a clear and concise summary of the photo.\n<image>"),
                       gpt("select luxury furniture 3 - inch gel memory foam mattress topper")]},
    # llava_instruct_150k.json / llava_v1_5_mix665k.json
    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [human("<image>\nWhat are the colors of the bus in the image?"),
                       gpt("The bus in the image is white and red."),
                       human("What feature can be seen on the back of the bus?"),
                       gpt("The back of the bus features an advertisement.")]},
    # llava_v1_5_mix665k.json text-only (ShareGPT) row: no "image"
    {"id": "i6IyJda_0", "conversations": [human("How to tell if a customer segment is well segmented?"),
                                          gpt("1. Homogeneity 2. Distinctiveness 3. Stability")]},
    # an image row whose question has no placeholder: <image>\n is prepended (vlp's rule)
    {"id": "a/b c:1", "image": "ocr_vqa/images/140031996.jpg",
     "conversations": [human("Who wrote this book?"), gpt("Clay Bennett")]},
    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",  # a repeated id
     "conversations": [human("<image>\nIs the bus moving?"), gpt("Yes.")]},
]
LLAVA_BAD = [
    ({"id": "m1", "image": "coco/x.jpg"}, "missing 'conversations'"),
    ({"id": "m2", "conversations": "What is it?"}, "conversations must be a non-empty list"),
    ({"id": "m3", "image": 7, "conversations": [human("<image>\nHi"), gpt("Yo")]},
     "'image' must be a path or a list of paths"),
    ({"id": "m4", "conversations": [human("<image>\nWhat is it?"), gpt("A cat.")]},
     "1 <image> placeholder(s) but 0 image item(s)"),
    ({"id": "m5", "image": "coco/y.jpg", "conversations": [human("<image><image>\nSame?"), gpt("No.")]},
     "2 <image> placeholder(s) but 1 image item(s)"),
    ({"id": "m6", "image": "coco/z.jpg", "conversations": [gpt("Hello"), human("<image>")]}, "must alternate"),
    ({"id": "m7", "conversations": [human("Hi"), {"from": "gpt", "value": 3}]}, "string 'from' and 'value'"),
    (42, "record is a int, not an object"),
]


def test_llava_records_errors_and_text_only(tmp_path):
    records = LLAVA[:2] + [b for b, _ in LLAVA_BAD[:4]] + LLAVA[2:] + [b for b, _ in LLAVA_BAD[4:]]
    out = read("llava", [write_json(tmp_path / "llava_v1_5_mix665k.json", records)])
    assert [r.index for r in out] == list(range(len(records)))  # every record counted, reading went on
    ok, bad = split(out)
    assert [r.id for r in ok] == [r["id"] for r in LLAVA]
    first, second, text_only, prepended, repeated = ok
    assert [(it.modality, it.path) for it in first.items] == [("image", "00453/004539375.jpg")]
    assert first.conversations == LLAVA[0]["conversations"] and first.caption is None
    assert second.source == LLAVA[1] and len(second.conversations) == 4
    assert text_only.items == [] and text_only.conversations == LLAVA[2]["conversations"]
    assert prepended.conversations[0]["value"] == "<image>\nWho wrote this book?"
    assert prepended.source["conversations"][0]["value"] == "Who wrote this book?"  # the source is unchanged
    assert prepended.id == "a/b c:1" and repeated.id == second.id  # ids kept as written; the key is the index
    assert [e.id for e in bad] == [b.get("id") if isinstance(b, dict) else None for b, _ in LLAVA_BAD]
    for e, (_, why) in zip(bad, LLAVA_BAD):
        assert why in e.reason, (e.reason, why)
    assert all(e.file.endswith("llava_v1_5_mix665k.json") for e in bad)


def test_oversized_record_in_a_json_array_is_an_error_and_reading_goes_on(tmp_path):
    big = {"id": "big", "image": "x.jpg", "conversations": [human("<image>\n" + "word " * 1000), gpt("ok " * 900)]}
    deep = {"id": "deep", "conversations": [[[[[]]]]] * 100}  # many small events count too
    path = write_json(tmp_path / "a.json", [LLAVA[0], big, deep, LLAVA[1]])
    out = read("llava", [path], max_record_bytes=4096)
    assert [type(r).__name__ for r in out] == ["PackRecord", "PackError", "PackError", "PackRecord"]
    assert "over max_record_bytes (4096 bytes)" in out[1].reason and out[3].id == "000000033471"


def test_a_token_bigger_than_4x_the_limit_ends_its_file_without_being_held(tmp_path):
    huge = {"id": "huge", "conversations": [human("w" * 40000), gpt("ok")]}  # one string: the parser would hold it
    escaped = {"id": "esc", "conversations": [human('\\"' * 20000), gpt("ok")]}  # escaped quotes do not reset it
    a = write_json(tmp_path / "a.json", [LLAVA[0], huge, LLAVA[1]])
    b = write_json(tmp_path / "b.json", [escaped])
    c = write_json(tmp_path / "c.json", [LLAVA[2]])
    out = read("llava", [a, b, c], max_record_bytes=4096)
    assert [(r.index, type(r).__name__) for r in out] == [(0, "PackRecord"), (1, "PackError"), (2, "PackError"),
                                                          (3, "PackRecord")]
    assert "string or number of over 16384 bytes (4 x max_record_bytes)" in out[1].reason
    assert "the rest of the file is skipped" in out[2].reason and out[3].id == "i6IyJda_0"


def test_broken_json_array_ends_that_file_and_the_next_file_goes_on(tmp_path):
    good = json.dumps(LLAVA[:2])
    (tmp_path / "a.json").write_text(good[:-1] + ', {"id": "x", "conversations": [}, ' + json.dumps(LLAVA[2]) + "]")
    (tmp_path / "b.json").write_text(json.dumps({"not": "an array"}))
    (tmp_path / "c.json").write_text(json.dumps(LLAVA[3:4]))
    out = read("llava", [str(tmp_path / n) for n in ("c.json", "b.json", "a.json")])
    assert [(r.index, type(r).__name__) for r in out] == [
        (0, "PackRecord"), (1, "PackRecord"), (2, "PackError"), (3, "PackError"), (4, "PackRecord")]
    assert "not valid JSON from here on" in out[2].reason and "not a JSON array" in out[3].reason
    assert out[4].id == "a/b c:1"


def test_jsonl_lines_bad_json_oversized_blank_and_no_final_newline(tmp_path):
    lines = [json.dumps(LLAVA[0]), "{not json", "", json.dumps({**LLAVA[1], "pad": "x" * 5000}),
             json.dumps(LLAVA[2])]
    p = tmp_path / "llava.jsonl"
    p.write_text("\n".join(lines))  # no newline after the last line
    out = read("llava", [str(p)], max_record_bytes=2048)
    assert [type(r).__name__ for r in out] == ["PackRecord", "PackError", "PackError", "PackRecord"]
    assert "line is not JSON" in out[1].reason and "over max_record_bytes (2048 bytes)" in out[2].reason
    assert out[3].id == "i6IyJda_0" and out[3].index == 3


def test_indices_are_deterministic_over_sorted_files(tmp_path):
    b = write_json(tmp_path / "part-b.json", LLAVA[2:4])
    a = write_json(tmp_path / "part-a.json", LLAVA[:2])
    (tmp_path / "part-c.jsonl").write_text("\n".join(json.dumps(r) for r in LLAVA[4:]) + "\n")
    files = expand_annotations(str(tmp_path / "part-*"))
    assert files == sorted(files) and [Path(f).name for f in files] == ["part-a.json", "part-b.json", "part-c.jsonl"]
    runs = [[(r.index, r.id, r.file) for r in read("llava", order)] for order in (files, [b, a, files[2], b])]
    assert runs[0] == runs[1]
    assert [(i, rid) for i, rid, _ in runs[0]] == [(i, r["id"]) for i, r in enumerate(LLAVA)]


# ---------------------------------------------------------------------------------------- valley, video-chatgpt

def test_valley(tmp_path):
    q = [human("<video>\nDescribe this video."), gpt("A man is surfing on a big wave.")]
    records = [
        {"id": "1021133926", "video": "1021133926.mp4", "conversations": q},  # pretrain (webvid)
        {"id": "v_yj6YHU9K8bo", "video": "v_yj6YHU9K8bo", "source": "VATEX",  # instruct, no extension
         "conversations": [human("What is happening?"), gpt("People dance."), human("Where?"), gpt("A hall.")]},
        {"id": "21_jukin", "video": "1045.mp4", "source": 5, "conversations": q},
        {"id": "no_conv", "video": "1.mp4"},
        {"id": "img", "image": "COCO_train2014_000000000009.jpg", "conversations": [human("<image>\nWhat?"), gpt("A")]},
    ]
    ok, bad = split(read("valley", [write_json(tmp_path / "valley_instruct.json", records)]))
    assert [it.path for r in ok for it in r.items] == ["webvid/1021133926.mp4", "VATEX/v_yj6YHU9K8bo.mp4",
                                                      "COCO_train2014_000000000009.jpg"]
    assert ok[1].conversations[0]["value"] == "<video>\nWhat is happening?"
    assert [(e.id, e.reason) for e in bad] == [
        ("21_jukin", "'source' must be a non-empty string (a media path), got a int"),
        ("no_conv", "missing 'conversations'")]
    flat = read("valley", [str(tmp_path / "valley_instruct.json")], use_source=False)
    assert flat[0].items[0].path == "1021133926.mp4"


def test_videochatgpt(tmp_path):
    records = [
        {"video_id": "v_k_ZXmr8pmrs", "q": "What is the man doing in the video?", "a": "He is cleaning a car."},
        {"video_id": "v_k_ZXmr8pmrs", "q": "Where is he?\n<video>", "a": "In a driveway."},
        {"video_id": "v_abc", "q": "What?"},
        {"video_id": "v_abc", "q": 3, "a": "x"},
        {"video_id": "v_abc", "q": "<video><video> same?", "a": "x"},
        {"q": "x", "a": "y"},
    ]
    out = read("videochatgpt", [write_json(tmp_path / "VideoInstruct100K.json", records)])
    ok, bad = split(out)
    assert [r.id for r in ok] == ["v_k_ZXmr8pmrs"] * 2
    assert ok[0].conversations == [human("<video>\nWhat is the man doing in the video?"), gpt("He is cleaning a car.")]
    assert ok[1].conversations[0]["value"] == "Where is he?\n<video>"
    item = ok[0].items[0]
    assert (item.modality, item.path, item.candidates) == ("video", "v_k_ZXmr8pmrs.mp4",
                                                           ["v_k_ZXmr8pmrs.mkv", "v_k_ZXmr8pmrs.webm"])
    assert [e.reason for e in bad] == ["missing 'a'", "'q' must be a non-empty string, got a int",
                                       "sample 'v_abc': placeholder/media count mismatch: 2 <video> placeholder(s) "
                                       "but 1 video item(s)", "missing 'video_id'"]
    one = read("videochatgpt", [str(tmp_path / "VideoInstruct100K.json")], video_pattern="anet/{video_id}.mp4")
    assert (one[0].items[0].path, one[0].items[0].candidates) == ("anet/v_k_ZXmr8pmrs.mp4", [])


def test_format_configs_are_typed_and_registered():
    class PackCfg(Cfg):
        format: ANNOTATION_FORMATS.field

    cfg = validate(PackCfg, {"format": {"type": "videochatgpt", "extensions": ["mp4"]}})
    assert type(cfg.format).__name__ == "Cfg" and cfg.format.extensions == ["mp4"]
    assert cfg.model_dump()["format"]["video_pattern"] == "{video_id}.{ext}"
    for data, where in [({"type": "llava2"}, "format.type"), ({"type": "llava", "colour": 1}, "format.colour"),
                        ({"type": "videochatgpt", "video_pattern": "{video_id.__class__}"}, "format.video_pattern"),
                        ({"type": "captions", "media_column": "a", "path_pattern": "{b}"}, "format")]:
        with pytest.raises(ConfigError) as e:
            validate(PackCfg, {"format": data})
        assert [p for p, _ in e.value.problems] == [where]
    assert ANNOTATION_FORMATS.names() == ["captions", "charades_sta", "llava", "refcoco", "sharegpt", "valley",
                                         "videochatgpt"]


# -------------------------------------------------------------------------------------------------- sharegpt

def msg(role, content):
    return {"role": role, "content": content}


def test_sharegpt_multi_image_system_and_errors(tmp_path):
    records = [
        {"messages": [msg("user", "<image>Who are they?"), msg("assistant", "Kane and Gretzka."),
                      msg("user", "What are they doing?<image>"), msg("assistant", "Celebrating.")],
         "images": ["mllm_demo_data/1.jpg", "mllm_demo_data/2.jpg"]},
        {"messages": [msg("system", "You are a sports commentator."), msg("user", "<video><audio>What is said?"),
                      msg("assistant", "Hello!")],
         "videos": ["mllm_demo_data/4.mp4"], "audios": ["mllm_demo_data/4.mp3"]},
        {"system": "Answer briefly.", "messages": [msg("user", "Hi"), msg("assistant", "Hello.")]},
        {"messages": [msg("user", "<image>Hi"), msg("observation", "{}")], "images": ["a.jpg"]},
        {"messages": [msg("user", "<image><image>Compare"), msg("assistant", "Same")], "images": ["a.jpg"]},
        {"messages": [msg("user", "<image>Hi"), msg("assistant", "Hey"), msg("user", "And?")], "images": ["a.jpg"]},
        {"messages": [msg("user", "<image>Hi"), msg("assistant", "Hey")], "images": "a.jpg,b.jpg"},
        {"messages": [msg("user", "<image>Hi"), msg("assistant", "Hey")], "images": {"0": "a.jpg"}},
        {"images": ["a.jpg"]},
        {"messages": [msg("user", "Hi"), msg("system", "late"), msg("assistant", "Hey")]},
    ]
    p = tmp_path / "mllm.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    ok, bad = split(read("sharegpt", [str(p)]))
    multi, av, sys_col, single = ok
    assert [it.path for it in multi.items] == ["mllm_demo_data/1.jpg", "mllm_demo_data/2.jpg"]
    assert [t["from"] for t in multi.conversations] == ["human", "gpt", "human", "gpt"]
    assert multi.conversations[2]["value"] == "What are they doing?<image>" and multi.system is None
    assert av.system == "You are a sports commentator." and av.conversations[0] == {
        "from": "system", "value": "You are a sports commentator."}
    assert [(it.modality, it.path) for it in av.items] == [("video", "mllm_demo_data/4.mp4"),
                                                           ("audio", "mllm_demo_data/4.mp3")]
    assert sys_col.conversations[0] == {"from": "system", "value": "Answer briefly."} and sys_col.items == []
    assert single.items[0].path == "a.jpg,b.jpg"  # one string = one path (as LLaMA-Factory reads it)
    assert [(e.index, e.reason) for e in bad] == [
        (3, "messages[1] has role 'observation'; only user, assistant and a first system message are supported"),
        (4, "sample '#4': placeholder/media count mismatch: 2 <image> placeholder(s) but 1 image item(s)"),
        (5, "'messages' must end with an assistant message (LLaMA-Factory skips such records)"),
        (7, "'images' must be a path or a list of paths, got a dict"),
        (8, "missing 'messages'"),
        (9, "messages: a system turn may only come first, before a user turn")]


@pytest.mark.skipif(not SHARED_MEDIA.is_dir(), reason="shared LLaMA-Factory demo media not present")
def test_sharegpt_llamafactory_demo_files():
    files = expand_annotations(str(SHARED_MEDIA / "mllm_*.json"))
    assert [Path(f).name for f in files] == ["mllm_audio_demo.json", "mllm_demo.json", "mllm_video_audio_demo.json",
                                             "mllm_video_demo.json"]
    out = read("sharegpt", files)
    ok, bad = split(out)
    assert bad == [] and len(ok) == sum(len(json.loads(Path(f).read_text())) for f in files)
    assert {it.modality for r in ok for it in r.items} == {"image", "video", "audio"}
    assert max(len(r.items) for r in ok) == 2
    for r in ok:  # the paths are relative to the demo folder (the media root) and name real files
        assert all((SHARED_MEDIA / it.path).is_file() for it in r.items), r.items
        n = sum(t["value"].count(f"<{it}>") for t in r.conversations for it in ("image", "video", "audio"))
        assert n == len(r.items)


# -------------------------------------------------------------------------------------------------- captions

WEBVID_HEADER = ["videoid", "contentUrl", "duration", "page_dir", "name"]


def test_captions_webvid_csv(tmp_path):
    p = tmp_path / "results_2M_train.csv"
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(WEBVID_HEADER)
        w.writerow(["21179416", "https://ak.picdn.net/shutterstock/videos/21179416/preview/stock-footage-aerial-"
                    "shot-winter-forest.mp4", "PT00H00M11S", "006001_006050", "Aerial shot winter forest"])
        w.writerow(["5629184", "https://x/5629184.mp4", "PT00H00M29S", "1057501_1057550",
                    "Fireworks, celebration, new year's eve, \"2020\""])
        w.writerow(["1", "u", "PT00H00M01S", "p"])  # a field short
        w.writerow(["2", "u", "PT00H00M01S", "p", "   "])  # a blank caption
        w.writerow(["3", "u", "PT00H00M01S", "", "no folder"])
    with p.open("ab") as f:
        f.write(b"4,u,PT00H00M01S,p,caf\xe9 latin-1\n5,u,PT00H00M01S,0001_0050,last row\n")
    cfg = {"type": "captions", "path_pattern": "{page_dir}/{videoid}.mp4", "caption_column": "name",
           "id_column": "videoid"}
    out = read(cfg, [str(p)])
    ok, bad = split(out)
    assert [(r.id, r.items[0].modality, r.items[0].path, r.caption) for r in ok] == [
        ("21179416", "video", "006001_006050/21179416.mp4", "Aerial shot winter forest"),
        ("5629184", "video", "1057501_1057550/5629184.mp4", "Fireworks, celebration, new year's eve, \"2020\""),
        ("5", "video", "0001_0050/5.mp4", "last row")]
    assert all(r.conversations is None and set(r.source) == set(WEBVID_HEADER) for r in ok)
    assert [(e.index, e.id) for e in bad] == [(2, None), (3, "2"), (4, "3"), (5, None)]
    assert "row has 4 fields, the header has 5" in bad[0].reason
    assert "caption column 'name' must be a non-empty string" in bad[1].reason
    assert "field 'page_dir'" in bad[2].reason and "not valid UTF-8" in bad[3].reason


def test_captions_parquet_jsonl_and_modality(tmp_path):
    pq.write_table(pa.table({"image": ["GCC_train_000000000.jpg", "GCC_train_000000001.jpg", None, "a.bin"],
                             "caption": ["a very typical bus station", "sierra looked stunning", "x", "y"]}),
                   tmp_path / "cc3m.parquet")
    ok, bad = split(read({"type": "captions", "media_column": "image"}, [str(tmp_path / "cc3m.parquet")]))
    assert [(r.items[0].modality, r.items[0].path, r.caption) for r in ok] == [
        ("image", "GCC_train_000000000.jpg", "a very typical bus station"),
        ("image", "GCC_train_000000001.jpg", "sierra looked stunning")]
    assert ["media column 'image' must be a non-empty string" in bad[0].reason,
            "cannot tell the modality of 'a.bin'" in bad[1].reason] == [True, True]
    (tmp_path / "keys.jsonl").write_text('{"key": "s3key/000123", "text": "a dog"}\n')
    recs = read({"type": "captions", "media_column": "key", "caption_column": "text", "modality": "image"},
                [str(tmp_path / "keys.jsonl")])
    assert (recs[0].items[0].modality, recs[0].items[0].path) == ("image", "s3key/000123")


# ------------------------------------------------------------------------------------ files: expand, kinds, S3

def test_expand_annotations_and_file_kinds(tmp_path):
    (tmp_path / "ann").mkdir()
    write_json(tmp_path / "ann" / "b.json", LLAVA[:1])
    write_json(tmp_path / "ann" / "a.json", LLAVA[1:2])
    (tmp_path / "ann" / "notes.txt").write_text("x")
    assert [Path(f).name for f in expand_annotations(str(tmp_path / "ann"))] == ["a.json", "b.json"]
    assert expand_annotations([str(tmp_path / "ann" / "b.json"), str(tmp_path / "ann/*.json")]) == \
        [str(tmp_path / "ann" / "a.json"), str(tmp_path / "ann" / "b.json")]
    for pattern, why in [(tmp_path / "ann" / "*.jsonl", "the glob matched no file"),
                         (tmp_path / "missing.json", "no such file")]:
        with pytest.raises(AnnotationsNotFound) as e:
            expand_annotations(str(pattern))
        assert isinstance(e.value, UserError) and str(e.value) == f"--annotations {pattern}: {why}"
    (tmp_path / "ann" / "notes.md").write_text("x")
    with pytest.raises(AnnotationFileError, match="notes.md: unknown extension"):
        read_annotations({"type": "llava"}, [str(tmp_path / "ann" / "notes.md")])  # raised before reading
    with pytest.raises(AnnotationFileError, match="format 'llava' reads json/jsonl files, not lines"):
        read_annotations({"type": "llava"}, [str(tmp_path / "ann" / "notes.txt")])  # .txt named: lines
    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    with pytest.raises(AnnotationFileError, match="format 'llava' reads json/jsonl files, not csv"):
        read_annotations({"type": "llava"}, [str(tmp_path / "t.csv")])
    assert read("llava", [str(tmp_path / "ann" / "notes.txt")], file_kind="jsonl")[0].reason.startswith(
        "line is not JSON")


def test_files_through_fsspec_urls():
    fs = fsspec.filesystem("memory")
    fs.pipe("/vlp-pack-test/ann/part-1.json", json.dumps(LLAVA[:2]).encode())
    fs.pipe("/vlp-pack-test/ann/part-0.jsonl", (json.dumps(LLAVA[2]) + "\n").encode())
    try:
        files = expand_annotations("memory://vlp-pack-test/ann/part-*")
        assert files == ["memory:///vlp-pack-test/ann/part-0.jsonl", "memory:///vlp-pack-test/ann/part-1.json"]
        assert expand_annotations("memory://vlp-pack-test/ann") == files
        assert [r.id for r in read("llava", files)] == ["i6IyJda_0", "004539375", "000000033471"]
    finally:
        fs.rm("/vlp-pack-test", recursive=True)


# --------------------------------------------------------------------------------------------- bounded memory

def test_a_big_json_array_is_streamed_not_loaded(tmp_path):
    """~64 MB array: reading it all grows the reader's peak RSS by a small fraction of the file."""
    path = tmp_path / "llava_big.json"
    rec = dict(LLAVA[1], conversations=LLAVA[1]["conversations"] + [human("x " * 400), gpt("y " * 400)])
    chunk = ",\n".join(json.dumps(dict(rec, id=f"{i:09d}")) for i in range(1000))
    with path.open("w") as f:
        f.write("[\n")
        for i in range(igroups := 28):
            f.write(chunk + (",\n" if i < igroups - 1 else "\n"))
        f.write("]\n")
    size = path.stat().st_size
    assert size > 50 << 20
    script = textwrap.dedent(f"""
        import resource, sys
        from vlp.pack.formats import PackRecord, read_annotations
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        n = sum(isinstance(r, PackRecord) for r in read_annotations({{"type": "llava"}}, [{str(path)!r}]))
        print(n, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    n, growth = map(int, res.stdout.split())
    assert n == 28000
    assert growth < size / 8, f"peak RSS grew {growth} bytes reading a {size}-byte file"
