"""A vision tower inside the model (``model.tower``): trained (mPLUG-Owl's stage 1) or frozen, run on pixel rows.

Feature sets precomputed with ``output.mode: pixels`` hold each item's tower input frames, uint8 (T, 3, S, S),
resized/cropped/padded but not normalised. A VideoLLM with ``model.tower`` normalises them with the feature set's
mean/std, runs the tower (a registered tower type whose part implements ``load_module``/``save_module``: ``clip``)
and takes hidden state ``layer`` as the item's ``frames``-mode features (T, 1 + P, D), which the pooler and the
connector then see exactly as precomputed frames. The export saves the (trained) tower to ``export/tower``.

May import: torch, vlp.config, vlp.data.preprocess, vlp.models.parts, vlp.models.presets, vlp.models.towers.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
from pydantic import Field, field_validator

from ..config import Cfg
from ..data.preprocess import normalize
from ..storage import get_fs, localize
from .presets import check_model_path, resolve_model_path
from .towers import TOWERS, Tower, layer_problem, tower_mean_std

Rgb = tuple[float, float, float]


class ModelTowerCfg(Cfg):
    """``model.tower``: the vision tower the model runs on pixel rows (feature sets made with output.mode pixels)."""

    type: str = Field("clip", description="registered vision tower type (one that can run inside the model: clip)")
    path: str = Field("preset:tiny-clip", description="folder, hub id (openai/clip-vit-large-patch14) or preset:NAME")
    init_from: Optional[str] = Field(None, description="an earlier stage's export folder (or its tower/ folder): "
                                     "the tower starts from the weights trained there instead of path's (checked at "
                                     "setup, like model.connector.init_from)")
    layer: int = Field(-2, description="hidden-state index whose tokens are the item's features (-2 = penultimate)")
    trainable: bool = Field(True, description="train the tower (mPLUG-Owl stage 1); false: run it frozen")
    gradient_checkpointing: bool = Field(False, description="recompute the tower's layer activations in the backward "
                                         "pass instead of keeping them (less memory, ~1/3 more tower compute)")
    mean: Optional[Rgb] = Field(None, description="normalisation mean of the pixel rows; None = the feature set's "
                                "(filled in at setup, saved with the run)")
    std: Optional[Rgb] = Field(None, description="normalisation std of the pixel rows; None = the feature set's")

    @field_validator("type")
    @classmethod
    def _registered(cls, v):
        if v not in TOWERS:
            raise ValueError(f"unknown vision tower type {v!r}; known: {', '.join(TOWERS.names())}")
        return v

    @field_validator("path")
    @classmethod
    def _local_path_exists(cls, v):
        return check_model_path(v)

    @field_validator("std")
    @classmethod
    def _positive(cls, v):
        if v is not None and min(v) <= 0:
            raise ValueError(f"std must be positive, got {list(v)}")
        return v


def weights_folder(cfg: ModelTowerCfg) -> str:
    """Where the tower's weights load from: ``init_from`` (an export's tower/ folder, or that folder itself), else
    ``path``."""
    if cfg.init_from is None:
        return cfg.path
    if "://" in cfg.init_from:  # an export on S3: its tower/ alone fetched into the node's cache
        sub = f"{cfg.init_from.rstrip('/')}/tower"
        fs, conf = get_fs(f"{sub}/config.json")
        return localize(sub if fs.exists(conf) else cfg.init_from)
    sub = Path(cfg.init_from) / "tower"
    return str(sub) if sub.is_dir() else cfg.init_from


def init_problems(cfg: ModelTowerCfg) -> list[str]:
    """Why ``init_from`` holds no tower to start from; [] when it does (or is unset)."""
    if cfg.init_from is None or (Path(weights_folder(cfg)) / "config.json").is_file():
        return []
    return [f"model.tower.init_from: no tower at {cfg.init_from} (point it at an export folder written by a run "
            "with model.tower, or at its tower/ folder)"]


def tower_part(cfg: ModelTowerCfg) -> Tower:
    """The registered tower part of ``model.tower`` at :func:`weights_folder` (its geometry, token count, module
    loading and saving)."""
    return TOWERS.part({"type": cfg.type, "path": weights_folder(cfg), "layer": cfg.layer})


@lru_cache(maxsize=16)
def _frame_geometry(type_: str, path: str) -> tuple[int, int, int]:
    part = TOWERS.part({"type": type_, "path": path})
    size, width = part.geometry()
    return size, part.num_tokens(1), width


def frame_geometry(cfg: ModelTowerCfg) -> tuple[int, int, int]:
    """(input size S, tokens per frame 1 + P, feature width D) of the tower, read from its checkpoint's config
    once per path (token counting calls this for every row)."""
    return _frame_geometry(cfg.type, weights_folder(cfg))


def features_shape(cfg: ModelTowerCfg, shape: Sequence[int]) -> tuple[int, int, int]:
    """A pixel block's stored shape (T, 3, S, S) -> the shape of the features the tower makes of it (T, 1 + P, D)."""
    size, tokens, width = frame_geometry(cfg)
    if len(shape) != 4 or tuple(shape[1:]) != (3, size, size):
        raise ValueError(f"pixel block of shape {tuple(shape)} is not (T, 3, {size}, {size}) for the tower at "
                         f"{weights_folder(cfg)}")
    return int(shape[0]), tokens, width


