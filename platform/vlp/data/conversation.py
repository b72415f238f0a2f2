"""Conversation templates and label masking (LLaVA-style), as plain functions.

A sample is tokenised segment by segment, so the label mask is exact: only assistant turns (and the
turn terminator that follows each) carry labels; system prompt, user turns, role tags and the visual
placeholder are ``IGNORE_INDEX``. The ``<video>``/``<image>`` placeholder becomes one
``VISUAL_TOKEN_INDEX`` id that the model later replaces with the sample's visual tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from ..registry import Registry

IGNORE_INDEX = -100
VISUAL_TOKEN_INDEX = -200  # as LLaVA's IMAGE_TOKEN_INDEX: never a real vocabulary id
PLACEHOLDER_RE = re.compile(r"<(video|image)>")

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclass
class Segment:
    text: str
    train: bool  # does this text carry labels


@dataclass
class Template:
    """How turns become text segments."""

    name: str
    render: Callable[[list[dict], str], list[Segment]]


TEMPLATES: Registry[Template] = Registry("conversation template")


def _norm_role(r: str) -> str:
    r = r.lower()
    if r in ("human", "user"):
        return "user"
    if r in ("gpt", "assistant", "model"):
        return "assistant"
    if r == "system":
        return "system"
    raise ValueError(f"unknown conversation role {r!r}")


def _turns(conv: Sequence[dict]) -> tuple[str | None, list[tuple[str, str]]]:
    system = None
    turns = []
    for t in conv:
        role = _norm_role(t["from"] if "from" in t else t["role"])
        value = t["value"] if "value" in t else t["content"]
        if role == "system":
            system = value
        else:
            turns.append((role, value))
    if not turns or turns[0][0] != "user":
        raise ValueError("a conversation must start with a user turn")
    for (a, _), (b, _) in zip(turns, turns[1:]):
        if a == b:
            raise ValueError("user and assistant turns must alternate")
    return system, turns


def _plain(conv: list[dict], eos: str) -> list[Segment]:
    """Caption pretraining (LLaVA 'plain'): placeholder, then the caption; loss on the caption."""
    _, turns = _turns(conv)
    visual = PLACEHOLDER_RE.search(turns[0][1])
    caption = turns[1][1] if len(turns) > 1 else ""
    return [Segment(visual.group(0) if visual else "", False), Segment(caption.strip() + "\n", True),
            Segment(eos, True)]


def _vicuna_v1(conv: list[dict], eos: str) -> list[Segment]:
    system, turns = _turns(conv)
    segs = [Segment((system or VICUNA_SYSTEM) + " ", False)]
    for role, value in turns:
        if role == "user":
            segs.append(Segment(f"USER: {value} ASSISTANT:", False))
        else:
            segs.append(Segment(f" {value}", True))
            segs.append(Segment(eos, True))
    return segs


def _chatml(conv: list[dict], eos: str) -> list[Segment]:
    system, turns = _turns(conv)
    segs = [Segment(f"<|im_start|>system\n{system or 'You are a helpful assistant.'}<|im_end|>\n", False)]
    for role, value in turns:
        if role == "user":
            segs.append(Segment(f"<|im_start|>user\n{value}<|im_end|>\n<|im_start|>assistant\n", False))
        else:
            segs.append(Segment(value, True))
            segs.append(Segment("<|im_end|>", True))
            segs.append(Segment("\n", False))
    return segs


for _name, _fn in (("plain", _plain), ("vicuna_v1", _vicuna_v1), ("chatml", _chatml)):
    TEMPLATES.register(_name)(Template(_name, _fn))


def caption_conversation(caption: str, media_type: str) -> list[dict]:
    """A caption as a one-turn conversation (what the plain template expects)."""
    return [{"from": "human", "value": f"<{media_type}>"}, {"from": "gpt", "value": caption}]


def _encode_text(tokenizer, text: str) -> list[int]:
    """Tokenise text; placeholders become VISUAL_TOKEN_INDEX."""
    ids: list[int] = []
    pos = 0
    for m in PLACEHOLDER_RE.finditer(text):
        if m.start() > pos:
            ids += tokenizer(text[pos:m.start()], add_special_tokens=False).input_ids
        ids.append(VISUAL_TOKEN_INDEX)
        pos = m.end()
    if pos < len(text):
        ids += tokenizer(text[pos:], add_special_tokens=False).input_ids
    return ids


def tokenize_conversation(conv: list[dict], tokenizer, template: str) -> tuple[list[int], list[int]]:
    """-> (input_ids, labels) with labels IGNORE_INDEX everywhere but assistant text."""
    tpl = TEMPLATES.get(template)
    eos = tokenizer.eos_token or ""
    ids: list[int] = []
    labels: list[int] = []
    if tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for seg in tpl.render(list(conv), eos):
        if not seg.text:
            continue
        seg_ids = _encode_text(tokenizer, seg.text)
        ids += seg_ids
        labels += [t if seg.train and t != VISUAL_TOKEN_INDEX else IGNORE_INDEX for t in seg_ids]
    if ids.count(VISUAL_TOKEN_INDEX) > 1:
        raise ValueError("a sample may hold at most one <video>/<image> placeholder")
    return ids, labels


def prompt_ids(conv: list[dict], tokenizer, template: str) -> list[int]:
    """Token ids of a conversation whose last turn is the user's, ending where the assistant would start."""
    tpl = TEMPLATES.get(template)
    segs = tpl.render(list(conv) + [{"from": "gpt", "value": ""}], tokenizer.eos_token or "")
    # drop the (empty) assistant answer and everything after it
    while segs and segs[-1].train or (segs and segs[-1].text in ("", "\n")):
        segs.pop()
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for s in segs:
        ids += _encode_text(tokenizer, s.text)
    return ids
