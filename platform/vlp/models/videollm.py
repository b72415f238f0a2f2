"""VideoLLM: vision tower (optional: ``model.tower``, on pixel rows) -> temporal pooler -> connector -> causal LM.

Every part is chosen by a ``type`` key in its config (the part classes live in models/poolers,
models/connectors and models/towers; ``model.plugins`` imports modules that register more) and frozen or
trained explicitly. Every ``VISUAL_TOKEN_INDEX`` placeholder in ``input_ids`` is replaced, in order, by the visual
tokens of that sample's next media item; a batch may mix videos, images (T=1), several items per sample and
text-only samples of different lengths.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Optional, Sequence, TypeVar, Union

import torch
import torch.nn as nn
from pydantic import Field, field_validator
from transformers import DynamicCache

from ..config import Cfg
from ..data.conversation import IGNORE_INDEX, VISUAL_TOKEN_INDEX
from .audio_towers import flatten_segments
from .connectors import CONNECTORS, ConnectorConfig, ItemContext, default_modality
from .generation import (TokenHook, decode_steps, fill_prefix, full_attention_only, kv_cache, last_logits,
                         left_positions, next_tokens, row_tokens, shared_prefix)
from .parts import PluginModule
from .pixel_tower import ModelTowerCfg, PixelTower, features_shape
from .poolers import POOLERS, Pooler, PoolerConfig
from ..storage import localize
from .presets import check_model_path, resolve_model_path


def export_part(export: str, name: str) -> str:
    """``export``/``name`` (an export's llm/ or tokenizer/) as a local folder: absolute (Ray tasks and workers run in
    folders of their own), or, for an export on S3, that part alone fetched into the node's cache."""
    if "://" in export:
        return localize(f"{export.rstrip('/')}/{name}")
    return os.path.abspath(os.path.join(export, name))


class LLMConfig(Cfg):
    path: str = Field("preset:tiny-llama", description="folder, hub id or preset:NAME of a causal LM")
    tokenizer: Optional[str] = Field(None, description="defaults to the LM path")
    init_from: Optional[str] = Field(None, description="an earlier stage's export folder: the LM and its tokenizer "
                                     "load from its llm/ and tokenizer/ instead of path (checked at setup; stage N "
                                     "after stage N-1, e.g. LEGO's three stages)")
    trainable: bool = False
    gradient_checkpointing: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        "sdpa", description="the LM's attention kernel (transformers' attn_implementation): sdpa (PyTorch's fused "
        "attention), flash_attention_2 (needs the flash-attn package and a bf16/fp16 LM on a GPU), eager")

    @field_validator("attn_implementation")
    @classmethod
    def _kernel_installed(cls, v):
        import importlib.util

        if v == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError("flash_attention_2 needs the flash-attn package (pip install flash-attn on a CUDA "
                             "machine); use sdpa otherwise")
        return v

    @field_validator("path", "tokenizer")
    @classmethod
    def _local_paths_exist(cls, v):
        return check_model_path(v)

    def source(self) -> str:
        """Where the LM's weights load from: ``init_from``'s llm/, else ``path`` (presets resolved)."""
        return export_part(self.init_from, "llm") if self.init_from else resolve_model_path(self.path)

    def config_source(self) -> str:
        """A folder holding the LM's config.json (for sizes: on S3 only that file is fetched)."""
        if self.init_from and "://" in self.init_from:
            return os.path.dirname(localize(f"{self.init_from.rstrip('/')}/llm/config.json"))
        return self.source()

    def tokenizer_source(self) -> str:
        """Where the tokenizer loads from: ``init_from``'s tokenizer/, else ``tokenizer`` or ``path``."""
        return export_part(self.init_from, "tokenizer") if self.init_from else resolve_model_path(self.tokenizer or self.path)


