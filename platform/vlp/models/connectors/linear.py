"""The ``linear`` connector (LLaVA / Valley): one Linear per token. May import: torch, vlp.models.connectors."""

from __future__ import annotations

from typing import Literal

import torch.nn as nn

from . import CONNECTORS, Connector, ConnectorCfg


@CONNECTORS.register
class Linear(Connector):
    class Cfg(ConnectorCfg):
        type: Literal["linear"] = "linear"

    def build(self, d_vision: int, d_model: int) -> nn.Module:
        return nn.Linear(d_vision, d_model)  # (N, d_vision) -> (N, d_model)
