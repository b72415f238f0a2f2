"""VideoLLM: vision tower (optional) -> temporal pooler -> connector -> causal LM.

Every part is chosen by a ``type`` key in its config and frozen or trained explicitly. The
``VISUAL_TOKEN_INDEX`` placeholder in ``input_ids`` is replaced by that sample's visual tokens; a batch
may mix videos, images (T=1) and text-only samples of different lengths.
"""

from __future__ import annotations

import os
from typing import Callable, Literal, Optional

import torch
import torch.nn as nn
from pydantic import Field, field_validator

from ..config import Cfg
from ..data.conversation import IGNORE_INDEX, VISUAL_TOKEN_INDEX
from ..registry import Registry
from .presets import resolve_model_path

POOLERS: Registry[Callable[..., torch.Tensor]] = Registry("temporal pooler")
CONNECTORS: Registry[Callable[[int, int], nn.Module]] = Registry("connector")


# ------------------------------------------------------------------------------------------- poolers
# A pooler maps one sample's features to its visual token sequence. Features arrive either as
# frames (T, 1 + P, D) (feature mode "frames") or already Valley-pooled (P + T, D) ("valley_pooled").

@POOLERS.register("valley")
def pool_valley(feats: torch.Tensor, mode: str, num_frames: int) -> torch.Tensor:
    """Valley: P patch tokens averaged over time, then the T per-frame CLS tokens -> (P + T, D)."""
    if mode == "valley_pooled":
        return feats  # (P + T, D), pooled at precompute time
    cls_tokens = feats[:, 0]  # (T, 1 + P, D) -> (T, D)
    patches = feats[:, 1:].mean(0)  # (T, P, D) -> (P, D)
    return torch.cat([patches, cls_tokens], 0)  # -> (P + T, D)


@POOLERS.register("patch_mean")
def pool_patch_mean(feats: torch.Tensor, mode: str, num_frames: int) -> torch.Tensor:
    """Ablation: patch tokens averaged over time only, no CLS tokens -> (P, D). Blind to temporal order."""
    if mode == "valley_pooled":
        return feats[: feats.shape[0] - num_frames]  # (P + T, D) -> (P, D)
    return feats[:, 1:].mean(0)  # (T, 1 + P, D) -> (P, D)


@POOLERS.register("none")
def pool_none(feats: torch.Tensor, mode: str, num_frames: int) -> torch.Tensor:
    """Frames as-is: every frame's patch tokens in order -> (T * P, D). Needs feature mode 'frames'."""
    if mode != "frames":
        raise ValueError("pooler 'none' needs features precomputed with output.mode=frames")
    return feats[:, 1:].reshape(-1, feats.shape[-1])  # (T, 1 + P, D) -> (T * P, D)


# ------------------------------------------------------------------------------------------- connectors

@CONNECTORS.register("linear")
def linear_connector(d_vision: int, d_model: int) -> nn.Module:
    return nn.Linear(d_vision, d_model)


@CONNECTORS.register("mlp2x_gelu")
def mlp2x_gelu_connector(d_vision: int, d_model: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_vision, d_model), nn.GELU(), nn.Linear(d_model, d_model))


class PoolerConfig(Cfg):
    type: str = Field("valley", description="valley | patch_mean | none")

    @field_validator("type")
    @classmethod
    def _known(cls, v):
        return POOLERS.validate(v)


class ConnectorConfig(Cfg):
    type: str = Field("linear", description="linear (LLaVA/Valley) | mlp2x_gelu (LLaVA-1.5)")
    trainable: bool = True
    init_from: Optional[str] = Field(None, description="connector.safetensors of an earlier run (stage 1 -> 2)")

    @field_validator("type")
    @classmethod
    def _known(cls, v):
        return CONNECTORS.validate(v)


def looks_local(path: str) -> bool:
    """The rule for model paths: local (so it must exist) when absolute, starting with ./ ../ or ~, or holding
    more than one '/'; a hub id is exactly ``org/name`` (one '/'), ``preset:NAME`` and URLs are not local."""
    if path.startswith("preset:") or "://" in path:
        return False
    return path.startswith(("/", "./", "../", "~")) or path in (".", "..") or path.count("/") > 1


def check_model_path(path: Optional[str]) -> Optional[str]:
    """Validator: a local model path (:func:`looks_local`) must exist, so a typo fails with the config, before
    Ray starts, instead of as a hub download error inside every training worker."""
    if path is not None and looks_local(path) and not os.path.exists(os.path.expanduser(path)):
        raise ValueError(f"no such folder: {path} (a local path: absolute, ./, ../, ~ or more than one '/'; "
                         "hub ids are org/name, presets preset:NAME)")
    return path


class LLMConfig(Cfg):
    path: str = Field("preset:tiny-llama", description="folder, hub id or preset:NAME of a causal LM")
    tokenizer: Optional[str] = Field(None, description="defaults to the LM path")
    trainable: bool = False
    gradient_checkpointing: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @field_validator("path", "tokenizer")
    @classmethod
    def _local_paths_exist(cls, v):
        return check_model_path(v)


