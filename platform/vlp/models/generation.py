"""Decoding: the next-token rule (greedy, or sampled with temperature / top-p) and the batched, left-padded loop
with a KV cache that :meth:`vlp.models.videollm.VideoLLM.generate_batch` runs.

Why a loop of our own rather than transformers' ``generate(inputs_embeds=..., attention_mask=...)``. That one does
handle left padding (its position ids are the mask's cumsum - 1, as here; eos-finished rows get the pad token),
and greedy answers of the two agree on the tiny models. But:

- it samples from torch's global RNG; it takes no ``torch.Generator``, which ``VideoLLM.generate`` (``vlp chat``)
  takes and a server wants per request;
- every option a call leaves unset is filled from the checkpoint's ``generation_config.json`` (its eos, a
  ``repetition_penalty``, ...) and then from transformers' defaults (``top_k=50`` when sampling), so a Hub LM's
  file would make batched answers differ from ``VideoLLM.generate``'s; pinning every option needs transformers'
  private list of them, and ``eos_token_id=None`` (never stop) cannot be said at all;
- a per-request streaming hook would need its streamer protocol plus the same per-row eos bookkeeping as here.

So both :meth:`VideoLLM.generate` (one prompt, streamed) and the batched loop pick tokens with
:func:`next_tokens`, and the loop is ``generate``'s with (B, L) masks and explicit position ids.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# (row, token): a row's next new token, as soon as it is picked; token None: that row has ended (eos or
# max_new_tokens), it gets no more calls.
TokenHook = Callable[[int, Optional[int]], None]


def next_tokens(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, V) float logits -> (B,) token ids: argmax, or a draw from softmax(logits / temperature) cut to the
    smallest set of most likely tokens whose mass reaches ``top_p`` (``generator``: the RNG of the draws)."""
    if not do_sample:
        return logits.argmax(-1)  # (B,)
    probs = torch.softmax(logits / max(temperature, 1e-5), -1)  # (B, V)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)  # (B, V) each
        keep = sp.cumsum(-1) - sp < top_p  # mass before each token under top_p: the first always stays
        probs = torch.zeros_like(probs).scatter(-1, si, sp * keep)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)  # (B,)


