"""Time spans and boxes as text: how grounding answers are written into training conversations and read back from
a model's answer (LEGO / GroundingGPT, arXiv 2401.06071; code lzw-lzw/GroundingGPT).

**Spans** (:class:`SpanFormat`): ``relative`` writes a span as fractions of the clip's duration (LEGO's style,
2 decimals), ``seconds`` as seconds (1 decimal); ``template`` places the two numbers (default ``[{start}, {end}]``).
The released ``charades_sta.json`` of GroundingGPT lives on the Hugging Face Hub (zwli/GroundingGPT) and could not be
read from this machine: the default template follows the box notation of LEGO's ``mm_utils.py``, not a file, and
is one config value away from another.

**Boxes**: ``[x1, y1, x2, y2]`` normalised to the image padded to a square (the short side centred, as LEGO's
``expand2square`` pads), 3 decimals (:func:`box_to_text`); read back and mapped to original pixels for scoring
(:func:`square_to_pixels`, LEGO's ``postprocess_output``/``postprocess_box``).

**Reading** a model's answer never raises: :func:`parse_span` / :func:`parse_box` return None when no span / box can
be read (the caller counts it as wrong and lists it). A reversed span or box is put in order; values are clipped to
the clip / image (a span or box that is empty after clipping reads as None).

May import: pydantic, vlp.config (no torch).
"""

from __future__ import annotations

import re
from typing import Literal, Optional, Sequence

from pydantic import Field, field_validator

from ..config import Cfg

Span = tuple[float, float]
Box = tuple[float, float, float, float]
NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"


class SpanFormat(Cfg):
    """How a time span is written in text."""

    unit: Literal["relative", "seconds"] = Field(
        "relative", description="relative: fractions of the clip's duration (LEGO); seconds: seconds from its start")
    decimals: Optional[int] = Field(None, ge=0, le=4, description="digits after the point; None: 2 for relative, "
                                    "1 for seconds")
    template: str = Field("[{start}, {end}]", description="the text of a span; must contain {start} and {end}")

    @field_validator("template")
    @classmethod
    def _fields(cls, v):
        if "{start}" not in v or "{end}" not in v or v.find("{start}") > v.find("{end}"):
            raise ValueError(f"template must contain {{start}} before {{end}}, got {v!r}")
        return v

    def digits(self) -> int:
        return self.decimals if self.decimals is not None else (2 if self.unit == "relative" else 1)


def span_to_text(span: Span, duration: float, fmt: SpanFormat) -> str:
    """A span in seconds -> its text in ``fmt`` (relative: divided by ``duration``)."""
    s, e = sorted(span)
    if fmt.unit == "relative":
        s, e = s / duration, e / duration
    d = fmt.digits()
    return fmt.template.format(start=f"{s:.{d}f}", end=f"{e:.{d}f}")


def parse_span(text: str, duration: float, fmt: SpanFormat) -> Optional[Span]:
    """The first span in ``text`` as seconds, or None. Read: two numbers in brackets (``[a, b]``, ``{a, b}``,
    ``(a, b)``), else ``a - b`` / ``a to b``; relative values are scaled by ``duration``. Reversed spans are put in
    order; the span is clipped to [0, duration]; an empty one is None."""
    m = (re.search(rf"[\[{{(]\s*({NUMBER})\s*(?:s|sec|seconds)?\s*,\s*({NUMBER})\s*(?:s|sec|seconds)?\s*[\]}})]", text)
         or re.search(rf"({NUMBER})\s*(?:s|sec|seconds)?\s*(?:-|–|to)\s*({NUMBER})", text))
    if m is None:
        return None
    a, b = float(m.group(1)), float(m.group(2))
    if fmt.unit == "relative":
        a, b = a * duration, b * duration
    s, e = max(0.0, min(a, b)), min(float(duration), max(a, b))
    return (s, e) if e > s else None


def square_side(width: int, height: int) -> int:
    return max(int(width), int(height))


def pad_offset(width: int, height: int) -> tuple[int, int]:
    """(dx, dy) of the original image inside its padded square (the short side centred, LEGO's expand2square)."""
    side = square_side(width, height)
    return (side - int(width)) // 2, (side - int(height)) // 2


def box_to_text(box: Box, width: int, height: int, decimals: int = 3) -> str:
    """A pixel box (x1, y1, x2, y2) of a ``width`` x ``height`` image -> ``[x1, y1, x2, y2]`` normalised to the
    padded square."""
    side, (dx, dy) = square_side(width, height), pad_offset(width, height)
    x1, y1, x2, y2 = box
    vals = [(x1 + dx) / side, (y1 + dy) / side, (x2 + dx) / side, (y2 + dy) / side]
    return "[" + ", ".join(f"{min(1.0, max(0.0, v)):.{decimals}f}" for v in vals) + "]"


def xywh_to_xyxy(box: Sequence[float]) -> Box:
    """COCO's [x, y, w, h] -> (x1, y1, x2, y2)."""
    x, y, w, h = (float(v) for v in box)
    return x, y, x + w, y + h


def parse_box(text: str) -> Optional[Box]:
    """The first ``[a, b, c, d]`` in ``text`` (normalised to the padded square), or None; corners put in order,
    values clipped to [0, 1]; an empty box is None."""
    m = re.search(rf"\[\s*({NUMBER})\s*,\s*({NUMBER})\s*,\s*({NUMBER})\s*,\s*({NUMBER})\s*\]", text)
    if m is None:
        return None
    a, b, c, d = (min(1.0, max(0.0, float(g))) for g in m.groups())
    x1, x2, y1, y2 = min(a, c), max(a, c), min(b, d), max(b, d)
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def square_to_pixels(box: Box, width: int, height: int) -> Box:
    """A box normalised to the padded square -> pixels of the original image (clipped to it)."""
    side, (dx, dy) = square_side(width, height), pad_offset(width, height)
    x1, y1, x2, y2 = (v * side for v in box)
    clip = [(x1 - dx, width), (y1 - dy, height), (x2 - dx, width), (y2 - dy, height)]
    return tuple(min(float(hi), max(0.0, v)) for v, hi in clip)  # type: ignore[return-value]