class ModelConfig(Cfg):
    """The VideoLLM parts. The vision tower (``tower``) is absent when training on precomputed features."""

    # Declared first: fields validate in order, so the plugins' part types are registered before the pooler
    # and connector configs that name them are validated (on the driver and in every worker).
    plugins: list[PluginModule] = Field(
        [], description="modules imported before the parts are validated; they register more pooler/connector "
        "types (docs/extending.md)")
    vision_hidden_size: Optional[int] = Field(
        None, ge=1, description="D of the visual features; None = read from the feature set (must match it)")
    audio_hidden_size: Optional[int] = Field(
        None, ge=1, description="D of the audio items' features (the audio tower's); None = read from the feature "
        "sets (none: the model takes no audio)")
    tower: Optional[ModelTowerCfg] = Field(
        None, description="a vision tower inside the model, run on feature sets precomputed with output.mode=pixels "
        "(trained with trainable: true, as mPLUG-Owl's stage 1); None: the sets hold the tower's features")
    pooler: PoolerConfig = POOLERS.config()
    connector: ConnectorConfig = CONNECTORS.config()
    llm: LLMConfig = LLMConfig()
    frame_times: Literal["none", "text", "text_before"] = Field(
        "none", description="text: each video frame's time as text after its tokens (the start of its segment as a "
        "fraction of the clip, 2 decimals: 0.00 0.12 0.25 ..., the notation of relative spans), so that the LLM can "
        "read frame times (LEGO's grounding; after, so that the time's tokens see their frame under causal "
        "attention); text_before: before them; needs a pooler with per-frame tokens (valley, none) and a video "
        "adapter that keeps one token per pooled token (linear, mlp2x_gelu)")


def frame_time_marks(num_frames: int) -> list[str]:
    """The time text of each of T uniformly sampled frames: the start of its segment (uniform sampling takes the
    segments' centres) as a fraction of the clip, 2 decimals."""
    return [f"{i / num_frames:.2f}" for i in range(num_frames)]


