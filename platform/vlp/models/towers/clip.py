"""The ``clip`` tower: a Hugging Face CLIPVisionModel (LLaVA / Valley use openai/clip-vit-large-patch14).
May import: torch, transformers, vlp.models.towers, vlp.models.presets."""

from __future__ import annotations

from typing import Literal

import torch

from ..presets import resolve_model_path
from . import TOWERS, Tower, TowerCfg, VisionTower, load_frozen, tower_mean_std, weights_hash


@TOWERS.register
class Clip(Tower):
    class Cfg(TowerCfg):
        type: Literal["clip"] = "clip"

    def build(self) -> VisionTower:
        from transformers import CLIPVisionModel

        cfg = self.cfg
        model, path, device, dtype = load_frozen(CLIPVisionModel, cfg, "vision_tower.layer")
        mcfg = model.config
        mean, std = tower_mean_std(path)
        return VisionTower(model=model, image_size=mcfg.image_size, hidden_size=mcfg.hidden_size,
                           num_layers=mcfg.num_hidden_layers, mean=mean, std=std, path=cfg.path,
                           weights_sha256=weights_hash(path), device=device, dtype=dtype, layer=cfg.layer)

    def vision_config(self):
        """The checkpoint's CLIPVisionConfig (a full CLIP checkpoint's vision part)."""
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig.from_pretrained(resolve_model_path(self.cfg.path))

    def num_tokens(self, num_frames: int = 1) -> int:
        c = self.vision_config()
        return num_frames * (1 + (c.image_size // c.patch_size) ** 2)  # per frame: CLS + (S / patch)^2 patches

    def geometry(self) -> tuple[int, int]:
        c = self.vision_config()
        return c.image_size, c.hidden_size

    def load_module(self, weights: bool = True):
        from transformers import CLIPVisionModel

        if not weights:
            return CLIPVisionModel(self.vision_config())
        return CLIPVisionModel.from_pretrained(resolve_model_path(self.cfg.path), dtype=torch.float32)

    def unused_parameters(self, module, layer: int) -> list[str]:
        n = module.config.num_hidden_layers
        used = layer % (n + 1)  # hidden_states[k]: the embeddings (k = 0), then the output of layer k - 1
        late = tuple(f"encoder.layers.{i}." for i in range(used, n))
        return [k for k, _ in module.named_parameters() if k.startswith(late) or k.startswith("post_layernorm.")]

    def save_module(self, module, folder: str, mean, std) -> None:
        from transformers import CLIPImageProcessorPil

        module.save_pretrained(folder, safe_serialization=True)
        s = module.config.image_size
        CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_mean=list(mean),
                              image_std=list(std)).save_pretrained(folder)
