"""Transitional re-export of :mod:`vlp.models.towers` for code other branches are changing at the same time
(precompute/pipeline.py, bench/bench_train.py). New code imports ``vlp.models.towers``; delete this module once
nothing imports it. ``VisionTowerConfig`` is the default (CLIP) tower's config class."""

from __future__ import annotations

from .towers import TOWERS as VISION_TOWERS, VisionTower, build_vision_tower, resolve_device_dtype  # noqa: F401
from .towers import tower_mean_std, weights_hash  # noqa: F401
from .towers.clip import Clip

VisionTowerConfig = Clip.Cfg