def left_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) left-padded attention mask -> (B, L) position ids: 0.. from each row's first real token, 0 on the
    padding (as transformers' generate computes them). Without them a model with absolute positions would see
    each row's prompt shifted by its padding."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


class GrowingLayer(DynamicLayer):
    """A full-attention layer's KV cache whose keys and values are views into buffers with room to spare: a step
    writes its (B, H, n, D) states in place, where transformers' ``DynamicLayer`` concatenates, copying the whole
    cache every step (at batch 16 that copy took 44% of a decoding step's time on CPU; docs/benchmarks.md). A full
    buffer is reallocated at twice the size needed, so copies stay amortized O(1) per token."""

    def __init__(self, room: int = 64):
        super().__init__()
        self.room, self.length = room, 0
        self.kbuf: Optional[torch.Tensor] = None  # (B, H, capacity, D)
        self.vbuf: Optional[torch.Tensor] = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:  # first call, or after reset()
            self.lazy_initialization(key_states, value_states)
            self.kbuf = self.vbuf = None
            self.length = 0
        n = key_states.shape[-2]
        if self.kbuf is None or self.length + n > self.kbuf.shape[-2]:
            need = self.length + n  # first: room to spare after the prompt; full: twice what is needed
            cap = need + (self.room if self.kbuf is None else need)
            self.kbuf = grown(self.kbuf, key_states, self.length, cap)
            self.vbuf = grown(self.vbuf, value_states, self.length, cap)
        self.kbuf[:, :, self.length:self.length + n].copy_(key_states)
        self.vbuf[:, :, self.length:self.length + n].copy_(value_states)
        self.length += n
        self.keys, self.values = self.kbuf[:, :, :self.length], self.vbuf[:, :, :self.length]  # (B, H, length, D)
        return self.keys, self.values

    def adopt(self) -> None:
        """After a base-class method replaced ``keys``/``values`` (crop, beam reorder, batch select): they become
        the buffers, full, so the next update reallocates."""
        self.kbuf, self.vbuf = self.keys, self.values
        self.length = 0 if self.keys is None else self.keys.shape[-2]

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.adopt()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.adopt()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.adopt()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.adopt()


def grown(buf: Optional[torch.Tensor], like: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
    """A (B, H, capacity, D) buffer shaped like ``like`` (B, H, n, D) holding ``buf``'s first ``length`` positions."""
    out = like.new_empty(*like.shape[:2], capacity, like.shape[-1])
    if buf is not None and length:
        out[:, :, :length].copy_(buf[:, :, :length])
    return out


def last_logits(llm: torch.nn.Module) -> dict:
    """Forward keywords that make ``llm`` compute logits at the last position only (``logits_to_keep``, where its
    forward takes it): a prompt pass of B rows x L tokens would otherwise make (B, L, vocab) logits (16 x 700 x 32k
    floats are 1.4 GB for a LLaVA batch) and their matrix product, of which decoding reads one row."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(llm.forward).parameters else {}


def kv_cache(llm: torch.nn.Module, room: int = 64) -> DynamicCache:
    """transformers' ``DynamicCache`` for ``llm`` (sliding-window and other special layers as its config says) with
    every plain full-attention layer a :class:`GrowingLayer` of ``room`` spare positions to start with."""
    cache = DynamicCache(config=llm.config)
    cache.layers = [GrowingLayer(room) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    if not cache.layers:  # no layer types known up front: added as the model asks for them
        cache.layer_class_to_replicate = lambda: GrowingLayer(room)
    return cache


def shared_prefix(ids: Sequence[torch.Tensor]) -> int:
    """Tokens at the start of every one of several (L_i,) prompts, the same in all (a template's system prompt),
    up to the first visual placeholder (negative id) and leaving each prompt at least one token of its own; 0 for
    fewer than two prompts."""
    if len(ids) < 2:
        return 0
    n = min(int(x.shape[0]) for x in ids) - 1
    first = ids[0][:n].to("cpu")
    same = first >= 0
    for x in ids[1:]:
        same &= x[:n].to("cpu") == first
    return int(same.long().cumprod(0).sum()) if n > 0 else 0


def full_attention_only(cache: DynamicCache) -> bool:
    """Whether every layer of a :func:`kv_cache` is a :class:`GrowingLayer` (no sliding window: such a layer counts
    positions in the cache, which padding after a shared prefix would shift)."""
    return bool(cache.layers) and all(isinstance(x, GrowingLayer) for x in cache.layers)


def fill_prefix(llm: torch.nn.Module, past: DynamicCache, prefix: torch.Tensor, rows: int) -> DynamicCache:
    """``past`` (an empty :func:`full_attention_only` cache) holding the keys and values of ``prefix`` (1, p, d)
    embeddings, run once through ``llm`` and repeated for ``rows`` rows."""
    llm(inputs_embeds=prefix, past_key_values=past, use_cache=True, **last_logits(llm))  # (1, p, d)
    past.batch_repeat_interleave(rows)  # (rows, H, p, D) per layer
    return past


def decode_steps(llm: torch.nn.Module, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 max_new_tokens: Sequence[int], pick: Callable[[torch.Tensor], torch.Tensor],
                 eos_token_id: Optional[int] = None, stopped: Optional[Callable[[int], bool]] = None,
                 past: Optional[DynamicCache] = None) -> Iterator[list[Optional[int]]]:
    """Decode a left-padded batch with a KV cache, a step at a time: embeds (B, L, d), mask (B, L), positions
    (B, L) (see :func:`left_positions`); ``pick``: (B, V) float logits -> (B,) ids. Yields, per step, one entry per
    row: its new token, or None once the row has ended (``eos_token_id``, not yielded; its own ``max_new_tokens``;
    or ``stopped(row)`` true, e.g. a client gone); every row yields None at least once after its last token, and
    the steps end when every row has. A finished row keeps being fed its last token (its outputs are dropped).
    ``past``: a cache already holding tokens before ``embeds`` in every row (:func:`fill_prefix`); ``mask`` then
    covers them too, (B, p + L)."""
    B = embeds.shape[0]
    left = [int(n) for n in max_new_tokens]  # tokens each row may still produce
    live = [n > 0 for n in left]
    emb, cur = llm.get_input_embeddings(), embeds
    past = past if past is not None else kv_cache(llm, min(max(left, default=0), 256))
    keep = last_logits(llm)
    while any(live):
        o = llm(inputs_embeds=cur, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=True,
                **keep)
        past = o.past_key_values
        tok = pick(o.logits[:, -1].float())  # (B, V) -> (B,)
        step: list[Optional[int]] = []
        for i, t in enumerate(tok.tolist()):
            if live[i] and (t == eos_token_id or (stopped is not None and stopped(i))):
                live[i] = False
            step.append(t if live[i] else None)
            if live[i]:
                left[i] -= 1
                live[i] = left[i] > 0
        yield step
        cur = emb(tok[:, None]).to(embeds.dtype)  # (B, 1, d)
        mask = torch.cat([mask, mask.new_ones(B, 1)], 1)  # (B, L + step + 1)
        positions = positions[:, -1:] + 1  # (B, 1)
    yield [None] * B  # rows that ended on their budget in the last step hear it


def row_tokens(llm: torch.nn.Module, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
               max_new_tokens: int, pick: Callable[[torch.Tensor], torch.Tensor],
               eos_token_id: Optional[int] = None, on_token: Optional[TokenHook] = None,
               past: Optional[DynamicCache] = None) -> list[list[int]]:
    """Each row's new tokens of :func:`decode_steps` (one budget for all rows; ``past`` as there), stopped at
    ``eos_token_id`` (not included) or after ``max_new_tokens``. ``on_token``: see :data:`TokenHook`."""
    B = embeds.shape[0]
    out: list[list[int]] = [[] for _ in range(B)]
    ended = [False] * B
    for step in decode_steps(llm, embeds, mask, positions, [max_new_tokens] * B, pick, eos_token_id, past=past):
        for i, t in enumerate(step):
            if ended[i]:
                continue
            ended[i] = t is None
            if t is not None:
                out[i].append(t)
            if on_token is not None:
                on_token(i, t)
    return out
