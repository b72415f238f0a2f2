"""The ``ast`` audio tower: a Hugging Face ``ASTModel`` (Audio Spectrogram Transformer, Gong et al. 2021) with
its ``ASTFeatureExtractor``. One 10.24 s segment (1024 frames x 128 mel bins) -> CLS + distillation token +
f x t patch tokens (AST's defaults: 12 x 101). May import: torch, transformers, vlp.models.audio_towers,
vlp.models.presets, vlp.models.towers."""

from __future__ import annotations

from typing import Any, Literal

from ..presets import resolve_model_path
from ..towers import load_frozen, weights_hash
from . import AUDIO_TOWERS, AudioTower, AudioTowerCfg, AudioTowerPart


@AUDIO_TOWERS.register
class Ast(AudioTowerPart):
    class Cfg(AudioTowerCfg):
        type: Literal["ast"] = "ast"

    def build(self) -> AudioTower:
        from transformers import ASTModel

        cfg = self.cfg
        model, path, device, dtype = load_frozen(ASTModel, cfg, "audio_tower.layer")
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
        return ast_tokens(self.model_config())

    def geometry(self) -> dict[str, Any]:
        from transformers import ASTFeatureExtractor

        c = self.model_config()
        fx = ASTFeatureExtractor.from_pretrained(resolve_model_path(self.cfg.path))
        if (fx.num_mel_bins, fx.max_length) != (c.num_mel_bins, c.max_length):
            raise ValueError(f"{self.cfg.path}: the feature extractor makes {fx.max_length} x {fx.num_mel_bins} "
                             f"fbanks, the model takes {c.max_length} x {c.num_mel_bins}")
        return {"hidden_size": c.hidden_size, "num_layers": c.num_hidden_layers,
                "tokens_per_segment": ast_tokens(c),
                "sampling_rate": fx.sampling_rate, "num_mel_bins": fx.num_mel_bins, "max_length": fx.max_length}


def ast_tokens(c) -> int:
    """Tokens per segment of an ``ASTConfig``: CLS + distillation token + its f x t patches."""
    f = (c.num_mel_bins - c.patch_size) // c.frequency_stride + 1  # ASTEmbeddings.get_shape
    t = (c.max_length - c.patch_size) // c.time_stride + 1
    return 2 + f * t
