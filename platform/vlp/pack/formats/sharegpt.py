"""LLaMA-Factory's multimodal ``sharegpt`` files (mllm_demo.json, mllm_video_demo.json, mllm_audio_demo.json,
mllm_video_audio_demo.json): ``{"messages": [{"role": "user"|"assistant"|"system", "content"}], "images": [..],
"videos": [..], "audios": [..], "system"?}``.

Roles map to vlp's ``human``/``gpt``. Each of ``images``/``videos``/``audios`` lists that modality's paths in the
order of its placeholders in the messages (several per record, in any turn of the user); the k-th ``<image>`` is
the k-th entry of ``images`` (vlp's rule). Paths are kept as written (``mllm_demo_data/1.jpg``: relative to the
media root). Audio items are packed as they are (precompute encodes them with `encoder.audio_tower`).

**System prompt.** A first message with role ``system`` (or a top-level ``system`` string, LLaMA-Factory's
``system`` column; the message wins) becomes the conversation's first turn ``{"from": "system", "value": ...}``:
``vlp.data.conversation`` takes such a turn as the template's system prompt in place of its default (vicuna_v1,
chatml; ``plain`` ignores it). ``PackRecord.system`` repeats it. A system message anywhere else is an error.

Checked (search corpus ``code``): hiyouga/LLaMA-Factory ``src/llamafactory/data/converter.py``
(``SharegptDatasetConverter``: a first message whose role is the system tag becomes ``_system``, else the
``system`` column; user/observation on odd turns and assistant/function on even ones, else the example is broken;
an odd message count is broken; ``images``/``videos``/``audios`` columns) and ``data/dataset_info.json`` entry
``mllm_demo`` (``columns: messages, images``; ``tags: role_tag role, content_tag content, user_tag user,
assistant_tag assistant``); the real demo files in ``shared/media/llamafactory_mllm_demo``.

Errors: missing ``messages``; a message without string ``role``/``content``; roles other than user/assistant
(and a first system); turns not alternating from user; ending without an assistant answer; media lists of the
wrong type; placeholder/item count mismatch per modality.
"""

from __future__ import annotations

from typing import Literal, Optional

from ...data.conversation import turn_role
from .base import (ANNOTATION_FORMATS, AnnotationFormat, FormatCfg, PackItem, PackRecord, check_turns,
                   conversation_record, path_list)

ROLE_TO_FROM = {"user": "human", "assistant": "gpt", "system": "system"}
MEDIA_KEYS = (("images", "image"), ("videos", "video"), ("audios", "audio"))


@ANNOTATION_FORMATS.register
class ShareGPTFormat(AnnotationFormat):
    """LLaMA-Factory multimodal sharegpt JSON / JSON Lines (see the module doc)."""

    class Cfg(FormatCfg):
        type: Literal["sharegpt"] = "sharegpt"

    cfg: Cfg

    def convert(self, index: int, raw: dict) -> PackRecord:
        conv = self.turns(raw)
        system: Optional[str] = conv[0]["value"] if conv[0]["from"] == "system" else None
        if turn_role(conv[-1]) != "assistant":
            raise ValueError("'messages' must end with an assistant message (LLaMA-Factory skips such records)")
        items = [PackItem(modality=m, path=p) for key, m in MEDIA_KEYS
                 for p in path_list(raw, key, self.cfg.max_items)]
        if len(items) > self.cfg.max_items:
            raise ValueError(f"record names {len(items)} media items, over the limit of {self.cfg.max_items}")
        return conversation_record(index, raw, self.record_id(raw), conv, items, system)

    def turns(self, raw: dict) -> list[dict]:
        """``messages`` as vlp turns (``{from, value}``), with the system prompt as the first turn if any."""
        msgs = raw.get("messages")
        if msgs is None:
            raise ValueError("missing 'messages'")
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list of {role, content} objects")
        conv = []
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f"messages[{i}] must be an object with string 'role' and 'content'")
            if m["role"] not in ROLE_TO_FROM:
                raise ValueError(f"messages[{i}] has role {m['role']!r}; only user, assistant and a first system "
                                 "message are supported")
            conv.append({"from": ROLE_TO_FROM[m["role"]], "value": m["content"]})
        system = raw.get("system")
        if conv[0]["from"] != "system" and system not in (None, ""):
            if not isinstance(system, str):
                raise ValueError(f"'system' must be a string, got a {type(system).__name__}")
            conv.insert(0, {"from": "system", "value": system})
        return check_turns(conv, "messages")
