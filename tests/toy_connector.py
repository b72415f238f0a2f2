"""A connector defined outside vlp: ``toy_queries``, a learnable-query connector (Q-Former / perceiver style, one
cross-attention). It maps (N, D) pooled tokens to ``num_queries`` tokens, so it changes the visual token count.

Nothing in vlp names it: a config lists this module in ``model.plugins`` and names the type in
``model.connector`` (tests/models/test_toy_connector.py trains a step with it through the real training path).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from vlp.models.connectors import CONNECTORS, Connector, ConnectorCfg


class QueryPool(nn.Module):
    def __init__(self, d_vision: int, d_model: int, num_queries: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, d_model) * 0.02)  # (Q, d_model)
        self.proj = nn.Linear(d_vision, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.proj(x)  # (N, D) -> (N, d_model)
        att = torch.softmax(self.queries @ kv.T / kv.shape[-1] ** 0.5, -1)  # (Q, N)
        return self.queries + att @ kv  # (Q, d_model)


@CONNECTORS.register
class ToyQueries(Connector):
    class Cfg(ConnectorCfg):
        type: Literal["toy_queries"] = "toy_queries"
        num_queries: int = Field(4, ge=1, description="visual tokens out, whatever comes in")

    def build(self, d_vision: int, d_model: int) -> nn.Module:
        return QueryPool(d_vision, d_model, self.cfg.num_queries)

    def num_tokens(self, n_in: int) -> int:
        return self.cfg.num_queries
