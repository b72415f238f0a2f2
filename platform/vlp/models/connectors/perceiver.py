"""The ``perceiver`` connector: ChatBridge's Q-Former bridge (Zhao et al. 2023, "ChatBridge: Bridging Modalities
with Large Language Model as a Language Catalyst").

Follows the released code, joez17/ChatBridge ``chatbridge/models/chatbridge.py`` (``ChatBridge.__init__``,
``encode_img_``, ``encode_audio``) and its Q-Former ``chatbridge/models/Qformer.py`` (BLIP-2's BERT with
cross-attention, built by ``Blip2Base.init_Qformer`` in ``chatbridge/models/blip2.py``):

- one Q-Former shared by every modality: a LayerNorm on the queries (BERT's embeddings LayerNorm), then
  ``num_layers`` post-LN BERT layers, each self-attention over the queries, cross-attention into the encoder
  tokens on every ``cross_attention_every``-th layer (layers 0, k, 2k, ...: ``cross_attention_freq``, 2), and the
  query FFN (``intermediate_query`` / ``output_query``, GELU);
- separate learnable queries per modality (ChatBridge: ``image_query_tokens`` and ``audio_query_tokens``, 32
  each; here also one set for video, which ChatBridge feeds through the image queries);
- a per-modality input projection into the Q-Former's width (ChatBridge: ``ln_vision`` for images and video,
  ``audio_trans`` after ``ln_audio`` for audio; here LayerNorm + Linear for each modality);
- a video's frames' tokens concatenated in frame order, with optional learned frame positions added to each
  frame's tokens (``visual_temporal_pos_embeds`` / ``audio_temporal_pos_embeds``, zero-initialised, per
  modality; ChatBridge's ``multi_sample``);
- one projection of the query outputs into the LLM width shared by all modalities (``llama_proj``).

Differences: no dropout; no text branch (ChatBridge drops it too: the Q-Former's text FFN and embeddings are
``None``); the cross-attention keys/values project from the Q-Former width (the input projection already maps
the vision width to it). Each modality's input projection takes that modality's feature width (audio comes from
the audio tower: :meth:`Perceiver.build_for`). May import: torch, pydantic, vlp.models.connectors.
"""

from __future__ import annotations

from typing import Literal, Mapping

import torch
import torch.nn as nn
from pydantic import Field, field_validator

from . import CONNECTORS, MODALITIES, Connector, ItemContext
from .blocks import Attention, AttentionCfg, FramePositions, frame_limit_problems

LN_EPS = 1e-12  # BERT's layer_norm_eps
Modality = Literal["image", "video", "audio"]


class QFormerLayer(nn.Module):
    """Post-LN BERT layer over the queries (Q, W): self-attention, cross-attention into (N, W) when
    ``cross``, FFN; each ``LayerNorm(x + sublayer(x))``."""

    def __init__(self, width: int, num_heads: int, inner: int, cross: bool):
        super().__init__()
        self.self_attn = Attention(width, num_heads)
        self.self_ln = nn.LayerNorm(width, eps=LN_EPS)
        self.cross_attn = Attention(width, num_heads) if cross else None
        self.cross_ln = nn.LayerNorm(width, eps=LN_EPS) if cross else None
        self.ffn = nn.Sequential(nn.Linear(width, inner), nn.GELU(), nn.Linear(inner, width))
        self.ffn_ln = nn.LayerNorm(width, eps=LN_EPS)

    def forward(self, q: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        q = self.self_ln(q + self.self_attn(q, q))  # (Q, W)
        if self.cross_attn is not None:
            q = self.cross_ln(q + self.cross_attn(q, enc))  # queries over the encoder tokens (N, W) -> (Q, W)
        return self.ffn_ln(q + self.ffn(q))  # (Q, W)


class QFormerBridge(nn.Module):
    """(N, D_m) pooled tokens of modality m + ItemContext -> (num_queries, d_model), with m's queries."""

    def __init__(self, cfg: "Perceiver.Cfg", widths: Mapping[str, int], d_model: int):
        super().__init__()
        w, mods = cfg.hidden_size, list(cfg.modalities)
        self.inp = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(widths[m]), nn.Linear(widths[m], w)) for m in mods})
        self.frame_pos = nn.ModuleDict({m: FramePositions(cfg.max_frames, w, "max_frames") for m in mods}) \
            if cfg.frame_positions else None
        self.queries = nn.ParameterDict({m: nn.Parameter(torch.empty(cfg.num_queries, w)) for m in mods})  # (Q, W)
        for p in self.queries.values():
            nn.init.normal_(p, std=0.02)  # BLIP-2 / ChatBridge: initializer_range
        self.query_ln = nn.LayerNorm(w, eps=LN_EPS)
        self.layers = nn.ModuleList(QFormerLayer(w, cfg.num_heads, cfg.intermediate_size,
                                                 cross=i % cfg.cross_attention_every == 0)
                                    for i in range(cfg.num_layers))
        self.proj = nn.Linear(w, d_model)

    def forward(self, x: torch.Tensor, ctx: ItemContext = ItemContext()) -> torch.Tensor:
        m = ctx.modality
        if m not in self.queries:
            raise ValueError(f"connector 'perceiver' has no queries for {m} items (model.connector.modalities: "
                             f"{', '.join(self.queries)})")
        enc = self.inp[m](x)  # (N, D_m) -> (N, W)
        if self.frame_pos is not None:
            enc = self.frame_pos[m](enc, ctx)  # + a position on each frame's tokens
        q = self.query_ln(self.queries[m])  # (Q, W)
        for layer in self.layers:
            q = layer(q, enc)
        return self.proj(q)  # (Q, W) -> (Q, d_model)