class ModelConfig(Cfg):
    """The VideoLLM parts. The vision tower is absent when training on precomputed features."""

    vision_hidden_size: Optional[int] = Field(
        None, ge=1, description="D of the visual features; None = read from the feature set (must match it)")
    pooler: PoolerConfig = PoolerConfig()
    connector: ConnectorConfig = ConnectorConfig()
    llm: LLMConfig = LLMConfig()


class VideoLLM(nn.Module):
    def __init__(self, cfg: ModelConfig, llm: Optional[nn.Module] = None):
        super().__init__()
        from transformers import AutoModelForCausalLM

        if cfg.vision_hidden_size is None:
            raise ValueError("model.vision_hidden_size is not set (training fills it from the feature set)")
        self.cfg = cfg
        dtype = getattr(torch, cfg.llm.dtype)
        self.llm = llm if llm is not None else AutoModelForCausalLM.from_pretrained(
            resolve_model_path(cfg.llm.path), dtype=dtype)
        d_model = self.llm.get_input_embeddings().weight.shape[1]
        self.connector = CONNECTORS.get(cfg.connector.type)(cfg.vision_hidden_size, d_model)
        self.pool = POOLERS.get(cfg.pooler.type)
        self.llm.requires_grad_(cfg.llm.trainable)
        self.connector.requires_grad_(cfg.connector.trainable)
        if cfg.llm.gradient_checkpointing and cfg.llm.trainable:
            self.llm.gradient_checkpointing_enable()
            self.llm.config.use_cache = False

    def visual_tokens(self, feats: torch.Tensor, mode: str, num_frames: int) -> torch.Tensor:
        """One sample's features -> (N_visual, d_model) embeddings."""
        pooled = self.pool(feats, mode, num_frames)  # -> (N_visual, D)
        w = next(self.connector.parameters())
        return self.connector(pooled.to(w.dtype))  # (N_visual, D) -> (N_visual, d_model)

    def build_inputs(self, input_ids: list[torch.Tensor], labels: Optional[list[torch.Tensor]],
                     visuals: list[Optional[torch.Tensor]]):
        """Splice visual tokens into each sample's text embeddings and right-pad the batch.

        input_ids[i]: (L_i,) with at most one VISUAL_TOKEN_INDEX; visuals[i]: (N_i, d_model) or None.
        Returns inputs_embeds (B, L, d_model), attention_mask (B, L), labels (B, L) or None.
        """
        emb = self.llm.get_input_embeddings()
        device = emb.weight.device
        seqs, labs = [], []
        for i, ids in enumerate(input_ids):
            ids = ids.to(device)
            lab = labels[i].to(device) if labels is not None else None
            pos = (ids == VISUAL_TOKEN_INDEX).nonzero().flatten()
            text = emb(ids.clamp(min=0))  # (L_i,) -> (L_i, d_model)
            if len(pos):
                p = int(pos[0])
                v = visuals[i]
                if v is None:
                    raise ValueError(f"sample {i} has a visual placeholder but no visual features")
                v = v.to(text.dtype)
                text = torch.cat([text[:p], v, text[p + 1:]])  # (L_i - 1 + N_i, d_model)
                if lab is not None:
                    lab = torch.cat([lab[:p], torch.full((v.shape[0],), IGNORE_INDEX, device=device), lab[p + 1:]])
            seqs.append(text)
            labs.append(lab)
        L = max(s.shape[0] for s in seqs)
        B, d = len(seqs), seqs[0].shape[1]
        embeds = seqs[0].new_zeros(B, L, d)
        mask = torch.zeros(B, L, dtype=torch.long, device=device)
        out_labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long, device=device) if labels is not None else None
        for i, s in enumerate(seqs):
            embeds[i, : s.shape[0]] = s
            mask[i, : s.shape[0]] = 1
            if out_labels is not None:
                out_labels[i, : s.shape[0]] = labs[i]
        return embeds, mask, out_labels

    def forward(self, input_ids, labels, features, modes, num_frames):
        visuals = [None if f is None else self.visual_tokens(f, m, t) for f, m, t in zip(features, modes, num_frames)]
        embeds, mask, lab = self.build_inputs(input_ids, labels, visuals)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, labels=lab)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, feature: Optional[torch.Tensor], mode: str = "valley_pooled",
                 num_frames: int = 1, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, eos_token_id: Optional[int] = None, generator=None):
        """Greedy or sampled decoding for one prompt; yields token ids as they are produced (streaming)."""
        visual = None if feature is None else self.visual_tokens(feature, mode, num_frames)
        embeds, mask, _ = self.build_inputs([input_ids], None, [visual])
        past = None
        cur = embeds
        for _ in range(max_new_tokens):
            out = self.llm(inputs_embeds=cur, attention_mask=mask, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float()  # (V,)
            if do_sample:
                probs = torch.softmax(logits / max(temperature, 1e-5), -1)
                if top_p < 1.0:
                    sp, si = probs.sort(descending=True)
                    keep = sp.cumsum(0) - sp < top_p
                    probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
                tok = int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
            else:
                tok = int(logits.argmax())
            if eos_token_id is not None and tok == eos_token_id:
                return
            yield tok
            cur = self.llm.get_input_embeddings()(torch.tensor([[tok]], device=embeds.device))
            mask = torch.cat([mask, mask.new_ones(1, 1)], 1)
