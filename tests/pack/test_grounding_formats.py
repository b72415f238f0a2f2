"""``charades_sta`` and ``refcoco`` annotation formats (files made here in the released shapes): records with the
span / box as answer text and the truth kept under ``grounding``; one error per bad line or ref; refs of other
splits counted as filtered, not errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from vlp.data.grounding import SpanFormat, parse_box, parse_span, square_to_pixels
from vlp.errors import UserError
from vlp.pack.formats import ANNOTATION_FORMATS, PackError, PackRecord, read_annotations

STA = """AO8RW 0.0 6.9##a person is putting a book on a shelf.
Y6R7T 11.6 18.8##person turns off the light.

Y6R7T 20.0 25.5##the person sits down.
X1 4.0 2.0##reversed span.
X2 zero 3##not a number.
NOID 1.0 3.0##no length for this one.
Y6R7T 40.0 45.0##starts after the clip ends.
just words without the separator
"""
CHARADES_CSV = "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\n" \
               "AO8RW,S1,Kitchen,6,7,Yes,x,y,z,c092 0.00 6.90,30.00\n" \
               "Y6R7T,S2,Bedroom,6,7,Yes,x,y,z,,24.50\n" \
               "X1,S3,Hall,6,7,Yes,x,y,z,,10\nX2,S3,Hall,6,7,Yes,x,y,z,,10\n"


def split(out):
    out = list(out)
    return [r for r in out if isinstance(r, PackRecord)], [r for r in out if isinstance(r, PackError)]


@pytest.fixture
def sta(tmp_path):
    (tmp_path / "charades_sta_train.txt").write_text(STA)
    (tmp_path / "Charades_v1_train.csv").write_text(CHARADES_CSV)
    return tmp_path


def test_charades_sta_lines_become_grounding_questions(sta):
    fmt = {"type": "charades_sta", "durations": str(sta / "Charades_v1_train.csv")}
    recs, errs = split(read_annotations(fmt, [str(sta / "charades_sta_train.txt")]))
    assert [r.id for r in recs] == ["AO8RW", "Y6R7T", "Y6R7T"]
    first = recs[0]
    assert first.items[0].path == "AO8RW.mp4" and first.items[0].modality == "video"
    assert first.conversations == [
        {"from": "human", "value": '<video>\nWhen does "a person is putting a book on a shelf." happen in the video?'},
        {"from": "gpt", "value": "[0.00, 0.23]"}]
    assert first.extra["grounding"] == {"task": "temporal_grounding", "span": [0.0, 6.9], "duration": 30.0,
                                        "query": "a person is putting a book on a shelf.",
                                        "format": SpanFormat().model_dump()}
    assert parse_span(first.conversations[1]["value"], 30.0, SpanFormat()) == pytest.approx((0.0, 6.9))
    reasons = {e.id: e.reason for e in errs}
    assert "empty, reversed or negative" in reasons["X1"] and "not numbers" in reasons["X2"]
    assert "no length for video NOID" in reasons["NOID"] and "past the clip's 24.5 s" in errs[3].reason
    assert "not 'VIDEOID START END##SENTENCE'" in errs[-1].reason and errs[-1].id is None
    assert len(errs) == 5 and [r.index for r in recs + errs] == sorted(r.index for r in recs + errs)


def test_charades_sta_in_seconds_needs_no_lengths_and_bad_lengths_files_are_one_error(sta, tmp_path):
    fmt = {"type": "charades_sta", "span": {"unit": "seconds"}, "question": "When: {sentence}"}
    recs, errs = split(read_annotations(fmt, [str(sta / "charades_sta_train.txt")]))
    assert recs[0].conversations[1]["value"] == "[0.0, 6.9]" and "NOID" in [r.id for r in recs]
    (tmp_path / "bad.csv").write_text("video,seconds\nAO8RW,30\n")
    with pytest.raises(UserError, match="needs the columns id and length"):
        list(read_annotations({"type": "charades_sta", "durations": str(tmp_path / "bad.csv")},
                              [str(sta / "charades_sta_train.txt")]))
    with pytest.raises(ValueError, match="template"):
        ANNOTATION_FORMATS.config({"type": "charades_sta", "span": {"template": "{start}"}})


INSTANCES = {
    "images": [{"id": 581857, "file_name": "COCO_train2014_000000581857.jpg", "width": 640, "height": 480},
               {"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "width": 100, "height": 200}],
    "annotations": [{"id": 1719310, "image_id": 581857, "bbox": [103.93, 299.99, 134.22, 177.41],
                     "category_id": 1, "area": 1.0, "iscrowd": 0, "segmentation": [[1, 2, 3]]},
                    {"id": 5, "image_id": 9, "bbox": [10, 20, 0, 5]},
                    {"id": 6, "image_id": 9, "bbox": [150, 20, 10, 5]},
                    {"id": 7, "image_id": 404, "bbox": [1, 1, 1, 1]}]}
REFS = [
    {"ref_id": 0, "ann_id": 1719310, "image_id": 581857, "split": "train", "category_id": 1,
     "file_name": "COCO_train2014_000000581857_1719310.jpg",
     "sentences": [{"tokens": ["the", "lady"], "raw": "The lady", "sent_id": 0, "sent": "the lady with the blue shirt"},
                   {"sent": "lady in blue", "sent_id": 1}]},
    {"ref_id": 1, "ann_id": 1719310, "image_id": 581857, "split": "testA", "sentences": [{"sent": "x"}]},
    {"ref_id": 2, "ann_id": 5, "image_id": 9, "split": "train", "sentences": [{"sent": "flat"}]},
    {"ref_id": 3, "ann_id": 6, "image_id": 9, "split": "train", "sentences": [{"sent": "outside"}]},
    {"ref_id": 4, "ann_id": 7, "image_id": 404, "split": "train", "sentences": [{"sent": "lost"}]},
    {"ref_id": 5, "ann_id": 99, "image_id": 9, "split": "train", "sentences": [{"sent": "none"}]},
    {"ref_id": 6, "ann_id": 1719310, "image_id": 581857, "split": "train", "sentences": []},
    {"ref_id": 7, "ann_id": "abc", "split": "train", "sentences": [{"sent": "bad id"}]},
]


def test_refcoco_refs_become_box_questions_with_the_truth_in_pixels(tmp_path):
    (tmp_path / "instances.json").write_text(json.dumps(INSTANCES))
    (tmp_path / "refs_unc.json").write_text(json.dumps(REFS))
    filtered: Counter = Counter()
    fmt = {"type": "refcoco", "instances": str(tmp_path / "instances.json"), "split": "train",
           "image_pattern": "train2014/{file_name}"}
    recs, errs = split(read_annotations(fmt, [str(tmp_path / "refs_unc.json")], filtered=filtered))
    assert filtered == {"split testA": 1}  # counted, not an error, and no index taken
    assert [r.id for r in recs] == ["0"] and recs[0].items[0].path == "train2014/COCO_train2014_000000581857.jpg"
    conv = recs[0].conversations
    assert [t["from"] for t in conv] == ["human", "gpt", "human", "gpt"]
    assert conv[0]["value"] == '<image>\nWhere is "the lady with the blue shirt" in the image?'
    assert conv[1]["value"] == conv[3]["value"] and conv[2]["value"] == 'Where is "lady in blue" in the image?'
    g = recs[0].extra["grounding"]
    assert g["task"] == "referring" and (g["width"], g["height"]) == (640, 480) and g["query"].startswith("the lady")
    assert g["box"] == pytest.approx([103.93, 299.99, 238.15, 477.4])
    back = square_to_pixels(parse_box(conv[1]["value"]), 640, 480)
    assert back == pytest.approx(g["box"], abs=640 * 0.0006)  # 3 decimals of the 640 px square
    reasons = {e.id: e.reason for e in errs}
    assert "has no area" in reasons["2"] and "outside its 100x200 image" in reasons["3"]
    assert "image_id 404 is not in the instances" in reasons["4"] and "ann_id 99 is not" in reasons["5"]
    assert "no sentence" in reasons["6"] and "'ann_id' must be an integer id" in reasons["7"]
    assert [r.index for r in recs + errs] == list(range(7))
    everything = Counter()
    recs, _ = split(read_annotations({**fmt, "split": None}, [str(tmp_path / "refs_unc.json")], filtered=everything))
    assert not everything and [r.id for r in recs] == ["0", "1"]