@functools.lru_cache(maxsize=8)
def _tokenizer(source: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


@functools.lru_cache(maxsize=256)
def frame_mark_ids(tokenizer_source: str, num_frames: int) -> tuple[tuple[int, ...], ...]:
    """Token ids of :func:`frame_time_marks` (no special tokens), one tuple per frame."""
    tok = _tokenizer(tokenizer_source)
    return tuple(tuple(tok(m, add_special_tokens=False)["input_ids"]) for m in frame_time_marks(num_frames))


def has_time_marks(cfg: ModelConfig, modality: Optional[str], num_frames: int) -> bool:
    """Whether an item gets frame-time text: frame_times not none and a video (modality None: a video when T > 1)."""
    return cfg.frame_times != "none" and num_frames > 1 and (modality or default_modality(num_frames)) == "video"


def time_mark_tokens(cfg: ModelConfig, modality: Optional[str], num_frames: int) -> int:
    """Tokens the frame-time text adds to one item (0 without)."""
    if not has_time_marks(cfg, modality, num_frames):
        return 0
    return sum(len(m) for m in frame_mark_ids(cfg.llm.tokenizer_source(), int(num_frames)))


def frame_times_problems(cfg: ModelConfig) -> list[str]:
    """Why frame times as text cannot work with this pooler and video adapter; [] if they can (or are off)."""
    if cfg.frame_times == "none":
        return []
    pooler, connector = POOLERS.part(cfg.pooler), CONNECTORS.part(cfg.connector)
    T, P, D = 8, 16, 4  # any video: the checks are about the layout, not the sizes
    shape, mode = ((P + T, D), "valley_pooled") if "valley_pooled" in pooler.modes else ((T, 1 + P, D), "frames")
    per = pooler.tokens_per_frame(shape, mode, T)
    n = pooler.num_tokens(shape, mode, T)
    m = (connector.num_tokens(n, ItemContext(modality="video", num_frames=T, tokens_per_frame=per))
         if connector.takes_context else connector.num_tokens(n))
    out = []
    if per == 0:
        out.append(f"model.frame_times={cfg.frame_times}: model.pooler.type={pooler.cfg.type} keeps no per-frame "
                   "tokens to put the times beside (use valley or none)")
    if m != n:
        out.append(f"model.frame_times={cfg.frame_times}: the video adapter of model.connector.type="
                   f"{connector.cfg.type} makes {m} tokens of {n}, mixing frames; frame times need one that keeps a "
                   "token per pooled token (linear, mlp2x_gelu)")
    return out


def item_context(pooler: Pooler, shape: Sequence[int], mode: str, num_frames: int,
                 modality: Optional[str] = None) -> ItemContext:
    """What a context-taking connector learns of one media item: its modality (None: ``default_modality``, an
    image for T=1, else a video) and how the pooler's tokens lie over its frames. An audio item is never pooled:
    its (segments, tokens, D) features are flattened segment by segment (``audio_towers.flatten_segments``), so
    each segment is a "frame" of ``tokens`` tokens."""
    if modality == "audio":
        return ItemContext(modality="audio", num_frames=int(shape[0]), tokens_per_frame=int(shape[1]))
    return ItemContext(modality=modality or default_modality(num_frames), num_frames=int(num_frames),
                       tokens_per_frame=pooler.tokens_per_frame(shape, mode, num_frames))


def feature_widths(cfg: ModelConfig) -> dict[str, int]:
    """modality -> D of its features: the vision tower's for images and video, the audio tower's for audio."""
    if cfg.vision_hidden_size is None:
        raise ValueError("model.vision_hidden_size is not set (training fills it from the feature set)")
    widths = {"image": cfg.vision_hidden_size, "video": cfg.vision_hidden_size}
    return {**widths, "audio": cfg.audio_hidden_size} if cfg.audio_hidden_size else widths


def visual_token_count(cfg: ModelConfig, shape: Sequence[int], mode: str, num_frames: int,
                       modality: Optional[str] = None) -> int:
    """Tokens the model makes for one media item's features of ``shape`` (as the pooler, then the connector,
    count them; an audio item's segments x tokens are not pooled); what training reserves in the sequence
    before any feature is loaded."""
    pooler, connector = POOLERS.part(cfg.pooler), CONNECTORS.part(cfg.connector)
    if mode == "pixels" and modality != "audio" and cfg.tower is not None:  # the tower's frames come out of it
        shape, mode = features_shape(cfg.tower, shape), "frames"  # (T, 3, S, S) -> (T, 1 + P, D)
    n = shape[0] * shape[1] if modality == "audio" else pooler.num_tokens(shape, mode, num_frames)
    marks = time_mark_tokens(cfg, modality, num_frames)
    if not connector.takes_context:
        return connector.num_tokens(n) + marks
    return connector.num_tokens(n, item_context(pooler, shape, mode, num_frames, modality)) + marks


def feature_mode_problems(cfg: ModelConfig, modes: Sequence[str], pooler: Optional[Pooler] = None,
                          names: Optional[Sequence[str]] = None) -> list[str]:
    """Why the model cannot take feature sets of these modes (output.mode of each); [] if it can. A model with
    ``tower`` takes pixel sets only, and its pooler must take frames (what the tower makes); one without takes what
    its pooler takes (``pooler``: another pooler on the same weights, eval's ablation). ``names``: how each set is
    named in the lines (default ``data.sets[i]``)."""
    pooler = pooler or POOLERS.part(cfg.pooler)
    name = pooler.cfg.type
    where = list(names) if names is not None else [f"data.sets[{i}]" for i in range(len(modes))]
    if cfg.tower is not None:
        out = [f"{w}: model.tower runs the vision tower on pixel rows (feature sets precomputed with "
               f"output.mode=pixels), this one has output.mode={m}" for w, m in zip(where, modes) if m != "pixels"]
        if "frames" not in pooler.modes:
            out.append(f"model.pooler.type={name} does not take frames, which is what model.tower makes")
        return out
    want = " or ".join(f"output.mode={m}" for m in pooler.modes)
    return [f"{w}: output.mode=pixels holds frames for a model that runs its vision tower: set "
            "model.tower (see docs/training.md, trainable vision tower)" if m == "pixels" else
            f"{w}: model.pooler.type={name} needs feature sets precomputed with {want}, "
            f"this one has output.mode={m}" for w, m in zip(where, modes) if m not in pooler.modes]


class VideoLLM(nn.Module):
    def __init__(self, cfg: ModelConfig, llm: Optional[nn.Module] = None):
        super().__init__()
        from transformers import AutoModelForCausalLM

        widths = feature_widths(cfg)  # ValueError when vision_hidden_size is unset
        self.cfg = cfg
        dtype = getattr(torch, cfg.llm.dtype)
        self.llm = llm if llm is not None else AutoModelForCausalLM.from_pretrained(
            cfg.llm.source(), dtype=dtype, attn_implementation=cfg.llm.attn_implementation)
        d_model = self.llm.get_input_embeddings().weight.shape[1]
        self.connector_part = CONNECTORS.part(cfg.connector)  # its takes_context: how the module is called
        self.connector = self.connector_part.build_for(widths, d_model)
        self.pool = POOLERS.part(cfg.pooler)  # (feats, mode, num_frames) -> (N, D)
        self.tower = PixelTower(cfg.tower) if cfg.tower is not None else None
        self.llm.requires_grad_(cfg.llm.trainable)
        self.connector.requires_grad_(cfg.connector.trainable)
        if cfg.llm.gradient_checkpointing and cfg.llm.trainable:
            self.llm.activation_checkpointing_enable()
            self.llm.config.use_cache = False

    def visual_tokens(self, feats: torch.Tensor, mode: str, num_frames: int,
                      modality: Optional[str] = None) -> torch.Tensor:
        """One media item's features -> (M, d_model) embeddings. ``modality`` (image, video, audio) reaches only a
        connector that takes an ItemContext; None: an image for T=1, else a video. Audio features (n, tokens, D_a)
        skip the pooler (its formulas are over video frames). Pixel rows (T, 3, S, S) go through ``tower`` first."""
        if mode == "pixels" and modality != "audio":
            if self.tower is None:
                raise ValueError("pixel rows (output.mode=pixels) need a model with model.tower")
            feats, mode = self.tower(feats), "frames"  # (T, 3, S, S) -> (T, 1 + P, D)
        if modality == "audio":
            pooled = flatten_segments(feats)  # (n, tokens, D_a) -> (n * tokens, D_a)
        else:
            pooled = self.pool(feats, mode, num_frames)  # -> (N, D)
        w = next(self.connector.parameters())
        if not self.connector_part.takes_context:
            out = self.connector(pooled.to(w.dtype))  # (N, D) -> (M, d_model)
        else:
            out = self.connector(pooled.to(w.dtype), item_context(self.pool, feats.shape, mode, num_frames, modality))
        if not has_time_marks(self.cfg, modality, num_frames):
            return out
        if out.shape[0] != pooled.shape[0]:
            raise ValueError(f"model.frame_times={self.cfg.frame_times} needs a video adapter that keeps a token per "
                             f"pooled token; this one made {out.shape[0]} of {pooled.shape[0]}")
        return self.with_time_marks(out, self.pool.tokens_per_frame(feats.shape, mode, num_frames), num_frames)

    def with_time_marks(self, tokens: torch.Tensor, per_frame: int, num_frames: int) -> torch.Tensor:
        """(M, d) tokens whose last T * per_frame are per-frame groups in frame order -> the same with each frame's
        time text (:func:`frame_time_marks`, embedded by the LLM) after its group (``text``) or before it
        (``text_before``): (M + sum len(mark_t), d)."""
        T = int(num_frames)
        if per_frame <= 0 or tokens.shape[0] < T * per_frame:
            raise ValueError(f"model.frame_times={self.cfg.frame_times}: {tokens.shape[0]} visual tokens hold no {T} "
                             f"per-frame groups of {per_frame}")
        ids = frame_mark_ids(self.cfg.llm.tokenizer_source(), T)
        emb = self.llm.get_input_embeddings()
        flat = torch.tensor([i for m in ids for i in m], dtype=torch.long, device=emb.weight.device)
        marks = emb(flat).to(tokens.dtype).split([len(m) for m in ids])  # T x (len_t, d)
        head = tokens.shape[0] - T * per_frame
        frames = tokens[head:].split(per_frame)  # T x (per_frame, d)
        pairs = zip(frames, marks) if self.cfg.frame_times == "text" else zip(marks, frames)
        return torch.cat([tokens[:head], *[x for pair in pairs for x in pair]])  # (M + marks, d)

    def build_inputs(self, input_ids: list[torch.Tensor], labels: Optional[list[torch.Tensor]],
                     visuals: list[Visuals], left: bool = False):
        """Splice visual tokens into each sample's text embeddings and right-pad the batch (``left``: left-pad it,
        for generation: every row's last token is then at L - 1).

        input_ids[i]: (L_i,) with k_i >= 0 VISUAL_TOKEN_INDEX placeholders. visuals[i]: None (text-only), one
        (N, d_model) tensor, or a list of k_i such tensors, the j-th replacing the j-th placeholder. A placeholder
        /block count mismatch is a ValueError naming the sample. Labels are IGNORE_INDEX on every visual span.
        Returns inputs_embeds (B, L, d_model), attention_mask (B, L), labels (B, L) or None.
        """
        emb = self.llm.get_input_embeddings()
        device = emb.weight.device
        seqs, labs = [], []
        for i, ids in enumerate(input_ids):
            ids = ids.to(device)
            lab = labels[i].to(device) if labels is not None else None
            text = emb(ids.clamp(min=0))  # (L_i,) -> (L_i, d_model)
            s, lab = splice_visuals(i, ids, text, lab, visual_blocks(visuals[i]))  # -> (L_i - k_i + sum N, d_model)
            seqs.append(s)
            labs.append(lab)
        L = max(s.shape[0] for s in seqs)
        B, d = len(seqs), seqs[0].shape[1]
        embeds = seqs[0].new_zeros(B, L, d)
        mask = torch.zeros(B, L, dtype=torch.long, device=device)
        out_labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long, device=device) if labels is not None else None
        for i, s in enumerate(seqs):
            at = slice(L - s.shape[0], L) if left else slice(0, s.shape[0])  # the row's real tokens
            embeds[i, at] = s
            mask[i, at] = 1
            if out_labels is not None:
                out_labels[i, at] = labs[i]
        return embeds, mask, out_labels

    def sample_visuals(self, features: Features, mode: PerItem[str], num_frames: PerItem[int],
                       index: int = 0, modalities: Optional[PerItem[str]] = None) -> Visuals:
        """Sample ``index``'s features -> its visual tokens: None (text-only), one tensor, or a list of them.

        ``features``: None, one feature tensor ((P + T, D) valley_pooled or (T, 1 + P, D) frames), or a list of them
        (one per placeholder); ``mode``: one for all items or one per item; ``num_frames``: one per item (a single
        value for several items is refused: an image has T=1, a video T=8); ``modalities``: None (each item's
        from its T, see :meth:`visual_tokens`), or like ``mode``."""
        if features is None or isinstance(features, torch.Tensor):
            one = modalities if modalities is None or isinstance(modalities, str) else next(iter(modalities), None)
            return None if features is None else self.visual_tokens(features, mode, int(num_frames), one)
        feats = list(features)
        modes = [mode] * len(feats) if isinstance(mode, str) else list(mode)
        mods = [modalities] * len(feats) if modalities is None or isinstance(modalities, str) else list(modalities)
        try:
            nfs = [int(t) for t in num_frames]
        except TypeError:  # one number (not iterable)
            nfs = []
        if len(modes) != len(feats) or len(nfs) != len(feats) or len(mods) != len(feats):
            raise ValueError(f"sample {index}: {len(feats)} feature blocks need as many num_frames (and modes and "
                             f"modalities, or one of each); got modes={mode!r}, num_frames={num_frames!r}, "
                             f"modalities={modalities!r}")
        return [self.visual_tokens(f, m, t, x) for f, m, t, x in zip(feats, modes, nfs, mods)]  # each (N_j, d_model)

    def forward(self, input_ids, labels, features: list[Features], modes: list[PerItem[str]],
                num_frames: list[PerItem[int]], modalities: Optional[list[Optional[PerItem[str]]]] = None):
        """features[i]: None, a tensor or a list of tensors per sample (see :meth:`sample_visuals`); modalities:
        None, or per sample None / one / one per item."""
        mods = modalities if modalities is not None else [None] * len(features)
        visuals = [self.sample_visuals(f, m, t, i, x)
                   for i, (f, m, t, x) in enumerate(zip(features, modes, num_frames, mods))]
        embeds, mask, lab = self.build_inputs(input_ids, labels, visuals)
        return self.llm(inputs_embeds=self.touch_trainable(embeds), attention_mask=mask, labels=lab)

    def touch_trainable(self, embeds: torch.Tensor) -> torch.Tensor:
        """``embeds`` + 0 x one element of every trainable connector and tower parameter, so that each gets a
        gradient (zero when unused) on every step. A connector with parts per modality (the perceiver's queries, the
        abstractor's temporal queries) would otherwise leave some without one on a rank whose micro-batch lacks that
        modality, a trained tower all of its own on a text-only micro-batch, and ZeRO's gradient reduction would
        run collectives of different sizes on different ranks (gloo aborts)."""
        # ZeRO-3 parameters (ds_id) are partitioned and gathered only inside their own module's forward: not
        # touched here (their data is empty outside it)
        parts = [self.connector] + ([self.tower] if self.tower is not None else [])
        ps = [p for m in parts for p in m.parameters() if p.requires_grad and not hasattr(p, "ds_id")]
        if not ps or not torch.is_grad_enabled():
            return embeds
        return embeds + torch.stack([p.reshape(-1)[0] for p in ps]).sum().to(embeds.dtype) * 0.0  # (B, L, d)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, feature: Features, mode: PerItem[str] = "valley_pooled",
                 num_frames: PerItem[int] = 1, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, eos_token_id: Optional[int] = None, generator=None,
                 modalities: Optional[PerItem[str]] = None):
        """Greedy or sampled decoding for one prompt; yields token ids as they are produced (streaming).

        ``feature``: None (text-only prompt), one tensor, or a list of tensors, one per placeholder in
        ``input_ids`` (L,), with ``mode``/``num_frames``/``modalities`` as in :meth:`sample_visuals`."""
        visuals = self.sample_visuals(feature, mode, num_frames, modalities=modalities)
        embeds, mask, _ = self.build_inputs([input_ids], None, [visuals])
        past, keep = kv_cache(self.llm, min(max_new_tokens, 256)), last_logits(self.llm)
        cur = embeds
        for _ in range(max_new_tokens):
            out = self.llm(inputs_embeds=cur, attention_mask=mask, past_key_values=past, use_cache=True, **keep)
            past = out.past_key_values
            logits = out.logits[:, -1].float()  # (1, V)
            tok = int(next_tokens(logits, do_sample, temperature, top_p, generator)[0])
            if eos_token_id is not None and tok == eos_token_id:
                return
            yield tok
            cur = self.llm.get_input_embeddings()(torch.tensor([[tok]], device=embeds.device))
            mask = torch.cat([mask, mask.new_ones(1, 1)], 1)

    @torch.no_grad()
    def generate_batch(self, prompts: Sequence[Prompt], max_new_tokens: int = 32, do_sample: bool = False,
                       temperature: float = 1.0, top_p: float = 1.0, eos_token_id: Optional[int] = None,
                       generator: Optional[torch.Generator] = None, on_token: Optional[TokenHook] = None,
                       visuals: Optional[list[Visuals]] = None, share_prefix: bool = True) -> list[list[int]]:
        """Answer several prompts at once: each one's visuals spliced in (videos, images, several items or none,
        mixed freely), the batch left-padded, decoded with a KV cache (:func:`vlp.models.generation.row_tokens`,
        position ids from the mask). Returns each prompt's new token ids, in order, stopped at ``eos_token_id``
        (not included) or after ``max_new_tokens``: greedy, the same tokens as :meth:`generate` one prompt at a
        time (up to float rounding of batched matmuls, tested on the tiny models). Sampling (``do_sample``,
        ``temperature``, ``top_p``) draws every row from ``generator``. ``on_token(row, token)`` hears each
        row's tokens as they come and ``(row, None)`` when it ends (streaming per request). ``visuals``: the
        prompts' :meth:`prompt_visuals`, when already computed; ``share_prefix``: see :meth:`batch_inputs`."""
        if not prompts:
            return []
        embeds, mask, positions, past = self.batch_inputs(prompts, visuals, min(max_new_tokens, 256), share_prefix)

        def pick(logits: torch.Tensor) -> torch.Tensor:  # (B, V) -> (B,)
            return next_tokens(logits, do_sample, temperature, top_p, generator)

        return row_tokens(self.llm, embeds, mask, positions, max_new_tokens, pick, eos_token_id, on_token, past)

    @torch.no_grad()
    def generate_grouped(self, prompts: Sequence[Prompt], batch_size: int, **kw) -> list[list[int]]:
        """:meth:`generate_batch` (``kw``: its options but ``on_token``) over any number of prompts, ``batch_size``
        at a time, each batch of prompts of near embedded length, longest first (a batch too big for memory fails
        first), answers in the prompts' order. Grouping by length is what lm-eval-harness and lmms-eval do for
        batched generation: less left padding, so less prompt work and a smaller KV cache (docs/benchmarks.md)."""
        visuals = self.prompt_visuals(prompts)
        lengths = [embedded_length(p.input_ids, v) for p, v in zip(prompts, visuals)]
        order = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # stable: equal lengths keep their order
        out: list[list[int]] = [[] for _ in prompts]
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            answers = self.generate_batch([prompts[i] for i in rows], visuals=[visuals[i] for i in rows], **kw)
            for i, toks in zip(rows, answers):
                out[i] = toks
        return out

    def prompt_visuals(self, prompts: Sequence[Prompt]) -> list[Visuals]:
        """Each prompt's visual tokens (:meth:`sample_visuals`)."""
        return [self.sample_visuals(p.features, p.mode, p.num_frames, i, p.modalities) for i, p in enumerate(prompts)]

    def batch_inputs(self, prompts: Sequence[Prompt], visuals: Optional[list[Visuals]] = None, room: int = 64,
                     share_prefix: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[DynamicCache]]:
        """A batch's decoding inputs: each prompt's visuals (``visuals``, else computed) spliced in, left-padded.
        With ``share_prefix``, the tokens every prompt starts with (:func:`vlp.models.generation.shared_prefix`: the
        template's system prompt) go through the LM once, their KV cache repeated for every row, and the rows hold
        the rest. -> (embeds (B, S, d), mask (B, p + S), positions (B, S) from p, that cache of ``room`` spare
        positions, or None when nothing is shared: p = 0)."""
        visuals = self.prompt_visuals(prompts) if visuals is None else visuals
        ids = [q.input_ids for q in prompts]
        past = kv_cache(self.llm, room) if share_prefix else None
        p = shared_prefix(ids) if past is not None and full_attention_only(past) else 0
        embeds, mask, _ = self.build_inputs([x[p:] for x in ids], None, visuals, left=True)  # (B, S, d), (B, S)
        if not p:
            return embeds, mask, left_positions(mask), None
        emb = self.llm.get_input_embeddings()
        fill_prefix(self.llm, past, emb(ids[0][:p].to(emb.weight.device))[None], len(ids))  # (1, p, d) in
        return embeds, torch.cat([mask.new_ones(len(ids), p), mask], 1), left_positions(mask) + p, past

    @torch.no_grad()
    def decode_batch(self, prompts: Sequence[Prompt], max_new_tokens: Sequence[int],
                     pick: Callable[[torch.Tensor], torch.Tensor], eos_token_id: Optional[int] = None,
                     stopped: Optional[Callable[[int], bool]] = None) -> Iterator[list[Optional[int]]]:
        """:meth:`generate_batch` a step at a time, for a server: a budget per prompt, ``pick`` (B, V) logits ->
        (B,) ids (each row may sample its own way), ``stopped(row)`` ends a row early; yields per step each row's
        new token or None once it has ended (:func:`vlp.models.generation.decode_steps`)."""
        embeds, mask, positions, past = self.batch_inputs(prompts, room=min(max(max_new_tokens, default=0), 256))
        yield from decode_steps(self.llm, embeds, mask, positions, max_new_tokens, pick, eos_token_id, stopped, past)


