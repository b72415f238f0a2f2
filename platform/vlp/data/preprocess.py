"""CLIP preprocessing as batched tensor ops.

Matches transformers' ``CLIPImageProcessor`` (resize shortest side with PIL bicubic, centre crop,
rescale, normalise) to within a small tolerance (see tests/data/test_preprocess.py), but runs on a whole
stack of frames at once in torch. Split in two halves so the heavy geometric part runs in CPU decode
tasks and only uint8 pixels travel to the encoder, which normalises on its device.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from ..config import Cfg

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Names the resampling code: stored in feature-set fingerprints, so features made by an older
# resampler are never mixed with new ones. Change it whenever resize_crop's output can change.
RESAMPLER = "bicubic-aa-u8-pil-like-v2"


Rgb = tuple[float, float, float]


class PreprocessConfig(Cfg):
    """Geometry and normalisation of encoder inputs."""

    size: Optional[int] = Field(None, ge=8, description="crop size; None = the encoder's image size")
    pad_to_square: bool = Field(False, description="pad to a square with the mean colour first (LLaVA-1.5)")
    mean: Optional[Rgb] = Field(
        None, description="per-channel mean (0..1) to normalise with and the pad_to_square colour; None = the "
        "tower's image_mean from its preprocessor_config.json (CLIP's if it has none)")
    std: Optional[Rgb] = Field(
        None, description="per-channel std to normalise with; None = the tower's image_std from its "
        "preprocessor_config.json (CLIP's if it has none)")

    @field_validator("mean")
    @classmethod
    def _unit(cls, v):
        if v is not None and not all(0 <= m <= 1 for m in v):
            raise ValueError(f"each channel's mean must be within 0..1 (it is also the padding colour), got {v}")
        return v

    @field_validator("std")
    @classmethod
    def _positive(cls, v):
        if v is not None and not all(s > 0 for s in v):
            raise ValueError(f"each channel's std must be > 0, got {v}")
        return v

    def resolve(self, tower_mean: Rgb, tower_std: Rgb) -> tuple[Rgb, Rgb]:
        """(mean, std) encoder inputs are normalised (and padded) with: these when set, else the tower's."""
        mean = self.mean if self.mean is not None else tower_mean
        std = self.std if self.std is not None else tower_std
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def resize_output_size(h: int, w: int, shortest: int) -> tuple[int, int]:
    """Same rule as transformers' ``get_resize_output_image_size(default_to_square=False)``."""
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(shortest * long / short)
    return (shortest, new_long) if h <= w else (new_long, shortest)


def pad_to_square(x: torch.Tensor, mean: tuple[float, float, float]) -> torch.Tensor:
    """(T, 3, H, W) uint8/float -> (T, 3, S, S), S = max(H, W), image centred on the mean colour."""
    t, c, h, w = x.shape
    if h == w:
        return x
    s = max(h, w)
    fill = torch.tensor([int(m * 255) for m in mean], dtype=x.dtype).view(1, 3, 1, 1)
    out = fill.expand(t, c, s, s).clone()
    top, left = (s - h) // 2, (s - w) // 2
    out[:, :, top:top + h, left:left + w] = x
    return out


def _resize_bicubic_aa(x: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    """(T, 3, H, W) uint8 -> (T, 3, nh, nw) uint8, antialiased bicubic.

    On CPU this uses torch's uint8 kernel, which resamples like PIL (two separable passes with a uint8
    intermediate: within 1 level of PIL's bicubic where the float path differs by up to 10-20 levels on
    high-contrast edges) and is ~14x faster than the float path on channels-last frames, which is the
    layout a (T, H, W, 3) decode permuted to (T, 3, H, W) already has. Other devices have no uint8 kernel:
    there the float path runs and rounds once at the end."""
    if x.device.type == "cpu" and x.dtype == torch.uint8:
        x = x.contiguous(memory_format=torch.channels_last)  # no copy for permuted (T, H, W, 3) frames
        return F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    y = F.interpolate(x.float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def resize_crop(frames: np.ndarray | torch.Tensor, size: int, pad_square: bool = False,
                mean: tuple[float, float, float] = CLIP_MEAN) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, size, size) uint8: shortest side to ``size`` (bicubic, antialiased
    like PIL), then centre crop. Rounds to uint8 as PIL does between resize and rescale."""
    if isinstance(frames, np.ndarray) and not frames.flags.writeable:
        frames = frames.copy()  # torch cannot wrap read-only buffers
    x = torch.as_tensor(frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected (T, H, W, 3) frames, got {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2)  # (T, H, W, 3) -> (T, 3, H, W)
    if pad_square:
        x = pad_to_square(x, mean)
    h, w = x.shape[-2:]
    nh, nw = resize_output_size(h, w, size)
    if (nh, nw) != (h, w):
        x = _resize_bicubic_aa(x, nh, nw)  # (T, 3, h, w) -> (T, 3, nh, nw) uint8
    top, left = (nh - size) // 2, (nw - size) // 2
    if top < 0 or left < 0:  # image smaller than the crop: pad like transformers' center_crop
        x = F.pad(x, (max(0, -left), max(0, size - nw - max(0, -left)), max(0, -top), max(0, size - nh - max(0, -top))))
        nh, nw = x.shape[-2:]
        top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, :, top:top + size, left:left + size].contiguous()  # (T, 3, size, size)


class Geometry(NamedTuple):
    size: int
    pad_to_square: bool
    mean: Rgb
    std: Rgb


def model_geometry(info: dict, image_size: int, tower_mean: Rgb = CLIP_MEAN, tower_std: Rgb = CLIP_STD) -> Geometry:
    """(crop size, pad_to_square, mean, std) a model's features were precomputed with, read from its export info
    (vlp_model.json ``preprocess``, copied from the feature set's fingerprint, which records the mean/std actually
    used). Chat and infer must pad with that mean and normalise with that mean/std, as precompute did. The
    ``image_size``/``tower_*`` arguments (the tower's own) fill in what an export does not record."""
    pp = info.get("preprocess") or {}
    return Geometry(pp.get("size") or image_size, bool(pp.get("pad_to_square", False)),
                    tuple(pp.get("mean") or tower_mean), tuple(pp.get("std") or tower_std))


def normalize(x: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD, dtype=torch.float32) -> torch.Tensor:
    """(N, 3, S, S) uint8 -> (N, 3, S, S) float: rescale 1/255 then (x - mean) / std."""
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    # In place on one fresh float copy (never on x itself): the same values, bit for bit, as
    # ((x / 255 - m) / s) but one temporary instead of four (~3x faster on CPU for a batch of frames).
    return x.to(torch.float32, copy=True).div_(255.0).sub_(m).div_(s).to(dtype)


def clip_preprocess(frames: np.ndarray, size: int = 224, pad_square: bool = False,
                    mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, size, size) float32, the full CLIP preprocessing."""
    return normalize(resize_crop(frames, size, pad_square, mean), mean, std)
