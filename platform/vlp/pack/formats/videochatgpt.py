"""Video-ChatGPT's video instruction data (VideoInstruct100K.json): ``{"video_id", "q", "a"}``, one question and
its answer per record (several records per video).

Each record becomes a one-turn conversation ``[{"from": "human", "value": "<video>\\n" + q}, {"from": "gpt",
"value": a}]`` (the placeholder is prepended unless ``q`` already has one). The clip is an ActivityNet video
named by ``video_id`` (``v_k_ZXmr8pmrs``), downloaded as ``.mp4``, ``.mkv`` or ``.webm``: ``video_pattern`` (default
``"{video_id}.{ext}"``; any field of the record may be named) with each of ``extensions`` in turn gives the item's
``path`` (the first) and ``candidates`` (the others), which the pipeline tries in order. ``id`` = ``video_id``.

Checked (search corpus ``code``): mbzuai-oryx/Video-ChatGPT ``scripts/convert_instruction_json_to_training_format.py``
(reads ``content['video_id']``, ``content['q']``, ``content['a']``; writes ``id = video_id``, the human turn with
``<video>`` before or after ``q``, the gpt turn ``a``) and ``docs/train_video_chatgpt.md`` (the videos are
ActivityNet's, ids listed in ``docs/train_video_ids.txt``).

Errors: ``video_id``, ``q`` or ``a`` missing, not a string or empty; more than one ``<video>`` in ``q``; any other
placeholder in ``q``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .base import (ANNOTATION_FORMATS, AnnotationFormat, FormatCfg, PackItem, PackRecord, check_path,
                   conversation_record, fill, need_str, pattern_fields)


@ANNOTATION_FORMATS.register
class VideoChatGPTFormat(AnnotationFormat):
    """Video-ChatGPT question/answer JSON (see the module doc)."""

    class Cfg(FormatCfg):
        type: Literal["videochatgpt"] = "videochatgpt"
        video_pattern: str = Field("{video_id}.{ext}", description="the clip's path from the record's fields; "
                                   "{ext} takes each of extensions in turn")
        extensions: list[str] = Field(["mp4", "mkv", "webm"], min_length=1, description="candidate extensions")

        @field_validator("video_pattern")
        @classmethod
        def _fields(cls, v: str) -> str:
            if not pattern_fields(v):
                raise ValueError("video_pattern must name at least one field, e.g. '{video_id}.{ext}'")
            return v

    cfg: Cfg

    def record_id(self, raw: dict):
        v = raw.get("video_id")
        return v if isinstance(v, str) else None

    def convert(self, index: int, raw: dict) -> PackRecord:
        vid = need_str(raw, "video_id")
        q, a = need_str(raw, "q"), need_str(raw, "a")
        conv = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        exts = [e.lstrip(".") for e in self.cfg.extensions] if "{ext}" in self.cfg.video_pattern else [""]
        paths = list(dict.fromkeys(check_path(fill(self.cfg.video_pattern, {**raw, "ext": e}), "video path")
                                   for e in exts))
        item = PackItem(modality="video", path=paths[0], candidates=paths[1:])
        return conversation_record(index, raw, vid, conv, [item])
