"""VideoLLM.generate_batch: left-padded batched decoding with a KV cache gives, token for token, what
VideoLLM.generate gives one prompt at a time, for batches mixing videos, images, several items and text-only
prompts of different lengths."""

from __future__ import annotations

import pytest
import torch

from vlp.config import validate
from vlp.data.conversation import prompt_ids
from vlp.models.generation import left_positions, next_tokens, row_tokens, shared_prefix
from vlp.models.videollm import ModelConfig, Prompt, VideoLLM

NEW = 12


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from vlp.models.presets import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("preset:tiny-tokenizer"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VideoLLM(validate(ModelConfig, {"vision_hidden_size": 64})).eval()


@pytest.fixture(scope="module")
def gpt2(tok):
    """The same VideoLLM on a GPT-2 LM: learned absolute positions, so a row's position ids matter (LLaMA's
    rotary positions are relative: a row shifted by its padding gives the same answer)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=2, n_positions=1024,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     initializer_range=0.2)  # GPT-2's 0.02 makes an untrained model repeat one token for any prompt
    llm = GPT2LMHeadModel(cfg)
    return VideoLLM(validate(ModelConfig, {"vision_hidden_size": 64}), llm=llm.eval()).eval()


def ask(tok, text: str) -> torch.Tensor:
    return torch.tensor(prompt_ids([{"from": "human", "value": text}], tok, "vicuna_v1"))


@pytest.fixture(scope="module")
def prompts(tok) -> list[Prompt]:
    """A video (T=8, valley-pooled), an image (T=1), a text-only prompt, a longer text-only one, a video of T=4 as
    per-frame features and a prompt with a video and an image: six different embedded lengths."""
    g = torch.Generator().manual_seed(1)
    return [
        Prompt(ask(tok, "<video>\nWhat color is the shape?"), torch.randn(256 + 8, 64, generator=g), "valley_pooled",
               8),
        Prompt(ask(tok, "<image>\nWhat shape is shown?"), torch.randn(256 + 1, 64, generator=g), "valley_pooled", 1),
        Prompt(ask(tok, "Hi")),
        Prompt(ask(tok, "Which way does the red circle move, left or right, up or down? Answer in a sentence.")),
        Prompt(ask(tok, "<video>\nWhich way?"), torch.randn(4, 1 + 256, 64, generator=g), "frames", 4, "video"),
        Prompt(ask(tok, "<video>\n<image>\nSame colour?"),
               [torch.randn(256 + 8, 64, generator=g), torch.randn(256 + 1, 64, generator=g)], "valley_pooled", [8, 1]),
    ]


def one_at_a_time(model, prompts, **kw) -> list[list[int]]:
    return [list(model.generate(p.input_ids, p.features, p.mode, p.num_frames, modalities=p.modalities, **kw))
            for p in prompts]


def embedded_lengths(model, prompts) -> list[int]:
    visuals = [model.sample_visuals(p.features, p.mode, p.num_frames, i, p.modalities) for i, p in enumerate(prompts)]
    _, mask, _ = model.build_inputs([p.input_ids for p in prompts], None, visuals, left=True)
    return mask.sum(1).tolist()


@pytest.fixture(scope="module")
def single(model, prompts) -> list[list[int]]:
    return one_at_a_time(model, prompts, max_new_tokens=NEW)


def test_batched_greedy_is_one_at_a_time_greedy(model, prompts, single):
    assert len(set(embedded_lengths(model, prompts))) == len(prompts)  # every row is padded differently
    assert all(len(s) == NEW for s in single) and len({tuple(s) for s in single}) == len(prompts)
    assert model.generate_batch(prompts, max_new_tokens=NEW) == single
    shuffled = [prompts[i] for i in (5, 2, 0, 4, 1, 3)]  # the answer of a row does not depend on its neighbours
    assert model.generate_batch(shuffled, max_new_tokens=NEW) == [single[i] for i in (5, 2, 0, 4, 1, 3)]


def test_grouped_batches_hold_near_lengths_longest_first_and_answers_keep_the_order(model, prompts, single):
    seen: list[list[int]] = []
    batch = model.generate_batch

    def recording(ps, **kw):  # the real generate_batch, each batch's embedded lengths noted
        seen.append(embedded_lengths(model, ps))
        return batch(ps, **kw)

    model.generate_batch = recording
    try:
        out = model.generate_grouped(prompts, 4, max_new_tokens=NEW)
    finally:
        del model.generate_batch
    assert out == single
    lengths = sorted(embedded_lengths(model, prompts), reverse=True)
    assert seen == [lengths[:4], lengths[4:]]  # without grouping: prompts 0-3, then 4-5, lengths mixed
    assert model.generate_grouped([], 4) == []


def test_the_prefix_every_prompt_shares_goes_through_the_lm_once(model, prompts, single):
    ids = [p.input_ids for p in prompts]
    n = shared_prefix(ids)
    assert n > 10 and all(torch.equal(x[:n], ids[0][:n]) for x in ids)  # vicuna_v1's system prompt and more
    assert len({int(x[n]) for x in ids}) > 1  # the longest such run
    embeds, mask, positions, past = model.batch_inputs(prompts, room=NEW)
    longest = max(embedded_lengths(model, prompts))
    assert embeds.shape[1] == longest - n and mask.shape == (len(prompts), longest)
    assert past.get_seq_length() == n and positions[:, -1].tolist() == [x - 1 for x in embedded_lengths(model, prompts)]
    assert model.generate_batch(prompts, max_new_tokens=NEW, share_prefix=False) == single
    assert model.batch_inputs(prompts, share_prefix=False)[3] is None


def test_shared_prefix_stops_at_a_placeholder_and_leaves_every_prompt_a_token():
    t = torch.tensor
    assert shared_prefix([t([1, 2, 3, -200, 5]), t([1, 2, 3, -200, 6])]) == 3
    assert shared_prefix([t([1, 2, 3]), t([1, 2, 3, 4])]) == 2
    assert shared_prefix([t([1, 2, 3])]) == 0 and shared_prefix([t([5, 1]), t([6, 1])]) == 0
    assert shared_prefix([t([1, 2, 9, 4]), t([1, 2, 3, 4])]) == 2  # a later equal token does not count


def test_each_row_stops_at_its_own_eos(model, prompts, single):
    eos = single[1][3]  # row 1's 4th token: it ends there, other rows where (if) they produce it
    want = [s[:s.index(eos)] if eos in s else s for s in single]
    assert want[1] == single[1][:3] and any(len(w) == NEW for w in want)  # rows of different lengths
    assert model.generate_batch(prompts, max_new_tokens=NEW, eos_token_id=eos) == want
    assert one_at_a_time(model, prompts, max_new_tokens=NEW, eos_token_id=eos) == want


def test_max_new_tokens_and_a_batch_of_one(model, prompts, single):
    assert model.generate_batch(prompts, max_new_tokens=1) == [s[:1] for s in single]
    assert model.generate_batch(prompts, max_new_tokens=5) == [s[:5] for s in single]
    assert model.generate_batch(prompts[4:5], max_new_tokens=NEW) == [single[4]]
    assert model.generate_batch([], max_new_tokens=NEW) == []


def test_the_hook_hears_every_row_token_by_token_then_its_end(model, prompts, single):
    eos = single[1][3]
    heard: dict[int, list] = {i: [] for i in range(len(prompts))}
    out = model.generate_batch(prompts, max_new_tokens=NEW, eos_token_id=eos,
                               on_token=lambda row, t: heard[row].append(t))
    assert [heard[i] for i in range(len(prompts))] == [o + [None] for o in out]


def test_sampling_is_reproducible_with_a_seeded_generator(model, prompts, single):
    def sample(seed: int, ps=prompts) -> list[list[int]]:
        return model.generate_batch(ps, max_new_tokens=NEW, do_sample=True, temperature=1.5, top_p=0.9,
                                    generator=torch.Generator().manual_seed(seed))

    a = sample(0)
    assert a == sample(0) and a != sample(1) and a != single
    assert all(len(r) == NEW for r in a)
    # one row draws from the generator as generate does: the same sampled answer
    g = torch.Generator().manual_seed(3)
    assert sample(3, prompts[:1]) == one_at_a_time(model, prompts[:1], max_new_tokens=NEW, do_sample=True,
                                                   temperature=1.5, top_p=0.9, generator=g)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))  # (2, 4)
    draws = torch.stack([next_tokens(logits, True, 1.0, 0.7, torch.Generator().manual_seed(s)) for s in range(200)])
    assert set(draws[:, 0].tolist()) == {0, 1} and set(draws[:, 1].tolist()) == {3, 2}
    assert next_tokens(logits).tolist() == [0, 3]


def decode(model, prompts, left: bool, positions=None) -> list[list[int]]:
    visuals = [model.sample_visuals(p.features, p.mode, p.num_frames, i, p.modalities) for i, p in enumerate(prompts)]
    e, m, _ = model.build_inputs([p.input_ids for p in prompts], None, visuals, left=left)  # (B, L, d), (B, L)
    pos = left_positions(m) if positions is None else positions(m)
    with torch.no_grad():
        return row_tokens(model.llm, e, m, pos, NEW, next_tokens)


def test_without_left_padding_or_mask_positions_the_answers_differ(model, gpt2, prompts, single):
    assert decode(model, prompts, left=True) == single
    right = decode(model, prompts, left=False, positions=lambda m: torch.arange(m.shape[1]).expand(m.shape))
    longest = max(range(len(prompts)), key=lambda i: embedded_lengths(model, prompts)[i])
    assert right[longest] == single[longest] and sum(r != s for r, s in zip(right, single)) == len(prompts) - 1
    # absolute positions: counting from the padding instead of the row's first token changes the answers
    want = one_at_a_time(gpt2, prompts, max_new_tokens=NEW)
    assert gpt2.generate_batch(prompts, max_new_tokens=NEW) == want
    shifted = decode(gpt2, prompts, left=True, positions=lambda m: torch.arange(m.shape[1]).expand(m.shape))
    assert shifted[longest] == want[longest] and sum(r != s for r, s in zip(shifted, want)) == len(prompts) - 1


def test_decode_batch_steps_keep_each_rows_budget_and_stop_rows_early(model, prompts):
    """The server's step-wise form: per-row budgets, a row stopped from outside after its 2nd token, and every
    row heard to end (None) after its last token; the tokens before are generate_batch's."""
    ps = prompts[:4]
    full = model.generate_batch(ps, max_new_tokens=NEW)  # no eos: every row runs its budget
    budgets, tokens, steps = [3, NEW, 1, 5], [[] for _ in ps], 0
    for step in model.decode_batch(ps, budgets, next_tokens, None, stopped=lambda i: i == 1 and len(tokens[1]) >= 2):
        steps += 1
        for i, t in enumerate(step):
            if t is not None:
                assert len(tokens[i]) < budgets[i]
                tokens[i].append(t)
    assert tokens == [full[0][:3], full[1][:2], full[2][:1], full[3][:5]]
    assert steps == 6  # the longest row's five steps, then the closing step where every row has ended
