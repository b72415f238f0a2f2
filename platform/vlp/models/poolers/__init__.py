"""Temporal poolers: one sample's visual features -> its visual token sequence, chosen by ``model.pooler.type``.

Features arrive either as frames ``(T, 1 + P, D)`` (feature mode ``frames``: per frame the CLS token, then P
patch tokens) or already Valley-pooled ``(P + T, D)`` (``valley_pooled``, pooled at precompute time). A pooler
class (one module each: valley, patch_mean, none) owns its ``Cfg``, its forward (``__call__``) and
``num_tokens``: how many tokens that forward makes for a features shape, mode and frame count. Training counts
tokens with it (train/data.py) before any feature is loaded; tests/models/test_parts.py checks it against the forward.
``tokens_per_frame`` says which of those tokens belong to which frame (for connectors that use frame positions).

May import: torch, vlp.config, vlp.models.parts.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch
from pydantic import Field

from ..parts import Part, PartCfg, PartRegistry

FEATURE_MODES = ("frames", "valley_pooled")


class PoolerCfg(PartCfg):
    """A temporal pooler; ``type`` picks the registered pooler class, whose Cfg holds its parameters."""

    type: str = Field("valley", description="registered pooler type")


POOLERS = PartRegistry("temporal pooler", PoolerCfg)
PoolerConfig = POOLERS.field  # annotation of a config field holding any registered pooler's Cfg


class Pooler(Part):
    """Base of a pooler class. ``modes``: the feature modes it accepts."""

    Cfg: ClassVar[type[PoolerCfg]] = PoolerCfg
    modes: ClassVar[tuple[str, ...]] = FEATURE_MODES

    def __call__(self, feats: torch.Tensor, mode: str, num_frames: int) -> torch.Tensor:
        """(T, 1 + P, D) or (P + T, D) features -> (N, D) visual tokens."""
        raise NotImplementedError

    def num_tokens(self, shape: Sequence[int], mode: str, num_frames: int) -> int:
        """N of ``__call__`` for features of ``shape`` (stored shape of one sample) without computing them."""
        raise NotImplementedError

    def tokens_per_frame(self, shape: Sequence[int], mode: str, num_frames: int) -> int:
        """How ``__call__``'s N tokens lie over frames, for connectors that use it (``ItemContext``): the last
        ``num_frames * tokens_per_frame`` of them are per-frame groups in frame order, the rest belong to no one
        frame. 0 (the default): no per-frame tokens."""
        return 0

    def check_mode(self, mode: str) -> None:
        if mode not in self.modes:
            want = " or ".join(f"output.mode={m}" for m in self.modes)
            raise ValueError(f"pooler {self.cfg.type!r} needs features precomputed with {want}, not {mode!r}")


from . import none, patch_mean, valley  # noqa: E402,F401  (register the built-in poolers)
