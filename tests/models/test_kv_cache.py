"""vlp.models.generation.kv_cache: decoding writes each step's keys and values in place (no copy of the whole
cache per step), grows when full, gives the same logits as transformers' DynamicCache, and keeps the model's
sliding-window layers as transformers builds them."""

from __future__ import annotations

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from vlp.models.generation import GrowingLayer, full_attention_only, kv_cache


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


@torch.no_grad()
def decode(llm, cache, steps: int = 6) -> tuple[list[torch.Tensor], list[int]]:
    """Greedy: a (2, 5) left-padded prompt, then ``steps`` tokens -> (every step's (2, V) logits, the first
    layer's key buffer address after each step)."""
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, ptrs = [], []
    for _ in range(steps):
        out = llm(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        ids = out.logits[:, -1].argmax(-1, keepdim=True)  # (2, 1)
        mask, pos = torch.cat([mask, mask.new_ones(2, 1)], 1), pos[:, -1:] + 1
        ptrs.append(cache.layers[0].keys.data_ptr())
    return logits, ptrs


def test_same_logits_as_dynamic_cache_and_steps_write_in_place():
    llm = llama()
    want, moved = decode(llm, DynamicCache(config=llm.config))
    got, ptrs = decode(llm, kv_cache(llm, room=8))
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(set(ptrs)) == 1, "every step's keys live in the same buffer"
    assert len(set(moved)) == len(moved), "DynamicCache reallocates every step (what this cache avoids)"


def test_a_full_buffer_grows_and_keeps_what_it_held():
    llm = llama()
    want, _ = decode(llm, DynamicCache(config=llm.config), steps=9)
    cache = kv_cache(llm, room=1)  # prompt of 5 + 1: full after the first new token
    got, ptrs = decode(llm, cache, steps=9)
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    layer = cache.layers[0]
    assert 1 < len(set(ptrs)) <= 3  # 6 -> 12 -> (no third): grown twice at most for 13 positions
    assert layer.get_seq_length() == 5 + 8 and layer.kbuf.shape[-2] >= 13


def test_crop_and_batch_select_then_decoding_goes_on():
    layer = GrowingLayer(room=4)
    k = torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).reshape(2, 1, 3, 2)  # (B, H, L, D)
    layer.update(k, k + 100)
    layer.crop(-1)
    assert layer.get_seq_length() == 2
    layer.batch_select_indices(torch.tensor([1]))
    new = torch.full((1, 1, 1, 2), -1.0)
    keys, values = layer.update(new, new)
    torch.testing.assert_close(keys, torch.cat([k[1:, :, :2], new], 2))
    torch.testing.assert_close(values, torch.cat([k[1:, :, :2] + 100, new], 2))


def test_sliding_window_layers_stay_transformers_own():
    from transformers import MistralForCausalLM

    cfg = MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    cache = kv_cache(MistralForCausalLM(cfg))
    assert [type(x) for x in cache.layers] == [DynamicSlidingWindowLayer] * 2
    assert not full_attention_only(cache) and full_attention_only(kv_cache(llama()))  # no shared prefix
    assert [type(x) for x in kv_cache(llama()).layers] == [GrowingLayer] * 2
    assert not any(type(x) is DynamicLayer for x in kv_cache(llama()).layers)
