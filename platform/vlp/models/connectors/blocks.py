"""Building blocks of the learnable-query connectors (abstractor, perceiver): multi-head attention of one
item's queries over a token sequence, and learned per-frame positions. Everything is per item, unbatched: the
VideoLLM calls a connector once per media item. May import: torch, vlp.models.connectors."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import ValidationInfo, field_validator

from . import ConnectorCfg, ItemContext


def heads_problem(width: int, num_heads: int, width_name: str = "hidden_size") -> str | None:
    """Why ``num_heads`` cannot split ``width`` (a config validator's message), or None."""
    if width % num_heads:
        return f"{width_name}={width} is not a multiple of num_heads={num_heads}"
    return None


class AttentionCfg(ConnectorCfg):
    """Base of an attention connector's Cfg: its ``num_heads`` must divide its ``hidden_size`` (both fields
    declared by the subclass, with its own defaults)."""

    @field_validator("num_heads", check_fields=False)
    @classmethod
    def _heads_divide_width(cls, v: int, info: ValidationInfo) -> int:
        problem = heads_problem(info.data["hidden_size"], v) if "hidden_size" in info.data else None
        if problem:
            raise ValueError(problem)
        return v


class Attention(nn.Module):
    """Multi-head attention: queries (Q, W) attend over keys/values (K, W) -> (Q, W). Separate query, key, value
    and output projections (the layout of mPLUG-Owl's abstractor attention and of BERT's / the Q-Former's)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        problem = heads_problem(width, num_heads)
        if problem:
            raise ValueError(problem)
        self.num_heads = num_heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(0, 1)  # (L, W) -> (heads, L, W / heads)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        heads = F.scaled_dot_product_attention(  # (heads, Q, W / heads)
            self._split(self.query(q)), self._split(self.key(kv)), self._split(self.value(kv)))
        return self.out(heads.transpose(0, 1).flatten(1))  # (heads, Q, W / heads) -> (Q, W)


class FramePositions(nn.Module):
    """A learned position per frame, added to the item's per-frame tokens (:class:`ItemContext`): frame t's
    tokens get row t; tokens of no one frame get nothing. Zero-initialised (as ChatBridge's temporal position
    embeddings), so a model starts as if it had none."""

    def __init__(self, max_frames: int, width: int, config_key: str):
        super().__init__()
        self.config_key = config_key  # named in the error for a longer item
        self.table = nn.Parameter(torch.zeros(max_frames, width))  # (max_frames, W)

    def forward(self, x: torch.Tensor, ctx: ItemContext) -> torch.Tensor:
        lead = ctx.shared_tokens(x.shape[0])
        if ctx.tokens_per_frame == 0:
            return x  # (N, W): no per-frame tokens
        if ctx.num_frames > self.table.shape[0]:
            raise ValueError(f"a {ctx.modality} of {ctx.num_frames} frames is longer than the connector's "
                             f"{self.config_key}={self.table.shape[0]}")
        per_frame = self.table[: ctx.num_frames].repeat_interleave(ctx.tokens_per_frame, 0)  # (T * tpf, W)
        return torch.cat([x[:lead], x[lead:] + per_frame.to(x.dtype)])  # (N, W)


def frame_limit_problems(cfg, extents) -> list[str]:
    """The items longer than a connector's frame positions cover (``cfg.frame_positions``, ``cfg.max_frames``;
    ``extents``: modality -> the most frames, or audio segments, an item has), which would fail mid-run."""
    if not getattr(cfg, "frame_positions", False):
        return []
    return [f"model.connector.max_frames: the feature sets hold {m} items of up to {n} "
            f"{'segments' if m == 'audio' else 'frames'}, more than max_frames={cfg.max_frames} (raise it, or set "
            "frame_positions: false)" for m, n in extents.items() if n > cfg.max_frames]
