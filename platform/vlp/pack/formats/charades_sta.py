"""Charades-STA (Gao et al., TALL, ICCV 2017): temporal sentence grounding, one query per line of
``charades_sta_train.txt`` / ``charades_sta_test.txt``: ``VIDEOID START END##SENTENCE`` (times in seconds), e.g.
``AO8RW 0.0 6.9##a person is putting a book on a shelf.``. The clip lengths come from Charades' own csv
(``Charades_v1_train.csv`` / ``Charades_v1_test.csv``: columns ``id`` ... ``length``, seconds), named by
``durations``; the clips are Charades' ``{VIDEOID}.mp4`` (``Charades_v1_480``).

Each line becomes one sample: the clip, a one-turn conversation (``question`` with the sentence, then the span as
text in ``span``'s format, :mod:`vlp.data.grounding`) and, in the shard's json, the truth for scoring:
``grounding = {task: temporal_grounding, span: [start, end] (seconds), duration, query, format}`` (``format``: the
span format, which evaluation reads answers with); precompute carries it into the feature rows' ``meta``.

Errors (one per line): not ``ID START END##SENTENCE``; START/END not numbers; END <= START; a START past the clip's
length (an END past it is clipped to it, as Charades-STA has ends a little past some clips); a video without a
length in ``durations`` (when spans are written relative to it).
"""

from __future__ import annotations

import csv
import io
import re
from typing import Literal, Optional

from pydantic import Field

from ...data.grounding import SpanFormat, span_to_text
from ...errors import UserError
from ...storage import StorageError, describe_storage_error, get_fs
from .base import ANNOTATION_FORMATS, AnnotationFormat, FormatCfg, PackItem, PackRecord, check_path, fill

LINE = re.compile(r"^(\S+)\s+(\S+)\s+(\S+)\s*##(.+)$")
MAX_DURATIONS_BYTES = 64 << 20


class DurationsError(UserError):
    """The clip-length csv cannot be read (missing, too large, without ``id``/``length`` columns)."""


def read_durations(uri: str) -> dict[str, float]:
    """{video id: length in seconds} from a Charades csv (local or a URL); rows without a number are left out."""
    fs, path = get_fs(uri)
    try:
        with fs.open(path, "rb") as f:
            data = f.read(MAX_DURATIONS_BYTES + 1)
    except OSError as e:
        raise StorageError(describe_storage_error(uri, e)) from e
    if len(data) > MAX_DURATIONS_BYTES:
        raise DurationsError(f"durations {uri}: over {MAX_DURATIONS_BYTES >> 20} MB; is it Charades' csv?")
    rows = csv.DictReader(io.StringIO(data.decode("utf-8-sig", errors="replace")))
    if not rows.fieldnames or not {"id", "length"} <= set(rows.fieldnames):
        raise DurationsError(f"durations {uri}: needs the columns id and length (Charades_v1_*.csv), has "
                             f"{rows.fieldnames}")
    out = {}
    for r in rows:
        try:
            out[r["id"]] = float(r["length"])
        except (TypeError, ValueError):
            continue
    return out


@ANNOTATION_FORMATS.register
class CharadesSTAFormat(AnnotationFormat):
    """Charades-STA lines (see the module doc)."""

    kinds = ("lines",)

    class Cfg(FormatCfg):
        type: Literal["charades_sta"] = "charades_sta"
        durations: Optional[str] = Field(None, description="Charades' csv with the clip lengths (id, ..., length); "
                                         "needed for span.unit relative")
        question: str = Field('When does "{sentence}" happen in the video?', description="the human turn after "
                              "the <video> placeholder; {sentence} is the line's query")
        span: SpanFormat = SpanFormat()
        video_pattern: str = Field("{video_id}.{ext}", description="the clip's path ({video_id}, {ext})")
        extensions: list[str] = Field(["mp4"], min_length=1, description="candidate extensions")

    cfg: Cfg

    def __init__(self, cfg):
        super().__init__(cfg)
        self._lengths: Optional[dict[str, float]] = None

    def lengths(self) -> dict[str, float]:
        if self._lengths is None:
            self._lengths = read_durations(self.cfg.durations) if self.cfg.durations else {}
        return self._lengths

    def record_id(self, raw: dict):
        m = LINE.match(str(raw.get("line", "")))
        return m.group(1) if m else None

    def convert(self, index: int, raw: dict) -> PackRecord:
        vid, start, end, sentence = self.parse(raw)
        duration = self.lengths().get(vid)
        if duration is None and self.cfg.span.unit == "relative":
            raise ValueError(f"no length for video {vid} in durations ({self.cfg.durations or 'not set'}); relative "
                             "spans need it")
        if duration is not None:
            if start >= duration:
                raise ValueError(f"span starts at {start} s, past the clip's {duration} s")
            end = min(end, duration)
        text = span_to_text((start, end), duration or end, self.cfg.span)
        conv = [{"from": "human", "value": "<video>\n" + self.cfg.question.format(sentence=sentence)},
                {"from": "gpt", "value": text}]
        exts = [e.lstrip(".") for e in self.cfg.extensions] if "{ext}" in self.cfg.video_pattern else [""]
        paths = list(dict.fromkeys(check_path(fill(self.cfg.video_pattern, {"video_id": vid, "ext": e}), "video path")
                                   for e in exts))
        truth = {"task": "temporal_grounding", "span": [start, end], "duration": duration, "query": sentence,
                 "format": self.cfg.span.model_dump()}  # how answers are written: evaluation reads them the same way
        return PackRecord(index=index, items=[PackItem("video", paths[0], paths[1:])], conversations=conv,
                          caption=None, source=raw, id=vid, extra={"grounding": truth})

    @staticmethod
    def parse(raw: dict) -> tuple[str, float, float, str]:
        line = str(raw.get("line", ""))
        m = LINE.match(line)
        if m is None:
            raise ValueError(f"line {raw.get('line_no')}: not 'VIDEOID START END##SENTENCE': {line[:80]!r}")
        try:
            start, end = float(m.group(2)), float(m.group(3))
        except ValueError:
            raise ValueError(f"line {raw.get('line_no')}: start/end are not numbers: {line[:80]!r}") from None
        if not (0 <= start < end):
            raise ValueError(f"line {raw.get('line_no')}: span {start}-{end} is empty, reversed or negative")
        return m.group(1), start, end, m.group(4).strip()
