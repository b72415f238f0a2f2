"""Synthetic grounding data: the clip shows its shape exactly in the frames of its span, the image's box holds the
asked shape's colour, and the samples carry the truth as the pack formats write it (same parse, same scoring)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlp.data.grounding import SpanFormat, parse_box, parse_span, square_to_pixels
from vlp.data.tario import iter_tar_samples
from vlp.synth.grounding import event_clip, two_shapes
from vlp.synth.shards import COLORS, MakeShardsConfig, make_shards


def test_the_event_is_visible_exactly_in_its_frames():
    for seed in range(20):
        frames, attrs, (k1, k2) = event_clip(np.random.default_rng(seed), 64, 96, 16)
        colour = np.array(COLORS[attrs["color"]], dtype=np.uint8)
        has = [bool((f == colour).all(-1).any()) for f in frames]
        assert has == [k1 <= i < k2 for i in range(16)], seed
        assert 2 <= k2 - k1 <= 8


def test_the_box_holds_the_asked_shape_and_not_the_other():
    for seed in range(20):
        img, attrs, (x1, y1, x2, y2) = two_shapes(np.random.default_rng(seed), 64, 96)
        colour = np.array(COLORS[attrs["color"]], dtype=np.uint8)
        ys, xs = np.nonzero((img == colour).all(-1))
        assert len(xs) and xs.min() >= x1 - 0.5 and xs.max() <= x2 + 0.5 and ys.min() >= y1 - 0.5 and ys.max() <= y2 + 0.5
        others = [c for c in COLORS.values() if c != COLORS[attrs["color"]]]
        assert sum(bool((img == np.array(c, np.uint8)).all(-1).any()) for c in others) == 1  # one other shape


def test_grounding_shards_carry_answers_that_read_back_to_their_truth(tmp_path):
    cfg = MakeShardsConfig(out=str(tmp_path), videos=0, images=0, instructions=0, heldout=0, when=3, where=3,
                           when_heldout=1, where_heldout=1, samples_per_shard=8)
    out = make_shards(cfg)
    assert set(out) == {"when", "where", "when_heldout", "where_heldout"}
    metas = {fam: [json.loads(s.members["json"]) for s in iter_tar_samples(open(out[fam][0], "rb"))] for fam in out}
    for m in metas["when"] + metas["when_heldout"]:
        g = m["grounding"]
        span = parse_span(m["conversations"][1]["value"], g["duration"], SpanFormat(**g["format"]))
        assert span == pytest.approx(g["span"], abs=0.006 * g["duration"])  # 2 decimals of the duration and g["duration"] == 2.0
        assert m["conversations"][0]["value"].startswith("<video>\nWhen is the")
    for m in metas["where"] + metas["where_heldout"]:
        g = m["grounding"]
        box = square_to_pixels(parse_box(m["conversations"][1]["value"]), g["width"], g["height"])
        assert box == pytest.approx(g["box"], abs=0.0005 * 96 + 1e-6)
    assert {m["split"] for m in metas["when_heldout"] + metas["where_heldout"]} == {"heldout"}
    # keys do not collide with the other families' (each family its own shard range)
    keys = [m["key"] for ms in metas.values() for m in ms]
    assert len(keys) == len(set(keys))
