"""Templates and label masks, token by token, on hand-made conversations."""

from __future__ import annotations

import pytest

from vlp.data.conversation import (IGNORE_INDEX, TEMPLATES, VISUAL_TOKEN_INDEX, caption_conversation, prompt_ids,
                                   tokenize_conversation)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from vlp.models.presets import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("preset:tiny-tokenizer"))


CONV = [{"from": "human", "value": "<video>\nWhat color is the shape?"}, {"from": "gpt", "value": "The shape is red."},
        {"from": "human", "value": "Which direction does the shape move?"}, {"from": "gpt", "value": "It moves left."}]


def _labelled_text(tok, ids, labels) -> str:
    """Decode only the labelled tokens, marking gaps with |."""
    out, run = [], []
    for i, l in zip(ids, labels):
        if l == IGNORE_INDEX:
            if run:
                out.append(tok.decode(run))
                run = []
        else:
            assert l == i, "a label must equal its input token"
            run.append(l)
    if run:
        out.append(tok.decode(run))
    return "|".join(out)


def test_templates_registered():
    assert {"plain", "vicuna_v1", "chatml"} <= set(TEMPLATES.names())


def test_vicuna_v1_masks_everything_but_assistant_turns(tok):
    ids, labels = tokenize_conversation(CONV, tok, "vicuna_v1")
    assert len(ids) == len(labels) and ids.count(VISUAL_TOKEN_INDEX) == 1
    assert labels[ids.index(VISUAL_TOKEN_INDEX)] == IGNORE_INDEX
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE_INDEX
    assert _labelled_text(tok, ids, labels) == " The shape is red.</s>| It moves left.</s>"
    full = tok.decode([i for i in ids if i >= 0])
    assert full.startswith("<s>A chat between") and "USER: \nWhat color is the shape? ASSISTANT: The shape is red.</s>USER:" in full
    # token by token: every labelled position is inside an assistant answer
    n_lab = sum(l != IGNORE_INDEX for l in labels)
    assert n_lab == len(tok(" The shape is red.", add_special_tokens=False).input_ids) + \
        len(tok(" It moves left.", add_special_tokens=False).input_ids) + 2


def test_chatml_masks(tok):
    ids, labels = tokenize_conversation(CONV, tok, "chatml")
    assert _labelled_text(tok, ids, labels) == "The shape is red.<|im_end|>|It moves left.<|im_end|>"
    text = tok.decode([i for i in ids if i >= 0])
    assert "<|im_start|>user\n\nWhat color is the shape?<|im_end|>\n<|im_start|>assistant\nThe shape is red." in text


def test_plain_caption_template(tok):
    ids, labels = tokenize_conversation(caption_conversation("A red circle.", "image"), tok, "plain")
    assert ids[:2] == [tok.bos_token_id, VISUAL_TOKEN_INDEX]
    assert _labelled_text(tok, ids, labels) == "A red circle.\n</s>"


def test_text_only_and_system_prompt(tok):
    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    ids, labels = tokenize_conversation(conv, tok, "vicuna_v1")
    assert VISUAL_TOKEN_INDEX not in ids
    assert tok.decode(ids).startswith("<s>Be brief. USER: Hi ASSISTANT:")
    assert _labelled_text(tok, ids, labels) == " Hello</s>"


def test_prompt_ids_end_where_the_answer_starts(tok):
    p = prompt_ids(CONV[:1], tok, "vicuna_v1")
    full, _ = tokenize_conversation(CONV[:2], tok, "vicuna_v1")
    assert full[: len(p)] == p and tok.decode([i for i in p if i >= 0]).endswith("ASSISTANT:")
    p = prompt_ids(CONV[:1], tok, "chatml")
    assert tok.decode([i for i in p if i >= 0]).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("conv,match", [
    ([{"from": "gpt", "value": "x"}], "start with a user turn"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "alternate"),
    ([{"from": "robot", "value": "a"}], "unknown conversation role"),
    ([{"from": "human", "value": "<image><video>"}, {"from": "gpt", "value": "b"}], "at most one"),
])
def test_bad_conversations_are_clear_errors(tok, conv, match):
    with pytest.raises(ValueError, match=match):
        tokenize_conversation(conv, tok, "vicuna_v1")
