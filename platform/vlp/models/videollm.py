"""VideoLLM: vision tower (optional) -> temporal pooler -> connector -> causal LM.

Every part is chosen by a ``type`` key in its config (the part classes live in models/poolers,
models/connectors and models/towers; ``model.plugins`` imports modules that register more) and frozen or
trained explicitly. The
``VISUAL_TOKEN_INDEX`` placeholder in ``input_ids`` is replaced by that sample's visual tokens; a batch
may mix videos, images (T=1) and text-only samples of different lengths.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Sequence

import torch
import torch.nn as nn
from pydantic import AfterValidator, Field

from ..config import Cfg
from ..data.conversation import IGNORE_INDEX, VISUAL_TOKEN_INDEX
from .connectors import CONNECTORS, ConnectorConfig
from .parts import import_plugin
from .poolers import POOLERS, PoolerConfig
from .presets import resolve_model_path


class LLMConfig(Cfg):
    path: str = Field("preset:tiny-llama", description="folder, hub id or preset:NAME of a causal LM")
    tokenizer: Optional[str] = Field(None, description="defaults to the LM path")
    trainable: bool = False
    gradient_checkpointing: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class ModelConfig(Cfg):
    """The VideoLLM parts. The vision tower is absent when training on precomputed features."""

    # Declared first: fields validate in order, so the plugins' part types are registered before the pooler
    # and connector configs that name them are validated (on the driver and in every worker).
    plugins: list[Annotated[str, AfterValidator(import_plugin)]] = Field(
        [], description="modules imported before the parts are validated; they register more pooler/connector "
        "types (docs/extending.md)")
    vision_hidden_size: Optional[int] = Field(
        None, ge=1, description="D of the visual features; None = read from the feature set (must match it)")
    pooler: PoolerConfig = POOLERS.config()
    connector: ConnectorConfig = CONNECTORS.config()
    llm: LLMConfig = LLMConfig()


def visual_token_count(cfg: ModelConfig, shape: Sequence[int], mode: str, num_frames: int) -> int:
    """Visual tokens the model makes for one sample's features of ``shape`` (as the pooler, then the connector,
    count them); what training reserves in the sequence before any feature is loaded."""
    n = POOLERS.part(cfg.pooler).num_tokens(shape, mode, num_frames)
    return CONNECTORS.part(cfg.connector).num_tokens(n)


def feature_mode_problems(cfg: ModelConfig, modes: Sequence[str]) -> list[str]:
    """Why the model's pooler cannot take features of these modes (``data.sets[i]``'s output.mode); [] if it can."""
    pooler = POOLERS.part(cfg.pooler)
    want = " or ".join(f"output.mode={m}" for m in pooler.modes)
    return [f"data.sets[{i}]: model.pooler.type={cfg.pooler.type} needs feature sets precomputed with {want}, "
            f"this one has output.mode={m}" for i, m in enumerate(modes) if m not in pooler.modes]


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
        self.connector = CONNECTORS.part(cfg.connector).build(cfg.vision_hidden_size, d_model)
        self.pool = POOLERS.part(cfg.pooler)  # (feats, mode, num_frames) -> (N, D)
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
