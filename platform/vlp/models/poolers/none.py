"""The ``none`` pooler: every frame's patch tokens in order, unpooled. Needs feature mode ``frames``.
May import: torch, vlp.models.poolers."""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from . import POOLERS, Pooler, PoolerCfg


@POOLERS.register
class NoPooling(Pooler):
    """(T * P, D): the frames' patch tokens, CLS tokens dropped."""

    modes = ("frames",)

    class Cfg(PoolerCfg):
        type: Literal["none"] = "none"

    def __call__(self, feats: torch.Tensor, mode: str, num_frames: int) -> torch.Tensor:
        self.check_mode(mode)
        return feats[:, 1:].reshape(-1, feats.shape[-1])  # (T, 1 + P, D) -> (T * P, D)

    def num_tokens(self, shape: Sequence[int], mode: str, num_frames: int) -> int:
        self.check_mode(mode)
        return int(shape[0]) * (int(shape[1]) - 1)  # (T, 1 + P, D) -> T * P

    def tokens_per_frame(self, shape: Sequence[int], mode: str, num_frames: int) -> int:
        return int(shape[1]) - 1  # T groups of P patch tokens
