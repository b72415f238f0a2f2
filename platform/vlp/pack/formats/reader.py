"""Streaming, bounded reading of annotation files, local or on S3, and the running record index.

* **JSON** (``.json``): one top-level array, streamed with ijson's event parser; each element is built on its
  own and dropped (an error) as soon as it grows past ``max_record_bytes``, so memory holds one record at most,
  never the file. A single string/number token over 4 x ``max_record_bytes`` (which the parser would hold whole)
  and a syntax error end that file with one error (the rest of a broken array cannot be found); reading goes on
  with the next file.
* **JSON Lines** (``.jsonl``/``.ndjson``): line by line from fixed-size reads; a line over the limit is skipped to
  its newline (an error), a line that is not JSON is an error, blank lines are not records.
* **CSV** (``.csv``, ``.tsv`` tab-separated): the csv module over the same bounded lines; the first row is the
  header; a row whose field count differs from the header's is an error.
* **Parquet** (``.parquet``): ``ParquetFile.iter_batches`` (a batch of rows at a time).
* **Text lines** (``.txt``): each non-blank line is a record ``{"line": text, "line_no": n}`` (Charades-STA's
  ``VIDEOID start end##sentence`` lines), bounded like JSON Lines.

:func:`read_annotations` reads files in sorted order and numbers every record and every error with one running
``index`` (deterministic across runs: it names the shard key). Bad input is a :class:`PackError`; user mistakes
(no file matches, an extension no reader knows) are :class:`AnnotationFileError` s, raised before anything is read.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import ijson

from ...errors import UserError
from ...storage import StorageConfig, StorageError, describe_storage_error, get_fs, is_remote
from .base import ANNOTATION_FORMATS, AnnotationFormat, FormatCfg, PackError, PackRecord, kind_of

KIND_OF_EXT = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv",
               ".parquet": "parquet", ".txt": "lines"}
FOLDER_EXTS = {e for e in KIND_OF_EXT if e != ".txt"}  # a folder's notes and READMEs are no annotations
READ_CHUNK = 1 << 20
EVENT_BYTES = 16  # what one JSON event counts toward max_record_bytes besides its text (bounds deep nesting)
TOKEN_FACTOR = 4  # a JSON token over TOKEN_FACTOR * max_record_bytes stops its file (TokenGuard)


class AnnotationFileError(UserError, ValueError):
    """An annotation file that cannot be read as asked (unknown extension, a kind the format does not read)."""


class AnnotationsNotFound(UserError, FileNotFoundError):
    """``--annotations`` matched no file."""


@dataclass
class BadRecord:
    """A record a reader could not produce (too large, not JSON, ...): becomes a PackError."""

    reason: str


def expand_annotations(patterns: str | list[str], storage: StorageConfig | None = None) -> list[str]:
    """Sorted, de-duplicated annotation files for a path, a glob (``data/*.json``, ``s3://b/ann/*.jsonl``) or a
    folder (its files with a known extension), local or on S3. Matching nothing is an AnnotationsNotFound naming
    the pattern."""
    out: set[str] = set()
    for pat in [patterns] if isinstance(patterns, str) else patterns:
        fs, path = get_fs(pat, storage)
        try:
            if any(c in path for c in "*?["):
                found = [p for p, d in fs.glob(path, detail=True).items() if d.get("type") == "file"]
                why = "the glob matched no file"
            elif fs.isdir(path):
                found = [p for p in fs.find(path) if os.path.splitext(p)[1].lower() in FOLDER_EXTS]
                why = f"the folder holds no {'/'.join(sorted(FOLDER_EXTS))} file (.txt files: name them)"
            else:
                found, why = ([path] if fs.exists(path) else []), "no such file"
        except Exception as e:  # OSError, botocore errors
            raise StorageError(describe_storage_error(pat, e)) from e
        if not found:
            raise AnnotationsNotFound(f"--annotations {pat}: {why}")
        proto = pat.split("://", 1)[0] + "://" if is_remote(pat) else ""
        out.update(p if not proto or p.startswith(proto) else proto + p for p in found)
    return sorted(out)


def file_kind(path: str, cfg: FormatCfg, fmt: AnnotationFormat) -> str:
    """The reader for ``path``: the format's ``file_kind``, or from the extension. AnnotationFileError when no
    reader fits or the format does not read that kind."""
    kind = cfg.file_kind
    if kind == "auto":
        kind = KIND_OF_EXT.get(os.path.splitext(path)[1].lower(), "")
        if not kind:
            raise AnnotationFileError(f"annotation file {path}: unknown extension; name it .json, .jsonl, .csv, "
                                      ".parquet or .txt, or set the format's file_kind")
    if kind not in fmt.kinds:
        raise AnnotationFileError(f"annotation file {path}: format {cfg.type!r} reads {'/'.join(fmt.kinds)} files, "
                                  f"not {kind}")
    return kind


def read_annotations(fmt_cfg: FormatCfg | dict, paths: Iterable[str], storage: StorageConfig | None = None,
                     filtered: Optional[Counter] = None) -> Iterator[PackRecord | PackError]:
    """Every record of every file (sorted order) as a PackRecord, or a PackError for a bad one; ``index`` runs over
    all files. Records the format's ``select`` leaves out (e.g. another split) get no index and are counted in
    ``filtered`` by reason. File problems a user must fix raise here, before the first record."""
    fmt = ANNOTATION_FORMATS.part(fmt_cfg)
    files = sorted(set(paths))
    kinds = [file_kind(p, fmt.cfg, fmt) for p in files]
    return _records(fmt, list(zip(files, kinds)), storage, Counter() if filtered is None else filtered)


def _records(fmt: AnnotationFormat, files: list[tuple[str, str]], storage: StorageConfig | None,
             filtered: Counter) -> Iterator[PackRecord | PackError]:
    index = 0
    for path, kind in files:
        for raw in raw_records(path, kind, fmt.cfg.max_record_bytes, storage):
            left_out = fmt.select(raw) if isinstance(raw, dict) else None
            if left_out:
                filtered[left_out] += 1
                continue
            yield _convert(fmt, index, raw, path)
            index += 1


def _convert(fmt: AnnotationFormat, index: int, raw: Any, path: str) -> PackRecord | PackError:
    if isinstance(raw, BadRecord):
        return PackError(index, None, raw.reason, path)
    if not isinstance(raw, dict):
        return PackError(index, None, f"record is {kind_of(raw)}, not an object", path)
    rid = fmt.record_id(raw)
    try:
        rec = fmt.convert(index, raw)
    except (ValueError, RecursionError) as e:
        return PackError(index, rid, str(e) or type(e).__name__, path)
    rec.file = path
    return rec


def raw_records(path: str, kind: str, limit: int, storage: StorageConfig | None = None) -> Iterator[Any]:
    """The records of one file as read (dicts, other JSON values, or BadRecord)."""
    fs, p = get_fs(path, storage)
    try:
        with fs.open(p, "rb") as f:
            reader = tsv_rows if kind == "csv" and path.lower().endswith(".tsv") else _READERS[kind]
            yield from reader(f, limit)
    except OSError as e:
        raise StorageError(describe_storage_error(path, e)) from e


def json_array(f, limit: int) -> Iterator[Any]:
    """Elements of a top-level JSON array, one at a time (see the module doc)."""
    guarded = TokenGuard(f, TOKEN_FACTOR * limit)
    events = ijson.basic_parse(guarded, use_float=True)
    try:
        first = next(events, None)
        if first is None or first[0] != "start_array":
            yield BadRecord("the file is " + ("empty" if first is None else "not a JSON array") +
                            " (these annotation files hold one [...] of records)")
            return
        yield from _array_elements(events, limit)
    except TokenTooLong as e:
        yield BadRecord(str(e))
    except (ijson.JSONError, UnicodeDecodeError, ValueError) as e:
        yield BadRecord(f"the file is not valid JSON from here on ({e}); the rest of the file is skipped")


class TokenTooLong(Exception):
    """A stretch of a JSON file longer than the record limit holds no (unescaped) quote: one string or number
    token that big would be buffered whole by the parser, so reading that file stops there."""


class TokenGuard:
    """File wrapper for the JSON parser: the parser holds a whole token (a string) in memory, however big, so
    this counts the bytes since the last unescaped ``"`` and raises TokenTooLong past ``max_token``. A record
    over max_record_bytes whose tokens are smaller is the element builder's to refuse (the file goes on)."""

    def __init__(self, f, max_token: int):
        self.f, self.limit, self.run, self.pos, self.prev_backslash = f, max_token, 0, 0, False

    def read(self, n: int = -1) -> bytes:
        # reads are at most max_token bytes, so a quote-free stretch over max_token must touch a read's start
        # or end: only the first and the last unescaped quote of each read need finding
        data = self.f.read(min(READ_CHUNK if n is None or n < 0 else n, self.limit))
        first, last = self.quote(data, True), self.quote(data, False)
        head = self.run + (len(data) if first < 0 else first)
        self.run = self.run + len(data) if last < 0 else len(data) - last - 1
        self.pos += len(data)
        self.prev_backslash = data[-1:] == b"\\"
        if max(head, self.run) > self.limit:
            raise TokenTooLong(f"the file holds a string or number of over {self.limit} bytes (4 x max_record_bytes) "
                               f"before byte {self.pos}; the rest of the file is skipped")
        return data

    def quote(self, data: bytes, first: bool) -> int:
        """Position of the first/last ``"`` not preceded by a backslash (``\\\\"`` counts as escaped: a longer run,
        never a shorter one), -1 if none."""
        i = data.find(b'"') if first else data.rfind(b'"')
        while i >= 0 and (data[i - 1:i] == b"\\" if i else self.prev_backslash):
            i = data.find(b'"', i + 1) if first else data.rfind(b'"', 0, i)
        return i


def _array_elements(events, limit: int) -> Iterator[Any]:
    opening, closing = ("start_map", "start_array"), ("end_map", "end_array")
    for event, value in events:
        if event == "end_array":
            return
        if event not in opening:
            yield value  # a scalar element: the format turns it into an error
            continue
        builder = ijson.ObjectBuilder()
        build = builder.event
        build(event, value)
        depth, size = 1, EVENT_BYTES
        for event, value in events:  # the hot loop: one pass per JSON event, kept lean
            size += EVENT_BYTES + len(value) if value.__class__ is str else EVENT_BYTES
            if size <= limit:
                build(event, value)
            if event in opening:
                depth += 1
            elif event in closing:
                depth -= 1
                if depth == 0:
                    break
        # past the limit nothing more was built: what was is dropped, the element is skipped to its end
        yield builder.value if size <= limit else BadRecord(f"record is over max_record_bytes ({limit} bytes)")


def bounded_lines(f, limit: int) -> Iterator[bytes | BadRecord]:
    """Lines (with their newline) from fixed-size reads; a line over ``limit`` bytes is one BadRecord and is
    skipped to its newline without being held."""
    buf, skipping = b"", False
    while True:
        data = f.read(READ_CHUNK)
        buf += data
        pos = 0
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                break
            if skipping:
                skipping = False
            elif nl + 1 - pos > limit + 1:
                yield BadRecord(f"line is over max_record_bytes ({limit} bytes)")
            else:
                yield buf[pos:nl + 1]
            pos = nl + 1
        buf = buf[pos:]
        if len(buf) > limit:
            if not skipping:
                yield BadRecord(f"line is over max_record_bytes ({limit} bytes)")
            buf, skipping = b"", True
        if not data:
            if buf and not skipping:
                yield buf  # the last line, without a newline
            return


def json_lines(f, limit: int) -> Iterator[Any]:
    """One JSON value per line; blank lines are not records."""
    for line in bounded_lines(f, limit):
        if isinstance(line, BadRecord):
            yield line
        elif line.strip():
            yield parse_json_line(line)


def parse_json_line(line: bytes) -> Any:
    """A line's JSON value, or a BadRecord saying why not."""
    try:
        return json.loads(line.decode("utf-8"))
    except RecursionError:
        return BadRecord("line is JSON nested too deeply to read")
    except UnicodeDecodeError as e:
        return BadRecord(f"line is not valid UTF-8 ({e})")
    except ValueError as e:
        return BadRecord(f"line is not JSON ({e}): {line[:80]!r}")


def csv_rows(f, limit: int, delimiter: str = ",") -> Iterator[Any]:
    """Rows as {header: value} dicts (the first row is the header)."""
    pending: list[str] = []

    def text_lines() -> Iterator[str]:
        for i, line in enumerate(bounded_lines(f, limit)):
            if isinstance(line, BadRecord):
                pending.append(line.reason)
                yield "\n"  # a blank line in its place: the row becomes this error, not a silent drop
                continue
            try:
                yield line.decode("utf-8-sig" if i == 0 else "utf-8")
            except UnicodeDecodeError as e:
                pending.append(f"row is not valid UTF-8 ({e})")
                yield "\n"

    reader = csv.reader(text_lines(), delimiter=delimiter)
    header: Optional[list[str]] = None
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield BadRecord(f"row is not valid CSV ({e})")
            continue
        if pending:
            yield BadRecord(pending.pop(0))
        elif header is None:
            header = row
        elif row and len(row) != len(header):
            yield BadRecord(f"row has {len(row)} fields, the header has {len(header)}")
        elif row:
            yield dict(zip(header, row))


def text_lines(f, limit: int) -> Iterator[Any]:
    """Non-blank lines as ``{"line", "line_no"}`` records (1-based line numbers, blank lines counted)."""
    for n, line in enumerate(bounded_lines(f, limit), 1):
        if isinstance(line, BadRecord):
            yield line
            continue
        try:
            text = line.decode("utf-8-sig" if n == 1 else "utf-8").strip()
        except UnicodeDecodeError as e:
            yield BadRecord(f"line {n} is not valid UTF-8 ({e})")
            continue
        if text:
            yield {"line": text, "line_no": n}


def tsv_rows(f, limit: int) -> Iterator[Any]:
    return csv_rows(f, limit, "\t")


def parquet_rows(f, limit: int) -> Iterator[Any]:
    """Rows of a Parquet file, a batch at a time; values made JSON-safe (dates as ISO strings)."""
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(f).iter_batches(batch_size=256)
        for batch in batches:
            for row in batch.to_pylist():
                text = json.dumps(row, default=str, ensure_ascii=False)
                yield BadRecord(f"record is over max_record_bytes ({limit} bytes)") if len(text) > limit \
                    else json.loads(text)
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        yield BadRecord(f"the file is not readable Parquet ({e}); the rest of the file is skipped")


_READERS = {"json": json_array, "jsonl": json_lines, "csv": csv_rows, "parquet": parquet_rows, "lines": text_lines}