# ------------------------------------------------------------------------------------------- splicing
# What a sample's visuals may be: None (text-only), one tensor (the single-item form every caller used before
# several items existed), or a list of tensors, one per placeholder in order.
Features = Optional[Union[torch.Tensor, Sequence[torch.Tensor]]]
Visuals = Optional[Union[torch.Tensor, Sequence[torch.Tensor]]]
T = TypeVar("T")
PerItem = Union[T, Sequence[T]]  # one value for the sample, or one per item


@dataclass
class Prompt:
    """One prompt of :meth:`VideoLLM.generate_batch`: what :meth:`VideoLLM.generate` takes for one (see
    :meth:`VideoLLM.sample_visuals` for ``features``, ``mode``, ``num_frames`` and ``modalities``)."""

    input_ids: torch.Tensor  # (L,) with one VISUAL_TOKEN_INDEX per item
    features: Features = None  # None: a text-only prompt
    mode: PerItem[str] = "valley_pooled"
    num_frames: PerItem[int] = 1
    modalities: Optional[PerItem[str]] = None


def visual_blocks(v: Visuals) -> list[torch.Tensor]:
    """None -> []; one tensor -> [it]; a list -> the list."""
    if v is None:
        return []
    return [v] if isinstance(v, torch.Tensor) else list(v)


