"""A vision tower defined outside vlp: ``toy_clip``, a CLIP tower whose features are scaled by ``gain``.

Nothing in vlp names it: a precompute config lists this module in ``encoder.plugins`` and names the type in
``encoder.tower`` (tests/models/test_parts.py plans a precompute run with it).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from vlp.models.towers import TOWERS, VisionTower
from vlp.models.towers.clip import Clip


class ScaledTower(VisionTower):
    gain: float = 1.0

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return super().features(pixels) * self.gain  # (N, 1 + P, D)


@TOWERS.register
class ToyClip(Clip):
    class Cfg(Clip.Cfg):
        type: Literal["toy_clip"] = "toy_clip"
        gain: float = Field(2.0, gt=0, description="factor on every feature")

    def build(self) -> VisionTower:
        base = super().build()
        tower = ScaledTower(**{f: getattr(base, f) for f in base.__dataclass_fields__})
        tower.gain = self.cfg.gain
        return tower
