"""Spans and boxes as text: written in the configured format, read back from answers of every shape a model may
give (malformed, reversed, out of range), boxes mapped between the padded square and the original pixels."""

from __future__ import annotations

import pytest

from vlp.config import ConfigError, validate
from vlp.data.grounding import (SpanFormat, box_to_text, pad_offset, parse_box, parse_span, span_to_text,
                                square_to_pixels, xywh_to_xyxy)

REL = SpanFormat()
SEC = SpanFormat(unit="seconds")


def test_spans_round_trip_in_both_units():
    assert span_to_text((6.9, 14.4), 30.0, REL) == "[0.23, 0.48]"
    assert span_to_text((14.4, 6.9), 30.0, REL) == "[0.23, 0.48]"  # given reversed: written in order
    assert span_to_text((6.9, 14.4), 30.0, SEC) == "[6.9, 14.4]"
    assert parse_span("[0.23, 0.48]", 30.0, REL) == pytest.approx((6.9, 14.4))
    assert parse_span("It happens at [6.9, 14.4].", 30.0, SEC) == (6.9, 14.4)
    own = SpanFormat(template="from {start} to {end}", decimals=3)
    assert span_to_text((3, 6), 12, own) == "from 0.250 to 0.500"
    assert parse_span(span_to_text((3, 6), 12, own), 12, own) == (3.0, 6.0)


@pytest.mark.parametrize("text,want", [
    ("{0.1, 0.5}", (1.0, 5.0)), ("(0.1,0.5)", (1.0, 5.0)), ("0.1 - 0.5", (1.0, 5.0)), ("0.1 to 0.5", (1.0, 5.0)),
    ("[0.5, 0.1]", (1.0, 5.0)),                  # reversed: put in order
    ("[-0.2, 0.3]", (0.0, 3.0)), ("[0.8, 1.7]", (8.0, 10.0)),  # clipped to the clip
    ("[.25, .5]", (2.5, 5.0)),
])
def test_spans_are_read_from_answers_of_many_shapes(text, want):
    assert parse_span(text, 10.0, REL) == pytest.approx(want)


@pytest.mark.parametrize("text", ["", "at the start", "[0.3]", "[0.4, 0.4]", "[1.2, 1.5]", "[a, b]", "[-0.5, -0.1]"])
def test_unreadable_or_empty_spans_are_none(text):
    assert parse_span(text, 10.0, REL) is None


def test_seconds_answers_may_carry_units():
    assert parse_span("from 2.5s - 7 s", 10.0, SEC) == (2.5, 7.0)
    assert parse_span("[2 seconds, 4 seconds]", 10.0, SEC) == (2.0, 4.0)


def test_a_bad_span_template_is_a_config_error():
    with pytest.raises(ConfigError, match="template must contain"):
        validate(SpanFormat, {"template": "{end} then {start}"})
    with pytest.raises(ConfigError):
        validate(SpanFormat, {"unit": "frames"})


def test_boxes_are_normalised_to_the_padded_square_and_mapped_back():
    # a 200 x 100 image pads to 200 x 200 with the image 50 px down (LEGO's expand2square)
    assert pad_offset(200, 100) == (0, 50) and pad_offset(100, 200) == (50, 0) and pad_offset(64, 64) == (0, 0)
    box = xywh_to_xyxy([20, 10, 60, 40])  # COCO [x, y, w, h]
    assert box == (20, 10, 80, 50)
    text = box_to_text(box, 200, 100)
    assert text == "[0.100, 0.300, 0.400, 0.500]"
    assert square_to_pixels(parse_box(text), 200, 100) == pytest.approx(box)
    tall = box_to_text((10, 20, 30, 180), 100, 200)
    assert square_to_pixels(parse_box(tall), 100, 200) == pytest.approx((10, 20, 30, 180))


@pytest.mark.parametrize("text,want", [
    ("The cup is at [0.1, 0.2, 0.3, 0.4].", (0.1, 0.2, 0.3, 0.4)),
    ("[0.3, 0.4, 0.1, 0.2]", (0.1, 0.2, 0.3, 0.4)),           # corners swapped: put in order
    ("[-0.1, 0.2, 1.4, 0.4]", (0.0, 0.2, 1.0, 0.4)),          # out of range: clipped
])
def test_boxes_are_read_and_repaired(text, want):
    assert parse_box(text) == pytest.approx(want)


@pytest.mark.parametrize("text", ["no box", "[0.1, 0.2, 0.3]", "[0.2, 0.2, 0.2, 0.5]", "[1.5, 1.5, 2, 2]"])
def test_unreadable_or_empty_boxes_are_none(text):
    assert parse_box(text) is None


def test_pixels_outside_the_image_are_clipped():
    # the padding band of a wide image is not part of it
    assert square_to_pixels((0.0, 0.0, 1.0, 1.0), 200, 100) == (0.0, 0.0, 200.0, 100.0)
