"""Frozen vision towers, chosen by ``encoder.tower.type``: images -> per-frame hidden states (CLS first).

A tower class (one module each; only ``clip`` for now: LLaVA / Valley use CLIP ViT-L/14) owns its ``Cfg``,
``build`` (-> :class:`VisionTower`) and ``num_tokens`` (1 + P tokens per frame, read from the checkpoint's
config without loading weights). The helpers here (device/dtype resolution, weight hashing, the checkpoint's
normalisation constants) serve every Hugging Face tower.

May import: torch, transformers, vlp.config, vlp.data.preprocess, vlp.models.parts, vlp.models.presets.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import torch
from pydantic import Field, field_validator

from ...data.preprocess import CLIP_MEAN, CLIP_STD
from ..parts import Part, PartCfg, PartRegistry
from ..presets import check_model_path, resolve_model_path


class FrozenEncoderCfg(PartCfg):
    """What configures any frozen Hugging Face encoder (a vision tower here, an audio tower in
    ``vlp.models.audio_towers``): where its checkpoint is, which hidden state to keep, dtype and device. Each
    kind's Cfg sets its own defaults for ``type``, ``path`` and ``layer``."""

    path: str = Field(..., description="folder, hub id or preset:NAME")
    layer: int = Field(..., description="hidden-state index to keep")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: float16 on GPU, float32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when a GPU is visible")

    @field_validator("path")
    @classmethod
    def _local_path_exists(cls, v):
        return check_model_path(v)  # a typo fails with the config, not in every decode worker


class TowerCfg(FrozenEncoderCfg):
    """A frozen image encoder; ``path`` is a local folder, a hub id or ``preset:tiny-clip``."""

    type: str = Field("clip", description="registered tower type")
    path: str = Field("preset:tiny-clip", description="folder, hub id (e.g. openai/clip-vit-large-patch14) or preset:NAME")
    layer: int = Field(-2, description="hidden-state index to keep (-2 = penultimate, as LLaVA/Valley)")


TOWERS = PartRegistry("vision tower", TowerCfg)
TowerConfig = TOWERS.field  # annotation of a config field holding any registered tower's Cfg


@dataclass
class VisionTower:
    model: torch.nn.Module
    image_size: int
    hidden_size: int
    num_layers: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    path: str
    weights_sha256: str
    device: torch.device
    dtype: torch.dtype
    layer: int

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised -> (N, 1 + P, D) hidden states of ``layer`` (CLS first)."""
        out = self.model(pixel_values=pixels.to(self.device, self.dtype), output_hidden_states=True)
        return out.hidden_states[self.layer]


class Tower(Part):
    """Base of a tower class."""

    Cfg: ClassVar[type[TowerCfg]] = TowerCfg

    def build(self) -> VisionTower:
        raise NotImplementedError

    def num_tokens(self, num_frames: int = 1) -> int:
        """Tokens ``build().features`` gives for ``num_frames`` frames: num_frames x (1 + P)."""
        raise NotImplementedError

    def geometry(self) -> tuple[int, int]:
        """(input image size S, feature width D) read from the checkpoint's config, without loading weights (the
        precompute driver plans with it)."""
        raise NotImplementedError

    def load_module(self, weights: bool = True) -> torch.nn.Module:
        """The encoder as a plain trainable module (float32, train mode, gradients on), for a model that runs the
        tower itself (``model.tower``): ``from_pretrained`` at the path, or, with ``weights=False``, built from the
        checkpoint's config alone (under ``torch.device("meta")`` to count parameters). Its forward takes
        ``pixel_values`` (N, 3, S, S) and ``output_hidden_states``, as Hugging Face vision models do. A tower class
        that cannot be trained inside the model leaves this unimplemented (setup says so)."""
        raise NotImplementedError(f"vision tower type {self.cfg.type!r} cannot run inside the model")

    def unused_parameters(self, module: torch.nn.Module, layer: int) -> list[str]:
        """Names of ``module``'s parameters that hidden state ``layer`` does not depend on (the layers after it, a
        final norm): a model that trains the tower freezes them, so that they are neither counted as trained nor
        decayed by the optimizer. Default: none."""
        return []

    def save_module(self, module: torch.nn.Module, folder: str, mean, std) -> None:
        """Write ``module`` (as :meth:`load_module` made it, trained) to ``folder`` so that this tower type loads it
        back from there (``save_pretrained``), with a preprocessor config holding ``mean``/``std`` (precompute and
        chat read a tower's normalisation from it)."""
        raise NotImplementedError(f"vision tower type {self.cfg.type!r} cannot be saved from the model")


def build_vision_tower(cfg: TowerCfg | dict) -> VisionTower:
    return TOWERS.part(cfg).build()


def layer_problem(layer: int, n_layers: int) -> Optional[str]:
    """Why ``layer`` is no hidden-state index of an ``n_layers``-layer encoder (hidden states -(n+1)..n); None."""
    if -(n_layers + 1) <= layer <= n_layers:
        return None
    return f"out of range for a {n_layers}-layer tower (hidden states -{n_layers + 1}..{n_layers})"


def load_frozen(model_cls: Any, cfg: Any, key: str) -> tuple[torch.nn.Module, str, torch.device, torch.dtype]:
    """A Hugging Face encoder for a tower config (``path``, ``device``, ``dtype``, ``layer``): ``from_pretrained``
    at the resolved path, on its device in its dtype, in eval mode, frozen. ValueError naming ``key`` (e.g.
    ``vision_tower.layer``) when ``cfg.layer`` is no hidden state of it. -> (model, resolved path, device, dtype)"""
    path = resolve_model_path(cfg.path)
    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype)
    model = model_cls.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)
    problem = layer_problem(cfg.layer, model.config.num_hidden_layers)
    if problem:
        raise ValueError(f"{key}={cfg.layer} {problem}")
    return model, path, device, dtype


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda requested but no GPU is visible to this process")
    if dtype == "auto":
        dtype = "float16" if device == "cuda" else "float32"
    return torch.device(device), getattr(torch, dtype)


def weights_hash(folder: str) -> str:
    """sha256 over the weight files of a local checkpoint (hub ids: over the cached snapshot)."""
    p = Path(folder)
    if not p.is_dir():
        try:
            from huggingface_hub import snapshot_download

            p = Path(snapshot_download(folder, local_files_only=True))
        except Exception:
            return "unknown"
    h = hashlib.sha256()
    files = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest() if files else "unknown"


def tower_mean_std(path: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(image_mean, image_std) of a tower checkpoint's preprocessor_config.json (a local folder, or a hub id
    as ``from_pretrained`` finds it); CLIP's constants where it has none. ``path`` as resolve_model_path gives.
    The driver reads it without building the model (precompute's tower_geometry); towers read it too."""
    from transformers.utils import cached_file

    f = cached_file(path, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    d = json.loads(Path(f).read_text()) if f else {}
    out = []
    for key, default in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
        v = d.get(key, default)
        v = [v] * 3 if isinstance(v, (int, float)) else v
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
            raise ValueError(f"{f}: {key} must be 3 numbers (or one), got {v!r}")
        if key == "image_std" and min(v) <= 0:
            raise ValueError(f"{f}: image_std must be positive, got {v!r}")
        out.append(tuple(float(x) for x in v))
    return out[0], out[1]


from . import clip  # noqa: E402,F401  (register the built-in towers)
