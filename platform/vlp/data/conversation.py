"""Conversation templates and label masking (LLaVA-style), as plain functions.

A sample is tokenised segment by segment, so the label mask is exact: only assistant turns (and the
turn terminator that follows each) carry labels; system prompt, user turns, role tags and the visual
placeholders are ``IGNORE_INDEX``. Every ``<video>``/``<image>``/``<audio>`` placeholder becomes one
``VISUAL_TOKEN_INDEX`` id, in order; the model later replaces the k-th one with the sample's k-th media
item's tokens. :func:`encode_conversation` also says which modality each placeholder is. A conversation
without placeholders (a text-only sample) is tokenised with the same masks.

Imports only vlp.registry; no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from ..registry import Registry

IGNORE_INDEX = -100
VISUAL_TOKEN_INDEX = -200  # as LLaVA's IMAGE_TOKEN_INDEX: never a real vocabulary id
PLACEHOLDER_RE = re.compile(r"<(video|image|audio)>")
MAX_PLACEHOLDERS = 1024  # hostile-input bound per conversation (a sample's media items are bounded lower)

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclass
class Segment:
    text: str
    train: bool  # does this text carry labels


@dataclass
class Template:
    """How turns become text segments, and the same as a Hugging Face chat template (Jinja, for exports):
    rendered by ``apply_chat_template`` and tokenised, it gives the ids :func:`encode_conversation` gives (and with
    ``add_generation_prompt``, :func:`prompt_ids`'s), checked per tokenizer by :func:`chat_template_problems`.
    None: the template has no Jinja form (exports then carry none)."""

    name: str
    render: Callable[[list[dict], str], list[Segment]]
    chat_template: str | None = None


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


def turn_role(turn: dict) -> str:
    """``"user"``, ``"assistant"`` or ``"system"`` for a ``{from, value}`` (or ``{role, content}``) turn; ValueError
    for any other role."""
    return _norm_role(turn["from"] if "from" in turn else turn["role"])


def _turns(conv: Sequence[dict]) -> tuple[str | None, list[tuple[str, str]]]:
    system = None
    turns = []
    for t in conv:
        role = turn_role(t)
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
    """Caption pretraining (LLaVA 'plain'): the placeholders, then the caption; loss on the caption.

    Every placeholder of every user turn is kept, in order and nothing else of the user text (so the count
    still matches the sample's media items); the caption is the first assistant answer. A text-only sample
    (no placeholder) is just its caption."""
    _, turns = _turns(conv)
    visual = "".join(m.group(0) for role, value in turns if role == "user" for m in PLACEHOLDER_RE.finditer(value))
    caption = turns[1][1] if len(turns) > 1 else ""
    return [Segment(visual, False), Segment(caption.strip() + "\n", True), Segment(eos, True)]


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


# ------------------------------------------------------------------------ the templates as Jinja chat templates
# A message's content is a string (placeholders written in it, as vlp's conversations have them) or a list of parts
# ({"type": "image"|"video"|"audio"} and {"type": "text", "text": ...}): a media part becomes its placeholder, and a
# text part right after a media part starts on a new line ("<image>\nWhat is ...", as `vlp infer` asks).
_JINJA_TEXT = (
    "{%- macro text(c) -%}{%- if c is string -%}{{ c }}{%- else -%}{%- set ns = namespace(media=false) -%}"
    "{%- for p in c -%}{%- if p['type'] in ['image', 'video', 'audio'] -%}{{ '<' ~ p['type'] ~ '>' }}"
    "{%- set ns.media = true -%}{%- elif p['type'] == 'text' -%}{{ ('\\n' if ns.media else '') ~ p['text'] }}"
    "{%- set ns.media = false -%}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}")
_JINJA_MARKS = (  # only the placeholders of a content, in order (the plain template keeps nothing else)
    "{%- macro marks(c) -%}{%- if c is string -%}{%- for piece in c.split('<')[1:] -%}"
    "{%- for k in ['image', 'video', 'audio'] if piece.startswith(k ~ '>') -%}{{ '<' ~ k ~ '>' }}{%- endfor -%}"
    "{%- endfor -%}{%- else -%}{%- for p in c if p['type'] in ['image', 'video', 'audio'] -%}"
    "{{ '<' ~ p['type'] ~ '>' }}{%- endfor -%}{%- endif -%}{%- endmacro -%}")
_JINJA_BOS = "{%- if bos_token -%}{{ bos_token }}{%- endif -%}"


def _jinja_system(default: str) -> str:
    return ("{%- set sys = namespace(v='') -%}{%- for m in messages if m['role'] == 'system' -%}"
            "{%- set sys.v = text(m['content']) -%}{%- endfor -%}"
            "{%- set system = sys.v or '" + default.replace("'", "\\'") + "' -%}")


_JINJA = {
    "plain": _JINJA_TEXT + _JINJA_MARKS + _JINJA_BOS + (
        "{%- for m in messages if m['role'] == 'user' -%}{{ marks(m['content']) }}{%- endfor -%}"
        "{%- set answers = messages | selectattr('role', 'equalto', 'assistant') | list -%}"
        "{%- if answers and not add_generation_prompt -%}"
        "{{ text(answers[0]['content']) | trim ~ '\\n' ~ eos_token }}{%- endif -%}"),
    "vicuna_v1": _JINJA_TEXT + _jinja_system(VICUNA_SYSTEM) + _JINJA_BOS + "{{ system ~ ' ' }}" + (
        "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{{ 'USER: ' ~ text(m['content']) ~ ' ASSISTANT:' }}"
        "{%- elif m['role'] == 'assistant' -%}{{ ' ' ~ text(m['content']) ~ eos_token }}{%- endif -%}"
        "{%- endfor -%}"),
    "chatml": _JINJA_TEXT + _jinja_system("You are a helpful assistant.") + _JINJA_BOS + (
        "{{ '<|im_start|>system\\n' ~ system ~ '<|im_end|>\\n' }}{%- for m in messages -%}"
        "{%- if m['role'] == 'user' -%}{{ '<|im_start|>user\\n' ~ text(m['content']) ~ '<|im_end|>\\n"
        "<|im_start|>assistant\\n' }}{%- elif m['role'] == 'assistant' -%}{{ text(m['content']) ~ '<|im_end|>\\n' }}"
        "{%- endif -%}{%- endfor -%}"),
}

for _name, _fn in (("plain", _plain), ("vicuna_v1", _vicuna_v1), ("chatml", _chatml)):
    TEMPLATES.register(_name)(Template(_name, _fn, _JINJA[_name]))


def caption_conversation(caption: str, media_type: str | Sequence[str] | None) -> list[dict]:
    """A caption as a one-turn conversation (what the plain template expects).

    ``media_type``: one modality (``"video"``), the modalities of the sample's items in order (one placeholder
    each), or ``""``/``None``/``[]`` for a text-only sample (an empty user turn, no placeholder)."""
    kinds = [media_type] if isinstance(media_type, str) else list(media_type or [])
    user = "".join(f"<{k}>" for k in kinds if k)
    return [{"from": "human", "value": user}, {"from": "gpt", "value": caption}]


def placeholder_modalities(text: str) -> list[str]:
    """The modality of every placeholder in ``text``, in order: ``"<image> a <video>"`` -> ``["image", "video"]``."""
    return [m.group(1) for m in PLACEHOLDER_RE.finditer(text)]


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


@dataclass
class EncodedConversation:
    """A tokenised conversation: ``input_ids`` and ``labels`` of equal length; ``modalities[k]`` is the modality
    of the k-th ``VISUAL_TOKEN_INDEX`` in ``input_ids`` (so ``len(modalities) == input_ids.count(-200)``)."""

    input_ids: list[int]
    labels: list[int]
    modalities: list[str]


def encode_conversation(conv: list[dict], tokenizer, template: str) -> EncodedConversation:
    """Tokenise with exact masks: labels IGNORE_INDEX everywhere but assistant text; every placeholder (any
    number, up to MAX_PLACEHOLDERS) becomes one VISUAL_TOKEN_INDEX, in order."""
    tpl = TEMPLATES.get(template)
    eos = tokenizer.eos_token or ""
    ids: list[int] = []
    labels: list[int] = []
    modalities: list[str] = []
    if tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for seg in tpl.render(list(conv), eos):
        if not seg.text:
            continue
        modalities += placeholder_modalities(seg.text)
        if len(modalities) > MAX_PLACEHOLDERS:
            raise ValueError(f"a conversation may hold at most {MAX_PLACEHOLDERS} <image>/<video>/<audio> placeholders")
        seg_ids = _encode_text(tokenizer, seg.text)
        ids += seg_ids
        labels += [t if seg.train and t != VISUAL_TOKEN_INDEX else IGNORE_INDEX for t in seg_ids]
    return EncodedConversation(ids, labels, modalities)


def tokenize_conversation(conv: list[dict], tokenizer, template: str) -> tuple[list[int], list[int]]:
    """-> (input_ids, labels) of :func:`encode_conversation` (without the placeholders' modalities)."""
    enc = encode_conversation(conv, tokenizer, template)
    return enc.input_ids, enc.labels


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


PARITY_CONVERSATIONS: list[list[dict]] = [  # what chat_template_problems renders both ways
    [{"role": "user", "content": "<image>\nWhat is in the picture?"}, {"role": "assistant", "content": "A red circle."},
     {"role": "user", "content": "Where is it?"}, {"role": "assistant", "content": "On the left, near the top."}],
    [{"role": "system", "content": "Answer briefly; it's a test."},
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
     {"role": "assistant", "content": "Two shapes: a blue square and a green triangle."}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}],
]


def _as_text(content) -> str:
    """A message's content as vlp's conversations write it: list parts joined as the Jinja templates join them."""
    if isinstance(content, str):
        return content
    out, media = "", False
    for p in content:
        if p["type"] in ("image", "video", "audio"):
            out, media = out + f"<{p['type']}>", True
        elif p["type"] == "text":
            out, media = out + ("\n" if media else "") + p["text"], False
    return out


def chat_template_problems(tokenizer, template: str, placeholder_ids: set[int]) -> list[str]:
    """Why the Jinja form of ``template`` does not give this tokenizer's vlp ids (:func:`encode_conversation`, and
    :func:`prompt_ids` with ``add_generation_prompt``) on :data:`PARITY_CONVERSATIONS`; [] when it does.
    ``placeholder_ids``: the tokenizer's ids of the placeholder tokens (compared as VISUAL_TOKEN_INDEX)."""
    tpl = TEMPLATES.get(template)
    if tpl.chat_template is None:
        return [f"template {template} has no chat template"]
    out = []
    for n, msgs in enumerate(PARITY_CONVERSATIONS):
        conv = [{"from": m["role"], "value": _as_text(m["content"])} for m in msgs]
        for prompt in (False, True):
            got = tokenizer.apply_chat_template(msgs[:-1] if prompt else msgs, chat_template=tpl.chat_template,
                                                tokenize=True, add_generation_prompt=prompt, return_dict=False)
            got = [VISUAL_TOKEN_INDEX if i in placeholder_ids else i for i in got]
            want = prompt_ids(conv[:-1], tokenizer, template) if prompt else \
                encode_conversation(conv, tokenizer, template).input_ids
            if got != want:
                k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                out.append(f"template {template}, conversation {n}{' (prompt)' if prompt else ''}: the chat template's "
                           f"ids differ from vlp's at token {k} ({got[k:k + 3]} vs {want[k:k + 3]})")
    return out
