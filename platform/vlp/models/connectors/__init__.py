"""Connectors (projectors): pooled visual tokens (N, D) -> LLM embeddings (M, d_model), chosen by
``model.connector.type``.

A connector class (one module each: linear, mlp, abstractor, perceiver, per_modality) owns its ``Cfg``
(``trainable`` and
``init_from`` are common to every connector; a class adds its own parameters), ``build`` (the nn.Module whose state
dict is connector.safetensors) and ``num_tokens``: M for N input tokens (N for a per-token projector; a
learnable-query connector returns its number of queries). docs/extending.md says how to add one.

A connector that needs to know more of the item than its pooled tokens sets ``takes_context = True``: its
module's forward and its ``num_tokens`` then get an :class:`ItemContext` as their second argument (the item's
modality and how its pooled tokens are laid out over frames). Connectors that leave it False (linear, mlp, every
plugin written before it existed) are called exactly as before.

May import: torch, vlp.config, vlp.models.parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping, Optional

import torch.nn as nn
from pydantic import Field

from ..parts import Part, PartCfg, PartRegistry

MODALITIES = ("image", "video", "audio")


@dataclass(frozen=True)
class ItemContext:
    """One media item as a context-taking connector sees it, besides its pooled tokens (N, D).

    ``modality``: image, video or audio. ``num_frames``: T of the item (1 for an image). ``tokens_per_frame``: the
    last ``num_frames * tokens_per_frame`` pooled tokens are per-frame groups in frame order (``tokens_per_frame``
    tokens of frame 0, then of frame 1, ...); the tokens before them belong to no one frame (e.g. Valley's
    time-averaged patches). 0: no per-frame tokens at all. The pooler says which (``Pooler.tokens_per_frame``):
    ``none`` gives T * P tokens with P per frame, ``valley`` P + T with 1 per frame (the CLS tokens),
    ``patch_mean`` P with 0."""

    modality: str = "image"
    num_frames: int = 1
    tokens_per_frame: int = 0

    def shared_tokens(self, n: int) -> int:
        """How many of ``n`` pooled tokens come before the per-frame groups (``n - T * tokens_per_frame``)."""
        lead = n - self.num_frames * self.tokens_per_frame
        if lead < 0:
            raise ValueError(f"{n} pooled tokens cannot hold {self.num_frames} frames x {self.tokens_per_frame} "
                             "tokens per frame")
        return lead


def default_modality(num_frames: int) -> str:
    """The modality of an item nobody named: an image is T=1 in this platform, anything longer a video."""
    return "image" if int(num_frames) == 1 else "video"


class ConnectorCfg(PartCfg):
    """A connector; ``type`` picks the registered connector class, whose Cfg holds its parameters."""

    type: str = Field("linear", description="registered connector type")
    trainable: bool = True
    init_from: Optional[str] = Field(None, description="connector.safetensors of an earlier run (stage 1 -> 2)")


CONNECTORS = PartRegistry("connector", ConnectorCfg)
ConnectorConfig = CONNECTORS.field  # annotation of a config field holding any registered connector's Cfg


class Connector(Part):
    """Base of a connector class. ``takes_context``: its module's forward is ``(x, ctx)`` and its ``num_tokens``
    is ``(n_in, ctx)``, ``ctx`` an :class:`ItemContext`; False (the default): ``(x)`` and ``(n_in)``."""

    Cfg: ClassVar[type[ConnectorCfg]] = ConnectorCfg
    takes_context: ClassVar[bool] = False

    def build(self, d_vision: int, d_model: int) -> nn.Module:
        """The module: forward maps (N, d_vision) -> (num_tokens(N), d_model). Called on the meta device too
        (the trainer's parameter count), so it must not read or initialise weights from elsewhere."""
        raise NotImplementedError

    def num_tokens(self, n_in: int) -> int:
        """Tokens out for ``n_in`` pooled tokens in; a per-token projector keeps the count."""
        return n_in

    def width_problems(self, widths: Mapping[str, int]) -> list[str]:
        """Why this connector cannot take features of these widths (modality -> D, e.g. an audio tower narrower
        than the vision tower); [] if it can. The default: one input projection, so one width for all."""
        if len(set(widths.values())) <= 1:
            return []
        have = ", ".join(f"{m} {d}" for m, d in widths.items())
        return [f"model.connector.type={self.cfg.type} takes features of one width, but they differ ({have}); use "
                "a connector with an input projection per modality (perceiver)"]

    def item_problems(self, extents: Mapping[str, int]) -> list[str]:
        """Why this connector cannot take the items the feature sets hold (modality -> the most frames, or audio
        segments, an item has); [] if it can. Checked before training starts: a connector with per-modality parts or
        a frame limit says so here rather than failing mid-run. The default: any."""
        return []

    def build_for(self, widths: Mapping[str, int], d_model: int) -> nn.Module:
        """The module for features of ``widths`` (modality -> D): :meth:`build` with the one width by default; a
        connector with an input projection per modality overrides it. ValueError when :meth:`width_problems`."""
        problems = self.width_problems(widths)
        if problems:
            raise ValueError(problems[0])
        return self.build(next(iter(widths.values())), d_model)


from . import abstractor, linear, mlp, per_modality, perceiver  # noqa: E402,F401  (register the built-ins)
