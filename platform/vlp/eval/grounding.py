"""Grounding metrics: temporal grounding (Charades-STA protocol: R@1 at IoU 0.3 / 0.5 / 0.7 and mIoU) and referring
expressions (RefCOCO protocol: Acc@0.5), with the best constant answer as the baseline a model must beat.

An answer that cannot be read (:func:`vlp.data.grounding.parse_span` / ``parse_box`` give None) scores IoU 0 and is
listed with its text. IoU of an empty span or box is 0.

May import: vlp.data.grounding (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..data.grounding import Box, Span

THRESHOLDS = (0.3, 0.5, 0.7)


def iou_1d(a: Span, b: Span) -> float:
    """Temporal IoU of two spans (start <= end assumed; 0 when either is empty)."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 and inter > 0 else 0.0


def iou_2d(a: Box, b: Box) -> float:
    """Box IoU of (x1, y1, x2, y2) boxes (0 when either has no area)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area if area > 0 and inter > 0 else 0.0


@dataclass
class GroundingTally:
    """IoUs of one task's answers; ``unparseable`` lists (id, answer text) of those that could not be read."""

    task: str  # temporal_grounding | referring
    ious: list[float] = field(default_factory=list)
    unparseable: list[tuple[str, str]] = field(default_factory=list)

    def add(self, uid: str, answer: str, pred, truth, iou) -> float:
        """Score one answer: ``pred`` (parsed, or None) against ``truth`` with ``iou``; -> its IoU."""
        if pred is None:
            self.unparseable.append((uid, answer))
            self.ious.append(0.0)
            return 0.0
        v = float(iou(pred, truth))
        self.ious.append(v)
        return v

    def metrics(self) -> dict:
        return metrics_of(self.task, self.ious)


def metrics_of(task: str, ious: Sequence[float]) -> dict:
    """temporal_grounding: R@1@0.3/0.5/0.7 and mIoU; referring: Acc@0.5 (and mIoU); n."""
    n = len(ious)
    if task == "temporal_grounding":
        out = {f"R@1@{t}": (sum(v >= t for v in ious) / n if n else 0.0) for t in THRESHOLDS}
    else:
        out = {"Acc@0.5": sum(v >= 0.5 for v in ious) / n if n else 0.0}
    return {**out, "mIoU": sum(ious) / n if n else 0.0, "n": n}


def best_constant_span(truths: Sequence[Span], durations: Sequence[float], step: float = 0.05,
                       threshold: float = 0.5) -> tuple[Span, float]:
    """The one relative span (a grid of ``step``) that, answered for every clip, scores the most R@1@``threshold``
    against ``truths`` (seconds, with each clip's duration; ties: the higher mean IoU): (relative span, its R@1).
    The baseline a model must beat: it captures whatever the data's span positions share."""
    rel = [(s / d, e / d) for (s, e), d in zip(truths, durations)]
    grid = [round(i * step, 6) for i in range(int(round(1 / step)) + 1)]
    cands = [(s, e) for i, s in enumerate(grid) for e in grid[i + 1:]]
    return _best(cands, rel, iou_1d, threshold)  # type: ignore[return-value]


def _best(cands: list, truths: Sequence, iou, threshold: float) -> tuple:
    """(candidate, its hit rate) of the candidate with the most IoUs >= threshold (ties: the higher IoU sum)."""
    best, key = cands[0], (-1, -1.0)
    for c in cands:
        vals = [iou(c, t) for t in truths]
        k = (sum(v >= threshold for v in vals), sum(vals))
        if k > key:
            best, key = c, k
    return best, key[0] / max(1, len(truths))


def best_constant_box(truths: Sequence[Box], step: float = 0.1, threshold: float = 0.5) -> tuple[Box, float]:
    """The one box (normalised coordinates on a grid of ``step``) that, answered for every image, scores the most
    Acc@``threshold`` against ``truths`` (normalised the same way; ties: the higher mean IoU): (box, its accuracy)."""
    grid = [round(i * step, 6) for i in range(int(round(1 / step)) + 1)]
    pairs = [(a, b) for i, a in enumerate(grid) for b in grid[i + 1:]]
    cands = [(x1, y1, x2, y2) for x1, x2 in pairs for y1, y2 in pairs]
    return _best(cands, truths, iou_2d, threshold)  # type: ignore[return-value]


def unparseable_report(tally: GroundingTally, limit: int = 20) -> list[dict]:
    """The first ``limit`` unreadable answers, for the report."""
    return [{"id": uid, "answer": text} for uid, text in tally.unparseable[:limit]]


def constant_baseline(task: str, truths: Sequence, durations: Optional[Sequence[float]] = None) -> dict:
    """The best constant answer and its score on ``truths`` ({answer, metric, value})."""
    if task == "temporal_grounding":
        span, r = best_constant_span(truths, durations or [1.0] * len(truths))
        return {"answer": list(span), "metric": "R@1@0.5", "value": r}
    box, acc = best_constant_box(truths)
    return {"answer": list(box), "metric": "Acc@0.5", "value": acc}
