"""Encoding media online exactly as precompute did, from what an export records: the towers chat and batch
inference share.

:class:`OnlineEncoder` builds the export's vision tower (or uses the model's own, ``model.tower``, when the model was
trained on pixel rows; and its audio tower and featurizer, when the model was trained on audio features) with the recorded sampling, crop, padding colour, mean/std and audio cuts, and turns a
decoded item into its features: uint8 frames (T, 3, S, S) -> (T, 1 + P, D); an audio item's fbank segments
(n, F, M) -> (n, tokens, D_a). Decoding stays with the caller (chat reads files, infer runs precompute's
decode stage, ``infer.decode_stage``); both then hand the same arrays here.

May import: torch, vlp.data, vlp.formats, vlp.models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

if TYPE_CHECKING:
    from .formats.export import ExportInfo


def audio_featurizer(info: "ExportInfo"):
    """The decode stage's audio featurizer with the export's audio cuts and extractor; None for a model without
    audio. Cheap (the extractor loads on first use): infer's driver builds it without loading a tower."""
    if info.audio is None:
        return None
    from .data.audio import AudioConfig, AudioFeaturizer

    return AudioFeaturizer(AudioConfig(**info.audio.decode), info.audio.path)


class OnlineEncoder:
    """The towers of an export, on ``device``, and the preprocessing its features were made with. ``model_tower``:
    the loaded model's ``tower`` (a PixelTower, or None); a model trained on pixel rows encodes frames with it."""

    def __init__(self, info: "ExportInfo", export_dir: Optional[str] = None, device: str = "cpu",
                 model_tower: Optional[torch.nn.Module] = None):
        from .models.towers import build_vision_tower

        enc, self.sampling = info.media(export_dir) if export_dir else info.media()
        self.device, self.model_tower, self.tower = device, model_tower, None
        if model_tower is not None:  # the trained tower normalises with the mean/std its rows were cut for
            self.geom = info.geometry(enc.image_size, model_tower.mean, model_tower.std)
        else:
            self.tower = build_vision_tower({"type": enc.type, "path": enc.path, "layer": enc.layer, "device": device})
            self.geom = info.geometry(self.tower.image_size, self.tower.mean, self.tower.std)
        self.audio_tower, self.featurizer = None, audio_featurizer(info)
        if info.audio is not None:
            from .models.audio_towers import build_audio_tower

            a = info.audio
            self.audio_tower = build_audio_tower({"type": a.type, "path": a.path, "layer": a.layer, "device": device})

    @torch.no_grad()
    def frames(self, x: torch.Tensor) -> torch.Tensor:
        """(T, 3, S, S) uint8 -> (T, 1 + P, D) float32 features, normalised with the feature set's mean/std."""
        from .data.preprocess import normalize

        if self.model_tower is not None:
            return self.model_tower(x).float().to(self.device)  # (T, 3, S, S) -> (T, 1 + P, D)

        px = normalize(x.to(self.tower.device), self.geom.mean, self.geom.std, self.tower.dtype)
        return self.tower.features(px).float().to(self.device)

    @torch.no_grad()
    def sound(self, fbank: np.ndarray) -> torch.Tensor:
        """(n, F, M) float32 fbank segments -> (n, tokens, D_a) float32 audio features. RuntimeError for a model
        without an audio tower (callers check :attr:`featurizer` first and say so to the user)."""
        if self.audio_tower is None:
            raise RuntimeError("this export has no audio tower")
        return self.audio_tower.features(torch.from_numpy(np.ascontiguousarray(fbank))).float().to(self.device)
