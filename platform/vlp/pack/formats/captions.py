"""Caption tables: one (media, caption) pair per row, from a CSV/TSV, Parquet, JSON Lines or JSON array file.

Made for the metadata files of caption datasets: WebVid's ``results_2M_train.csv`` /
``results_10M_train.csv`` (columns ``videoid,contentUrl,duration,page_dir,name``; the clip is conventionally
stored as ``{page_dir}/{videoid}.mp4``: ``path_pattern: "{page_dir}/{videoid}.mp4"``, ``caption_column: name``)
and CC3M/CC12M-style tables (``media_column`` naming an image path or key, ``caption_column`` the text). Set
exactly one of ``media_column`` (the path as written) and ``path_pattern`` (the path from several columns).
The modality is ``modality``, or (``auto``) comes from the path's extension. A row becomes a caption record:
``caption`` set, ``conversations`` None, one item; ``id`` from ``id_column`` when set.

Checked: the WebVid column names are those of the released WebVid-2M/10M CSVs (``videoid``, ``contentUrl``,
``duration``, ``page_dir``, ``name``), as Valley's pretraining data (RupertLuo/Valley, ids are WebVid ``videoid`` s)
and LLaVA's ``docs/Data.md`` (CC-3M file names ``GCC_train_000000000.jpg``) use them.

Errors: the media column / a pattern field missing or empty, the caption missing or blank, an extension that
names no modality (with ``modality: auto``).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from .base import (ANNOTATION_FORMATS, AnnotationFormat, FormatCfg, PackRecord, check_path, fill, item_for,
                   need_str, pattern_fields)


@ANNOTATION_FORMATS.register
class CaptionsFormat(AnnotationFormat):
    """(media, caption) rows of a table (see the module doc)."""

    kinds = ("csv", "parquet", "jsonl", "json")

    class Cfg(FormatCfg):
        type: Literal["captions"] = "captions"
        media_column: Optional[str] = Field(None, description="column holding the media path or key")
        path_pattern: Optional[str] = Field(None, description="the media path from columns, e.g. "
                                            "'{page_dir}/{videoid}.mp4' for WebVid")
        caption_column: str = Field("caption", description="column holding the caption")
        id_column: Optional[str] = Field(None, description="column holding the row's id (kept as the record id)")
        modality: Literal["auto", "image", "video", "audio"] = Field(
            "auto", description="the items' modality; auto = from the path's extension")

        @field_validator("path_pattern")
        @classmethod
        def _pattern(cls, v: Optional[str]) -> Optional[str]:
            if v is not None and not pattern_fields(v):
                raise ValueError("path_pattern must name at least one column, e.g. '{page_dir}/{videoid}.mp4'")
            return v

        @model_validator(mode="after")
        def _one_source(self):
            if (self.media_column is None) == (self.path_pattern is None):
                raise ValueError("set exactly one of media_column (a column holding the path) and path_pattern")
            return self

    cfg: Cfg

    def record_id(self, raw: dict) -> Optional[str]:
        v = raw.get(self.cfg.id_column) if self.cfg.id_column else None
        return str(v) if isinstance(v, (str, int)) and not isinstance(v, bool) else None

    def convert(self, index: int, raw: dict) -> PackRecord:
        c = self.cfg
        caption = need_str(raw, c.caption_column, f"caption column {c.caption_column!r}")
        if c.media_column is not None:
            path = check_path(raw.get(c.media_column), f"media column {c.media_column!r}")
        else:
            path = check_path(fill(c.path_pattern, raw), "media path")
        item = item_for(path, None if c.modality == "auto" else c.modality)
        return PackRecord(index=index, items=[item], conversations=None, caption=caption.strip(), source=raw,
                          id=self.record_id(raw))
