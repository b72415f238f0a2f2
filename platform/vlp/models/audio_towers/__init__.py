"""Frozen audio towers, chosen by ``encoder.audio_tower.type``: fbank segments -> per-segment hidden states.

An audio tower class (one module each; only ``ast`` for now: ChatBridge's audio branch is an AST-family
encoder, BEATs is not in transformers) owns its ``Cfg``, ``build`` (-> :class:`AudioTower`), ``num_tokens``
(tokens per segment, read from the checkpoint's config without loading weights) and ``geometry``. The tower's
feature extractor (its own fbank settings and normalisation constants) lives beside its weights and is what
``vlp.data.audio.AudioFeaturizer`` runs in the decode stage.

Audio features always keep one block per segment: (n_segments, tokens, D). The model flattens the segments
(:func:`flatten_segments`) and tells a context-taking connector how the tokens lie over them.

May import: torch, transformers, vlp.config, vlp.models.parts, vlp.models.presets, vlp.models.towers (helpers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import Field

from ..parts import Part, PartRegistry
from ..towers import FrozenEncoderCfg


class AudioTowerCfg(FrozenEncoderCfg):
    """A frozen audio encoder; ``path`` is a local folder, a hub id or ``preset:tiny-ast``."""

    type: str = Field("ast", description="registered audio tower type")
    path: str = Field("preset:tiny-ast", description="folder, hub id (e.g. MIT/ast-finetuned-audioset-10-10-0.4593) "
                      "or preset:NAME; its preprocessor_config.json is the fbank extractor")
    layer: int = Field(-1, description="hidden-state index to keep (-1 = last)")


AUDIO_TOWERS = PartRegistry("audio tower", AudioTowerCfg)
AudioTowerConfig = AUDIO_TOWERS.field


@dataclass
class AudioTower:
    model: torch.nn.Module
    hidden_size: int
    path: str
    weights_sha256: str
    device: torch.device
    dtype: torch.dtype
    layer: int

    @torch.no_grad()
    def features(self, fbank: torch.Tensor) -> torch.Tensor:
        """(n, frames, mel_bins) normalised fbank -> (n, tokens, D) hidden states of ``layer``."""
        out = self.model(input_values=fbank.to(self.device, self.dtype), output_hidden_states=True)
        return out.hidden_states[self.layer]


class AudioTowerPart(Part):
    """Base of an audio tower class."""

    Cfg: ClassVar[type[AudioTowerCfg]] = AudioTowerCfg

    def build(self) -> AudioTower:
        raise NotImplementedError

    def tokens_per_segment(self) -> int:
        """Tokens ``build().features`` gives for one segment."""
        raise NotImplementedError

    def geometry(self) -> dict[str, Any]:
        """What the driver plans with, read from the checkpoint without loading weights: ``hidden_size``,
        ``num_layers``, ``tokens_per_segment`` and the extractor's ``sampling_rate``, ``num_mel_bins``,
        ``max_length``. ValueError/OSError when the checkpoint is not one of this tower type."""
        raise NotImplementedError


def build_audio_tower(cfg: AudioTowerCfg | dict) -> AudioTower:
    return AUDIO_TOWERS.part(cfg).build()


def flatten_segments(feats: torch.Tensor) -> torch.Tensor:
    """An audio item's features (n_segments, tokens, D) -> (n_segments * tokens, D), segment by segment."""
    if feats.dim() != 3:
        raise ValueError(f"audio features must be (segments, tokens, D), got shape {tuple(feats.shape)}")
    return feats.reshape(-1, feats.shape[-1])


from . import ast  # noqa: E402,F401  (register the built-in audio towers)
