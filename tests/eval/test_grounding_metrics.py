"""Grounding metrics: IoU, R@1 at IoU 0.3/0.5/0.7, mIoU, Acc@0.5, unreadable answers counted as wrong and listed, and
the best constant answer as the baseline."""

from __future__ import annotations

import pytest

from vlp.data.grounding import SpanFormat, parse_box, parse_span
from vlp.eval.grounding import (GroundingTally, best_constant_box, best_constant_span, constant_baseline, iou_1d,
                                iou_2d, metrics_of)


def test_iou_of_spans_and_boxes():
    assert iou_1d((0, 10), (5, 15)) == pytest.approx(5 / 15)
    assert iou_1d((0, 10), (0, 10)) == 1.0 and iou_1d((0, 5), (5, 10)) == 0.0 and iou_1d((3, 3), (0, 10)) == 0.0
    assert iou_2d((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert iou_2d((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0 and iou_2d((0, 0, 0, 5), (0, 0, 1, 5)) == 0.0


def test_temporal_metrics_count_unreadable_answers_as_wrong_and_list_them():
    t = GroundingTally("temporal_grounding")
    fmt, dur = SpanFormat(), 10.0
    truth = (2.0, 6.0)
    for uid, answer in [("a", "[0.2, 0.6]"), ("b", "[0.3, 0.6]"), ("c", "[0.0, 0.4]"), ("d", "no idea")]:
        t.add(uid, answer, parse_span(answer, dur, fmt), truth, iou_1d)
    m = t.metrics()
    assert m["n"] == 4 and t.unparseable == [("d", "no idea")]
    assert t.ious == pytest.approx([1.0, 0.75, 2 / 6, 0.0])
    assert m["R@1@0.3"] == 0.75 and m["R@1@0.5"] == 0.5 and m["R@1@0.7"] == 0.5
    assert m["mIoU"] == pytest.approx((1 + 0.75 + 2 / 6) / 4)


def test_referring_accuracy_at_half_iou():
    t = GroundingTally("referring")
    truth = (0.1, 0.1, 0.5, 0.5)
    for uid, answer in [("a", "[0.1, 0.1, 0.5, 0.5]"), ("b", "[0.3, 0.3, 0.7, 0.7]"), ("c", "[0.1, 0.1, 0.5]")]:
        t.add(uid, answer, parse_box(answer), truth, iou_2d)
    m = t.metrics()
    assert m["Acc@0.5"] == pytest.approx(1 / 3) and m["n"] == 3 and [u for u, _ in t.unparseable] == ["c"]
    assert metrics_of("referring", []) == {"Acc@0.5": 0.0, "mIoU": 0.0, "n": 0}


def test_the_best_constant_answer_finds_what_the_truths_share():
    # every event sits in the middle half of its clip: answering [0.25, 0.75] always gets IoU 1
    truths = [(2.5, 7.5), (5.0, 15.0), (1.0, 3.0)]
    span, r = best_constant_span(truths, [10.0, 20.0, 4.0])
    assert span == pytest.approx((0.25, 0.75)) and r == 1.0
    spread = [(0.0, 1.0), (4.0, 5.0), (8.0, 9.0), (2.0, 3.0)]
    _, r = best_constant_span(spread, [10.0] * 4)
    assert r == 0.25  # disjoint short events: one constant catches one of four
    box, acc = best_constant_box([(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)])
    assert acc == 0.5
    b = constant_baseline("referring", [(0.2, 0.2, 0.4, 0.4)])
    assert b["metric"] == "Acc@0.5" and b["value"] == 1.0


def test_answers_are_read_with_the_rows_own_format_and_boxes_mapped_to_pixels():
    from vlp.eval.grounded import baseline_of, score_answer, truth_of

    t = GroundingTally("temporal_grounding")
    g = {"task": "temporal_grounding", "span": [2.0, 6.0], "duration": 10.0,
         "format": SpanFormat(unit="seconds").model_dump()}
    assert score_answer("temporal_grounding", g, "[2.0, 6.0]", "a", t) == 1.0  # seconds, as the row was written
    g_rel = {**g, "format": SpanFormat().model_dump()}
    assert score_answer("temporal_grounding", g_rel, "[0.2, 0.6]", "b", t) == pytest.approx(1.0)
    r = GroundingTally("referring")
    box = {"task": "referring", "box": [0.0, 50.0, 100.0, 100.0], "width": 200, "height": 100}
    # the bottom-left quarter of a 200 x 100 image: on its padded 200 x 200 square y runs 100..150
    assert score_answer("referring", box, "[0.0, 0.5, 0.5, 0.75]", "c", r) == pytest.approx(1.0)
    assert score_answer("referring", box, "somewhere", "d", r) == 0.0 and r.unparseable == [("d", "somewhere")]
    row = {"meta": '{"grounding": {"task": "referring", "box": [0, 0, 1, 1]}}'}
    assert truth_of(row, "referring")["box"] == [0, 0, 1, 1] and truth_of(row, "temporal_grounding") is None
    assert truth_of({"meta": ""}, "referring") is None
    b = baseline_of("referring", [box, box])
    assert b["value"] == 1.0 and b["answer"] == pytest.approx([0.0, 0.5, 0.5, 1.0])
