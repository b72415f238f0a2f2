"""The ``ast`` audio tower: a Hugging Face ``ASTModel`` (Audio Spectrogram Transformer, Gong et al. 2021) with
its ``ASTFeatureExtractor``. One 10.24 s segment (1024 frames x 128 mel bins) -> CLS + distillation token +
f x t patch tokens (AST's defaults: 12 x 101). May import: torch, transformers, vlp.models.audio_towers,
vlp.models.presets, vlp.models.towers."""

from __future__ import annotations

from typing import Any, Literal

from ..presets import resolve_model_path
from ..towers import resolve_device_dtype, weights_hash
from . import AUDIO_TOWERS, AudioTower, AudioTowerCfg, AudioTowerPart


@AUDIO_TOWERS.register
class Ast(AudioTowerPart):
    class Cfg(AudioTowerCfg):
        type: Literal["ast"] = "ast"

    def build(self) -> AudioTower:
        from transformers import ASTModel

        cfg = self.cfg
        path = resolve_model_path(cfg.path)
        device, dtype = resolve_device_dtype(cfg.device, cfg.dtype)
        model = ASTModel.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)
        n_layers = model.config.num_hidden_layers
        if not -(n_layers + 1) <= cfg.layer <= n_layers:
            raise ValueError(f"audio_tower.layer={cfg.layer} out of range for a {n_layers}-layer tower "
                             f"(hidden states -{n_layers + 1}..{n_layers})")
        return AudioTower(model=model, hidden_size=model.config.hidden_size, path=cfg.path,
                          weights_sha256=weights_hash(path), device=device, dtype=dtype, layer=cfg.layer)

    def model_config(self):
        """The checkpoint's ASTConfig; ValueError when its config.json is another model's (ASTConfig would
        silently fill AST's defaults in)."""
        from transformers import ASTConfig

        path = resolve_model_path(self.cfg.path)
        found = ASTConfig.get_config_dict(path)[0].get("model_type")
        if found != ASTConfig.model_type:
            raise ValueError(f"its config.json is a {found!r} model, not {ASTConfig.model_type!r}")
        return ASTConfig.from_pretrained(path)

    def tokens_per_segment(self) -> int:
        c = self.model_config()
        f = (c.num_mel_bins - c.patch_size) // c.frequency_stride + 1  # ASTEmbeddings.get_shape
        t = (c.max_length - c.patch_size) // c.time_stride + 1
        return 2 + f * t  # CLS + distillation token + patches

    def geometry(self) -> dict[str, Any]:
        from transformers import ASTFeatureExtractor

        c = self.model_config()
        fx = ASTFeatureExtractor.from_pretrained(resolve_model_path(self.cfg.path))
        if (fx.num_mel_bins, fx.max_length) != (c.num_mel_bins, c.max_length):
            raise ValueError(f"{self.cfg.path}: the feature extractor makes {fx.max_length} x {fx.num_mel_bins} "
                             f"fbanks, the model takes {c.max_length} x {c.num_mel_bins}")
        return {"hidden_size": c.hidden_size, "num_layers": c.num_hidden_layers,
                "tokens_per_segment": self.tokens_per_segment(),
                "sampling_rate": fx.sampling_rate, "num_mel_bins": fx.num_mel_bins, "max_length": fx.max_length}
