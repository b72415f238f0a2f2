"""Templates and label masks, token by token, on hand-made conversations."""

from __future__ import annotations

import pytest

from vlp.data.conversation import (IGNORE_INDEX, MAX_PLACEHOLDERS, TEMPLATES, VISUAL_TOKEN_INDEX,
                                   caption_conversation, encode_conversation, placeholder_modalities, prompt_ids,
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
    # several placeholders are fine (test_two_images...), absurdly many are not (hostile input)
    ([{"from": "human", "value": "<image>" * (MAX_PLACEHOLDERS + 1)}, {"from": "gpt", "value": "b"}],
     f"at most {MAX_PLACEHOLDERS}"),
])
def test_bad_conversations_are_clear_errors(tok, conv, match):
    with pytest.raises(ValueError, match=match):
        tokenize_conversation(conv, tok, "vicuna_v1")


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def test_two_images_become_two_visual_tokens_in_order(tok):
    conv = [{"from": "human", "value": "<image>\n<image>\nWhich is brighter?"}, {"from": "gpt", "value": "The first."}]
    enc = encode_conversation(conv, tok, "vicuna_v1")
    assert enc.modalities == ["image", "image"] and enc.input_ids.count(VISUAL_TOKEN_INDEX) == 2
    assert tokenize_conversation(conv, tok, "vicuna_v1") == (enc.input_ids, enc.labels)
    a, b = [i for i, t in enumerate(enc.input_ids) if t == VISUAL_TOKEN_INDEX]
    assert enc.input_ids[a + 1] == _ids(tok, "\n")[0] and b == a + 2  # "<image>" "\n" "<image>"
    assert all(enc.labels[i] == IGNORE_INDEX for i in (a, b))
    assert _labelled_text(tok, enc.input_ids, enc.labels) == " The first.</s>"


def test_image_and_video_keep_their_order_and_modality(tok):
    conv = [{"from": "human", "value": "First <video>, then <image>: same shape?"}, {"from": "gpt", "value": "Yes."},
            {"from": "human", "value": "And this <image>?"}, {"from": "gpt", "value": "No."}]
    for template in ("vicuna_v1", "chatml", "plain"):
        enc = encode_conversation(conv, tok, template)
        assert enc.modalities == ["video", "image", "image"], template
        assert enc.input_ids.count(VISUAL_TOKEN_INDEX) == 3 and len(enc.labels) == len(enc.input_ids)
    # plain keeps the placeholders of every user turn (so the count still matches the items) and the first answer
    enc = encode_conversation(conv, tok, "plain")
    assert enc.input_ids[:4] == [tok.bos_token_id] + [VISUAL_TOKEN_INDEX] * 3
    assert _labelled_text(tok, enc.input_ids, enc.labels) == "Yes.\n</s>"
    assert placeholder_modalities("<audio> a <video><image>") == ["audio", "video", "image"]


def test_audio_placeholder_is_recognised(tok):
    enc = encode_conversation([{"from": "human", "value": "<audio>\nWhat is said?"}, {"from": "gpt", "value": "Hi."}],
                              tok, "vicuna_v1")
    assert enc.modalities == ["audio"] and enc.input_ids.count(VISUAL_TOKEN_INDEX) == 1


TEXT_ONLY = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]


@pytest.mark.parametrize("template,prompt,answer,after", [
    # prompt: the untrained segments, each tokenised on its own as the template renders them
    ("vicuna_v1", ["VICUNA ", "USER: Hi ASSISTANT:"], " Hello", "</s>"),
    ("chatml", ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
                "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"], "Hello", "<|im_end|>"),
    ("plain", [], "Hello\n", "</s>"),  # the (empty) placeholder segment adds nothing
])
def test_text_only_masks_are_exact(tok, template, prompt, answer, after):
    from vlp.data.conversation import VICUNA_SYSTEM

    enc = encode_conversation(TEXT_ONLY, tok, template)
    assert enc.modalities == [] and VISUAL_TOKEN_INDEX not in enc.input_ids
    pre = [tok.bos_token_id] + [i for seg in prompt for i in _ids(tok, seg.replace("VICUNA", VICUNA_SYSTEM))]
    ans = _ids(tok, answer) + _ids(tok, after)
    tail = _ids(tok, "\n") if template == "chatml" else []  # chatml's newline after <|im_end|> is not trained
    assert enc.input_ids == pre + ans + tail
    assert enc.labels == [IGNORE_INDEX] * len(pre) + ans + [IGNORE_INDEX] * len(tail)


def test_plain_caption_without_media_is_just_text(tok):
    """A caption sample with no media item: an empty user turn, the caption trained, nothing visual."""
    conv = caption_conversation("A red circle.", "")
    assert conv == caption_conversation("A red circle.", None) == caption_conversation("A red circle.", [])
    assert conv[0] == {"from": "human", "value": ""}
    enc = encode_conversation(conv, tok, "plain")
    cap = _ids(tok, "A red circle.\n") + [tok.eos_token_id]
    assert enc.input_ids == [tok.bos_token_id] + cap and enc.labels == [IGNORE_INDEX] + cap
    assert enc.modalities == []
    # several items: one placeholder each, in order
    two = caption_conversation("Both.", ["video", "image"])
    assert two[0]["value"] == "<video><image>" and encode_conversation(two, tok, "plain").modalities == ["video", "image"]
    # chat-style templates with an empty user turn do not crash either
    assert VISUAL_TOKEN_INDEX not in encode_conversation(conv, tok, "vicuna_v1").input_ids


def test_prompt_ids_with_several_placeholders(tok):
    p = prompt_ids([{"from": "human", "value": "<image><video>\nSame?"}], tok, "vicuna_v1")
    assert p.count(VISUAL_TOKEN_INDEX) == 2
    full, _ = tokenize_conversation([{"from": "human", "value": "<image><video>\nSame?"}, {"from": "gpt", "value": "Y"}],
                                    tok, "vicuna_v1")
    assert full[:len(p)] == p
