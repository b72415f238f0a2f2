"""The ``per_modality`` connector: a separate adapter per modality, as LEGO / GroundingGPT has them (lzw-lzw/LEGO:
image features through an MLP, video frames through a Q-Former-style adapter with frame positions, audio through
its own): each item goes through the connector of its modality (``ItemContext.modality``).

Each of ``image``, ``video``, ``audio`` is any registered connector but ``per_modality`` itself, with its own
parameters and input width (so the audio tower may be narrower than the vision tower); its tokens out are that
connector's. The adapters train and load together: ``trainable`` and ``init_from`` are this connector's (an
adapter's own must stay at their defaults), and its state dict holds ``adapters.<modality>.*``.

May import: torch, vlp.models.connectors.
"""

from __future__ import annotations

from typing import Literal, Mapping, Optional

import torch
import torch.nn as nn
from pydantic import model_validator

from . import CONNECTORS, Connector, ConnectorCfg, ConnectorConfig, ItemContext, MODALITIES


@CONNECTORS.register
class PerModality(Connector):
    takes_context = True

    class Cfg(ConnectorCfg):
        type: Literal["per_modality"] = "per_modality"
        image: Optional[ConnectorConfig] = None
        video: Optional[ConnectorConfig] = None
        audio: Optional[ConnectorConfig] = None

        @model_validator(mode="after")
        def _adapters(self):
            subs = self.adapters()
            if not subs:
                raise ValueError("name at least one adapter (image, video or audio)")
            for m, c in subs.items():
                if c.type == "per_modality":
                    raise ValueError(f"{m}: an adapter cannot itself be per_modality")
                if not c.trainable or c.init_from is not None:
                    raise ValueError(f"{m}: set trainable / init_from on the per_modality connector, not on an "
                                     "adapter (they train and load together)")
            return self

        def adapters(self) -> dict:
            return {m: c for m in MODALITIES if (c := getattr(self, m)) is not None}

    cfg: Cfg

    def parts(self) -> dict[str, Connector]:
        """modality -> its adapter's part, made once (token counts ask for it per item)."""
        if getattr(self, "_parts", None) is None:
            self._parts = {m: CONNECTORS.part(c) for m, c in self.cfg.adapters().items()}
        return self._parts

    def build(self, d_vision: int, d_model: int) -> nn.Module:
        return self.build_for({m: d_vision for m in MODALITIES}, d_model)

    def build_for(self, widths: Mapping[str, int], d_model: int) -> nn.Module:
        """Each adapter for its modality's width (a modality without features: the vision width)."""
        d_vision = widths.get("image", next(iter(widths.values())))
        return PerModalityModule({m: (p, widths.get(m, d_vision)) for m, p in self.parts().items()}, d_model)

    def width_problems(self, widths: Mapping[str, int]) -> list[str]:
        return []  # each adapter takes its own modality's width

    def item_problems(self, extents: Mapping[str, int]) -> list[str]:
        parts = self.parts()
        out = [f"model.connector: the feature sets hold {m} items, which per_modality has no adapter for (it has "
               f"{', '.join(parts)})" for m in extents if m not in parts]
        for m, p in parts.items():
            out += [f"model.connector.{m}: {x}" for x in p.item_problems({m: extents[m]} if m in extents else {})]
        return out

    def num_tokens(self, n_in: int, ctx: ItemContext = ItemContext()) -> int:
        part = self.parts().get(ctx.modality)
        if part is None:
            raise ValueError(f"per_modality has no adapter for {ctx.modality} items")
        return part.num_tokens(n_in, ctx) if part.takes_context else part.num_tokens(n_in)


class PerModalityModule(nn.Module):
    """adapters[m]: the module of modality m's connector; forward routes an item by ``ctx.modality``."""

    def __init__(self, parts: dict[str, tuple[Connector, int]], d_model: int):
        super().__init__()
        self.adapters = nn.ModuleDict({m: p.build_for({m: d}, d_model) for m, (p, d) in parts.items()})
        self.takes = {m: p.takes_context for m, (p, _) in parts.items()}

    def forward(self, x: torch.Tensor, ctx: ItemContext = ItemContext()) -> torch.Tensor:
        """(N, D_m) pooled tokens of one item -> (M, d_model) through its modality's adapter."""
        if ctx.modality not in self.adapters:
            raise ValueError(f"per_modality has no adapter for {ctx.modality} items (it has "
                             f"{', '.join(self.adapters)})")
        mod = self.adapters[ctx.modality]
        return mod(x, ctx) if self.takes[ctx.modality] else mod(x)