@CONNECTORS.register
class Perceiver(Connector):
    """ChatBridge's Q-Former bridge: ``num_queries`` tokens whatever comes in, from the item's modality's queries."""

    takes_context = True

    class Cfg(AttentionCfg):
        type: Literal["perceiver"] = "perceiver"
        num_queries: int = Field(32, ge=1, description="learnable queries per modality = visual tokens out")
        modalities: list[Modality] = Field(list(MODALITIES), min_length=1, description="modalities with their "
                                           "own queries, input projection and frame positions")
        num_layers: int = Field(12, ge=1, description="Q-Former layers (self-attention, cross-attention on every "
                                "cross_attention_every-th, FFN)")
        hidden_size: int = Field(768, ge=1, description="Q-Former width (queries, layers)")
        num_heads: int = Field(12, ge=1, description="attention heads; must divide hidden_size")
        intermediate_size: int = Field(3072, ge=1, description="inner width of the FFN")
        cross_attention_every: int = Field(2, ge=1, description="cross-attention into the encoder tokens on "
                                           "layers 0, k, 2k, ... (BLIP-2's cross_attention_freq)")
        frame_positions: bool = Field(True, description="add a learned position per frame (per modality) to the "
                                      "per-frame tokens (the pooler's layout)")
        max_frames: int = Field(32, ge=1, description="frames the frame positions cover; a longer item fails")

        @field_validator("modalities")
        @classmethod
        def _unique(cls, v: list[str]) -> list[str]:
            if len(set(v)) != len(v):
                raise ValueError(f"a modality is listed twice: {v}")
            return v

    def build(self, d_vision: int, d_model: int) -> nn.Module:
        return QFormerBridge(self.cfg, {m: d_vision for m in self.cfg.modalities}, d_model)

    def width_problems(self, widths: Mapping[str, int]) -> list[str]:
        return []  # an input projection per modality: any widths

    def item_problems(self, extents: Mapping[str, int]) -> list[str]:
        out = [f"model.connector.modalities: the feature sets hold {m} items, which the perceiver has no queries for "
               f"(it has {', '.join(self.cfg.modalities)})" for m in extents if m not in self.cfg.modalities]
        return out + frame_limit_problems(self.cfg, extents)

    def build_for(self, widths: Mapping[str, int], d_model: int) -> nn.Module:
        """Each modality's input projection from its own width (a modality without features: the vision width)."""
        d_vision = widths.get("image", next(iter(widths.values())))
        return QFormerBridge(self.cfg, {m: widths.get(m, d_vision) for m in self.cfg.modalities}, d_model)

    def num_tokens(self, n_in: int, ctx: ItemContext = ItemContext()) -> int:
        return self.cfg.num_queries
