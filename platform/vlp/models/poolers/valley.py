"""The Valley pooler: patch tokens averaged over time, then the per-frame CLS tokens.

``valley_pool`` is also precompute's ``output.mode=valley_pooled`` (precompute/stages.py), so features pooled
at precompute time are exactly what this pooler makes from frames. May import: torch, vlp.models.poolers.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from . import POOLERS, Pooler, PoolerCfg


def valley_pool(feats: torch.Tensor) -> torch.Tensor:
    """Valley spatio-temporal pooling. (T, 1 + P, D) -> (P + T, D): the P patch tokens averaged over time (in
    float32 whatever the input dtype), then the T per-frame CLS tokens. Exact for a per-token linear projector."""
    cls_tokens = feats[:, 0]  # (T, 1 + P, D) -> (T, D)
    patches = feats[:, 1:].float().mean(0).to(feats.dtype)  # (T, P, D) -> (P, D)
    return torch.cat([patches, cls_tokens], 0)  # -> (P + T, D)


@POOLERS.register
class Valley(Pooler):
    """Valley: (P + T, D) from frames or from valley_pooled features (already pooled: passed through)."""

    class Cfg(PoolerCfg):
        type: Literal["valley"] = "valley"

    def __call__(self, feats: torch.Tensor, mode: str, num_frames: int) -> torch.Tensor:
        self.check_mode(mode)
        if mode == "valley_pooled":
            return feats  # (P + T, D), pooled at precompute time
        return valley_pool(feats)  # (T, 1 + P, D) -> (P + T, D)

    def num_tokens(self, shape: Sequence[int], mode: str, num_frames: int) -> int:
        self.check_mode(mode)
        if mode == "valley_pooled":
            return int(shape[0])  # (P + T, D)
        return int(shape[1]) - 1 + int(shape[0])  # (T, 1 + P, D) -> P + T

    def tokens_per_frame(self, shape: Sequence[int], mode: str, num_frames: int) -> int:
        return 1  # P time-averaged patch tokens (no one frame's), then one CLS token per frame