def embedded_length(ids: torch.Tensor, v: Visuals) -> int:
    """Tokens of a prompt (L,) once its visual blocks replace its placeholders."""
    blocks = visual_blocks(v)
    return int(ids.shape[0]) - int((ids == VISUAL_TOKEN_INDEX).sum()) + sum(int(b.shape[0]) for b in blocks)


def splice_visuals(i: int, ids: torch.Tensor, text: torch.Tensor, lab: Optional[torch.Tensor],
                   blocks: list[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Replace the j-th VISUAL_TOKEN_INDEX of sample ``i`` by ``blocks[j]``.

    ids: (L,); text: (L, d) its embeddings; lab: (L,) or None; blocks[j]: (N_j, d).
    Returns ((L - k + sum N_j, d), labels of that length with IGNORE_INDEX on every visual span, or None).
    """
    pos = (ids == VISUAL_TOKEN_INDEX).nonzero().flatten().tolist()
    if len(pos) != len(blocks):
        have = f"{len(blocks)} visual feature block(s)" if blocks else "no visual features"
        raise ValueError(f"sample {i} has {len(pos)} visual placeholder(s) but {have}")
    if not blocks:
        return text, lab  # text-only
    pieces, lab_pieces, prev = [], [], 0
    for j, (p, v) in enumerate(zip(pos, blocks)):
        if v.dim() != 2 or v.shape[1] != text.shape[1]:
            raise ValueError(f"sample {i} visual block {j} has shape {tuple(v.shape)}, not (N, {text.shape[1]})")
        pieces += [text[prev:p], v.to(text.dtype)]  # text before the placeholder, then (N_j, d)
        if lab is not None:
            lab_pieces += [lab[prev:p], torch.full((v.shape[0],), IGNORE_INDEX, dtype=lab.dtype, device=lab.device)]
        prev = p + 1
    pieces.append(text[prev:])
    if lab is not None:
        lab_pieces.append(lab[prev:])
    return torch.cat(pieces), (torch.cat(lab_pieces) if lab is not None else None)