def tower_problems(cfg: ModelTowerCfg, image_size: int, hidden_size: int) -> list[str]:
    """Why ``model.tower`` cannot run on pixel rows of ``image_size`` whose features must be ``hidden_size`` wide
    (the feature set's fingerprint); [] when it can."""
    missing = init_problems(cfg)
    if missing:
        return missing
    part = tower_part(cfg)
    if type(part).load_module is Tower.load_module:
        return [f"model.tower.type={cfg.type}: this tower type cannot run inside the model (its part implements no "
                "load_module)"]
    size, width = part.geometry()
    out = []
    if size != image_size:
        out.append(f"model.tower: the tower at {weights_folder(cfg)} takes {size} px frames, the feature sets hold {image_size} px")
    if width != hidden_size:
        out.append(f"model.tower: the tower at {weights_folder(cfg)} makes {width}-wide features, model.vision_hidden_size is "
                   f"{hidden_size}")
    with torch.device("meta"):
        n_layers = part.load_module(weights=False).config.num_hidden_layers
    problem = layer_problem(cfg.layer, n_layers)
    return out + ([f"model.tower.layer={cfg.layer} {problem}"] if problem else [])


class PixelTower(nn.Module):
    """uint8-valued frames (T, 3, S, S) -> the tower's hidden state ``layer`` (T, 1 + P, D). The encoder's state dict
    is the tower's own (``encoder.*``), so ZeRO-3's gathered state loads back into a fresh build."""

    def __init__(self, cfg: ModelTowerCfg, weights: bool = True):
        super().__init__()
        self.cfg, self.part = cfg, tower_part(cfg)
        self.encoder = self.part.load_module(weights)
        own_mean, own_std = tower_mean_std(resolve_model_path(weights_folder(cfg)))
        self.mean, self.std = tuple(cfg.mean or own_mean), tuple(cfg.std or own_std)
        self.encoder.requires_grad_(cfg.trainable)
        unused = set(self.part.unused_parameters(self.encoder, cfg.layer))
        for name, p in self.encoder.named_parameters():
            if name in unused:
                p.requires_grad_(False)  # nothing of hidden state `layer` depends on it
        if cfg.gradient_checkpointing and cfg.trainable:
            # non-reentrant: the pixels need no gradient, and the reentrant variant would then give the layers none
            self.encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        w = next(self.encoder.parameters())
        x = normalize(pixels.to(w.device), self.mean, self.std, w.dtype)  # (T, 3, S, S) 0..255 -> normalised
        out = self.encoder(pixel_values=x, output_hidden_states=True)
        return out.hidden_states[self.cfg.layer]  # (T, 1 + P, D)

    def save(self, folder: str) -> None:
        """``folder`` loads back as this tower type (``save_pretrained``), with the mean/std it normalised with."""
        self.part.save_module(self.encoder, folder, self.mean, self.std)
