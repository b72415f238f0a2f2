"""The ``abstractor`` connector: mPLUG-Owl's visual abstractor (Ye et al. 2023, "mPLUG-Owl: Modularization
Empowers Large Language Models with Multimodality").

Follows the released code, X-PLUG/mPLUG-Owl ``mPLUG-Owl/mplug_owl/modeling_mplug_owl.py``
(``MplugOwlVisualAbstractorModel`` and its layers) and, for video, ``mPLUG-Owl/mplug_owl_video/modeling_mplug_owl.py``:

- learnable queries (Owl: ``query_tokens``, 64) pass through ``num_layers`` layers; in each, the queries attend
  over the concatenation [queries; vision tokens] in one attention (Owl's ``MplugOwlVisualAbstractorAttention``:
  LayerNorm ``norm1`` on the queries, ``normk`` on the vision tokens, keys and values from both), then a SwiGLU
  MLP with a LayerNorm on its inner width (``MplugOwlVisualAbstractorMLP``: ``w1``, ``w3``, SiLU gate,
  ``ffn_ln``, ``w2``) after a LayerNorm (``norm2``), each with a residual;
- a final Linear to the LLM width (``visual_fc``) and a learnable end token appended (``vit_eos``): Q + 1 tokens;
- video (``mplug_owl_video``): the queries attend over all frames' tokens at once, and optional temporal queries
  (``temporal_query_tokens``, as many as the queries) go through the layers next to them; their outputs,
  projected by their own Linear (``temporal_visual_fc``), are added to the queries' outputs. Only for items of
  more than one frame, as in Owl (``T == 1``: no temporal queries).

Differences, on purpose: the residual is added to the query stream before its LayerNorm (the usual pre-LN
block; Owl's released layer adds it to the normalised queries); the vision tokens get a learned per-frame
position (``max_frames``; Owl's video model puts its temporal modelling in the vision encoder instead, which here
is frozen and precomputed); a Linear maps the vision width to ``hidden_size`` when they differ (Owl requires them
equal); no dropout. May import: torch, pydantic, vlp.models.connectors.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from . import CONNECTORS, Connector, ItemContext
from .blocks import Attention, AttentionCfg, FramePositions, frame_limit_problems

LN_EPS = 1e-6  # Owl's layer_norm_eps


class SwiGLU(nn.Module):
    """Owl's abstractor MLP: (Q, W) -> (Q, W) through SiLU(w1 x) * w3 x, a LayerNorm of that inner width, w2."""

    def __init__(self, width: int, inner: int):
        super().__init__()
        self.w1 = nn.Linear(width, inner)
        self.w3 = nn.Linear(width, inner)
        self.ffn_ln = nn.LayerNorm(inner, eps=LN_EPS)
        self.w2 = nn.Linear(inner, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.silu(self.w1(x)) * self.w3(x)  # (Q, W) -> (Q, inner)
        return self.w2(self.ffn_ln(h))  # (Q, inner) -> (Q, W)


class AbstractorLayer(nn.Module):
    """Queries (Q, W) attend over [queries; vision tokens] ((Q + N, W)), then the SwiGLU MLP; pre-LN, residual."""

    def __init__(self, width: int, num_heads: int, inner: int):
        super().__init__()
        self.norm_q = nn.LayerNorm(width, eps=LN_EPS)
        self.norm_v = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = Attention(width, num_heads)
        self.norm_mlp = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = SwiGLU(width, inner)

    def forward(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qn = self.norm_q(q)  # (Q, W)
        q = q + self.attn(qn, torch.cat([qn, self.norm_v(v)]))  # keys/values (Q + N, W) -> (Q, W)
        return q + self.mlp(self.norm_mlp(q))  # (Q, W)


class VisualAbstractor(nn.Module):
    """(N, d_vision) pooled tokens + ItemContext -> (num_queries + 1, d_model)."""

    def __init__(self, cfg: "Abstractor.Cfg", d_vision: int, d_model: int):
        super().__init__()
        w = cfg.hidden_size
        self.inp = nn.Linear(d_vision, w) if d_vision != w else nn.Identity()
        self.frame_pos = FramePositions(cfg.max_frames, w, "max_frames") if cfg.frame_positions else None
        self.queries = nn.Parameter(torch.empty(cfg.num_queries, w))  # (Q, W)
        self.temporal_queries = nn.Parameter(torch.empty(cfg.num_queries, w)) if cfg.temporal_queries else None
        self.layers = nn.ModuleList(AbstractorLayer(w, cfg.num_heads, cfg.intermediate_size)
                                    for _ in range(cfg.num_layers))
        self.visual_fc = nn.Linear(w, d_model)
        self.temporal_visual_fc = nn.Linear(w, d_model) if cfg.temporal_queries else None
        self.eos = nn.Parameter(torch.empty(1, d_model))  # (1, d_model)
        for p in (self.queries, self.temporal_queries, self.eos):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)  # Owl's initializer_range

    def forward(self, x: torch.Tensor, ctx: ItemContext = ItemContext()) -> torch.Tensor:
        v = self.inp(x)  # (N, d_vision) -> (N, W)
        if self.frame_pos is not None:
            v = self.frame_pos(v, ctx)  # + a position on each frame's tokens
        q_len = self.queries.shape[0]
        temporal = self.temporal_queries is not None and ctx.num_frames > 1
        q = torch.cat([self.queries, self.temporal_queries]) if temporal else self.queries  # (Q or 2Q, W)
        for layer in self.layers:
            q = layer(q, v)
        out = self.visual_fc(q[:q_len])  # (Q, W) -> (Q, d_model)
        if temporal:
            out = out + self.temporal_visual_fc(q[q_len:])  # Owl video: temporal queries' outputs added
        return torch.cat([out, self.eos.to(out.dtype)])  # (Q + 1, d_model)


@CONNECTORS.register
class Abstractor(Connector):
    """mPLUG-Owl's visual abstractor: ``num_queries`` + 1 tokens whatever comes in."""

    takes_context = True

    class Cfg(AttentionCfg):
        type: Literal["abstractor"] = "abstractor"
        num_queries: int = Field(64, ge=1, description="learnable queries; visual tokens out = num_queries + 1 "
                                 "(the end token)")
        num_layers: int = Field(6, ge=1, description="abstractor layers (attention over [queries; vision "
                                "tokens], then a SwiGLU MLP)")
        hidden_size: int = Field(1024, ge=1, description="width of the queries and layers; vision tokens of "
                                 "another width are projected to it first")
        num_heads: int = Field(16, ge=1, description="attention heads; must divide hidden_size")
        intermediate_size: int = Field(4096, ge=1, description="inner width of the SwiGLU MLP")
        frame_positions: bool = Field(True, description="add a learned position per frame to the per-frame "
                                      "tokens (the pooler's layout)")
        max_frames: int = Field(32, ge=1, description="frames the frame positions cover; a longer item fails")
        temporal_queries: bool = Field(False, description="mPLUG-Owl video's temporal queries, added to the "
                                       "output for items of more than one frame")

    def build(self, d_vision: int, d_model: int) -> nn.Module:
        return VisualAbstractor(self.cfg, d_vision, d_model)

    def num_tokens(self, n_in: int, ctx: ItemContext = ItemContext()) -> int:
        return self.cfg.num_queries + 1

    def item_problems(self, extents) -> list[str]:
        return frame_limit_problems(self.cfg, extents)
