"""The ``patch_mean`` pooler (ablation): patch tokens averaged over time, no CLS tokens; blind to frame order.
May import: torch, vlp.models.poolers."""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from . import POOLERS, Pooler, PoolerCfg


@POOLERS.register
class PatchMean(Pooler):
    """(P, D): from frames, the time-mean of the patch tokens; from valley_pooled, its first P rows."""

    class Cfg(PoolerCfg):
        type: Literal["patch_mean"] = "patch_mean"

    def __call__(self, feats: torch.Tensor, mode: str, num_frames: int) -> torch.Tensor:
        self.check_mode(mode)
        if mode == "valley_pooled":
            return feats[: feats.shape[0] - num_frames]  # (P + T, D) -> (P, D)
        return feats[:, 1:].mean(0)  # (T, 1 + P, D) -> (P, D)

    def num_tokens(self, shape: Sequence[int], mode: str, num_frames: int) -> int:
        self.check_mode(mode)
        if mode == "valley_pooled":
            return int(shape[0]) - num_frames  # (P + T, D) -> P
        return int(shape[1]) - 1  # (T, 1 + P, D) -> P
