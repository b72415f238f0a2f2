"""The ``mlp2x_gelu`` connector (LLaVA-1.5): Linear -> GELU -> Linear per token.
May import: torch, vlp.models.connectors."""

from __future__ import annotations

from typing import Literal

import torch.nn as nn

from . import CONNECTORS, Connector, ConnectorCfg


@CONNECTORS.register
class Mlp2xGelu(Connector):
    class Cfg(ConnectorCfg):
        type: Literal["mlp2x_gelu"] = "mlp2x_gelu"

    def build(self, d_vision: int, d_model: int) -> nn.Module:
        # (N, d_vision) -> (N, d_model) -> (N, d_model); Sequential keeps the state-dict keys of older exports
        return nn.Sequential(nn.Linear(d_vision, d_model), nn.GELU(), nn.Linear(d_model, d_model))
