"""Synthetic grounding data (LEGO's tasks in the synthetic world): clips in which a shape is visible during a known
interval ("When is the red circle visible?" -> its span) and images with two shapes at known boxes ("Where is the
red circle?" -> its box), with the truth in the sample's json under ``grounding`` exactly as ``vlp pack --format
charades_sta | refcoco`` writes it, so that ``vlp eval --task temporal_grounding | referring`` scores both alike.

Clips: a static textured background; the shape (random colour, kind and place) appears at frame ``k1`` and is gone
from frame ``k2`` (at least 2 and at most half of the frames); the span is ``[k1, k2) / fps`` seconds. Images: two
shapes differing in colour and kind, apart; one is asked about. Everything is a function of the seed.

May import: numpy, vlp.data.grounding, vlp.synth.shards.
"""

from __future__ import annotations

import json
from typing import Iterator

import numpy as np

from ..data.grounding import SpanFormat, box_to_text, span_to_text
from .shards import COLORS, SHAPES, draw_shape, encode_jpeg, encode_mp4, shape_radius, texture

WHEN_QUESTION = "When is the {color} {shape} visible?"
WHERE_QUESTION = "Where is the {color} {shape}?"
SPAN_FORMAT = SpanFormat()  # relative, 2 decimals, [start, end]


def event_clip(rng: np.random.Generator, h: int, w: int, n: int) -> tuple[np.ndarray, dict, tuple[int, int]]:
    """(n, h, w, 3) frames, the shape's {color, shape}, and the frames (k1, k2) it is visible in: [k1, k2)."""
    bg = texture(rng, h, w)
    color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
    r = shape_radius(h, w)
    cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
    length = int(rng.integers(2, max(3, n // 2 + 1)))
    k1 = int(rng.integers(0, n - length + 1))
    frames = np.repeat(bg[None], n, axis=0)
    shown = draw_shape(bg, color, shape, cx, cy, r)
    frames[k1:k1 + length] = shown
    return frames, {"color": color, "shape": shape}, (k1, k1 + length)


def two_shapes(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, dict, tuple[float, float, float, float]]:
    """One image with two shapes (different colour and kind, apart); -> (image, the asked one's {color, shape},
    its box (x1, y1, x2, y2) in pixels)."""
    bg = texture(rng, h, w)
    r = shape_radius(h, w)
    colors = rng.permutation(list(COLORS))[:2]
    shapes = rng.permutation(list(SHAPES))[:2]
    while True:
        pts = rng.uniform([r + 1, r + 1], [w - r - 1, h - r - 1], size=(2, 2))
        if np.hypot(*(pts[0] - pts[1])) > 2.2 * r:
            break
    img = bg
    for (cx, cy), c, s in zip(pts, colors, shapes):
        img = draw_shape(img, str(c), str(s), cx, cy, r)
    (cx, cy) = pts[0]
    box = (max(0.0, cx - r), max(0.0, cy - r), min(float(w), cx + r), min(float(h), cy + r))
    return img, {"color": str(colors[0]), "shape": str(shapes[0])}, box


def grounding_samples(kind: str, count: int, cfg, rng: np.random.Generator, shard_base: int
                      ) -> Iterator[tuple[int, str, dict]]:
    """Yield (shard, key, members) of the ``when`` (clips) or ``where`` (images) family (``*_heldout``: the same,
    split heldout), like ``vlp.synth.shards.make_samples``."""
    split = "heldout" if kind.endswith("_heldout") else "train"
    for i in range(count):
        shard, idx = divmod(i, cfg.samples_per_shard)
        key = f"{shard_base + shard:05d}{idx:04d}"
        if kind.startswith("when"):
            members, meta = when_sample(rng, cfg)
        else:
            members, meta = where_sample(rng, cfg)
        meta.update(key=key, url=f"synthetic://{kind}/{key}", status="success", split=split)
        members["json"] = json.dumps(meta).encode()
        yield shard_base + shard, key, members


def when_sample(rng: np.random.Generator, cfg) -> tuple[dict, dict]:
    frames, attrs, (k1, k2) = event_clip(rng, cfg.height, cfg.width, cfg.num_frames)
    duration = cfg.num_frames / cfg.fps
    span = (k1 / cfg.fps, k2 / cfg.fps)
    q = WHEN_QUESTION.format(**attrs)
    conv = [{"from": "human", "value": "<video>\n" + q},
            {"from": "gpt", "value": span_to_text(span, duration, SPAN_FORMAT)}]
    truth = {"task": "temporal_grounding", "span": list(span), "duration": duration, "query": q,
             "format": SPAN_FORMAT.model_dump()}
    meta = {**attrs, "media": "video", "duration": duration, "num_frames": cfg.num_frames, "conversations": conv,
            "grounding": truth, "caption": f"A {attrs['color']} {attrs['shape']} appears for a moment."}
    return {"mp4": encode_mp4(frames, cfg.fps, cfg.codec), "txt": meta["caption"].encode()}, meta


def where_sample(rng: np.random.Generator, cfg) -> tuple[dict, dict]:
    img, attrs, box = two_shapes(rng, cfg.height, cfg.width)
    q = WHERE_QUESTION.format(**attrs)
    conv = [{"from": "human", "value": "<image>\n" + q},
            {"from": "gpt", "value": box_to_text(box, cfg.width, cfg.height)}]
    truth = {"task": "referring", "box": list(box), "width": cfg.width, "height": cfg.height, "query": q}
    meta = {**attrs, "media": "image", "width": cfg.width, "height": cfg.height, "conversations": conv,
            "grounding": truth, "caption": f"A {attrs['color']} {attrs['shape']} and another shape."}
    return {"jpg": encode_jpeg(img), "txt": meta["caption"].encode()}, meta
