"""Connectors (projectors): pooled visual tokens (N, D) -> LLM embeddings (M, d_model), chosen by
``model.connector.type``.

A connector class (one module each: linear, mlp) owns its ``Cfg`` (``trainable`` and ``init_from`` are common to
every connector; a class adds its own parameters), ``build`` (the nn.Module whose state dict is
connector.safetensors) and ``num_tokens``: M for N input tokens (N for a per-token projector; a learnable-query
connector returns its number of queries). docs/extending.md says how to add one.

May import: torch, vlp.config, vlp.models.parts.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch.nn as nn
from pydantic import Field

from ..parts import Part, PartCfg, PartRegistry


class ConnectorCfg(PartCfg):
    """A connector; ``type`` picks the registered connector class, whose Cfg holds its parameters."""

    type: str = Field("linear", description="registered connector type")
    trainable: bool = True
    init_from: Optional[str] = Field(None, description="connector.safetensors of an earlier run (stage 1 -> 2)")


CONNECTORS = PartRegistry("connector", ConnectorCfg)
ConnectorConfig = CONNECTORS.field  # annotation of a config field holding any registered connector's Cfg


class Connector(Part):
    """Base of a connector class."""

    Cfg: ClassVar[type[ConnectorCfg]] = ConnectorCfg

    def build(self, d_vision: int, d_model: int) -> nn.Module:
        """The module: forward maps (N, d_vision) -> (num_tokens(N), d_model). Called on the meta device too
        (the trainer's parameter count), so it must not read or initialise weights from elsewhere."""
        raise NotImplementedError

    def num_tokens(self, n_in: int) -> int:
        """Tokens out for ``n_in`` pooled tokens in; a per-token projector keeps the count."""
        return n_in


from . import linear, mlp  # noqa: E402,F401  (register the built-in connectors)
