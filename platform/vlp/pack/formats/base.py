"""What every annotation format shares: the common record, the format family and the checks formats reuse.

A format is a part class (``vlp.models.parts``): ``AnnotationFormat`` subclass with a nested ``Cfg`` whose
``type`` is a Literal, registered with ``@ANNOTATION_FORMATS.register``; ``{type: llava, ...}`` then validates
against its ``Cfg`` wherever ``ANNOTATION_FORMATS.field`` is used. ``convert(index, raw)`` turns one record
as read from a file (a dict) into a :class:`PackRecord` or raises ``ValueError(reason)``; reading (files,
limits, indices) is ``reader``'s job. Formats never touch media: paths are kept as written.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Sequence

from pydantic import Field

from ...data.conversation import turn_role
from ...data.sample import match_placeholders, modality_of
from ...models.parts import Part, PartCfg, PartRegistry

Modality = Literal["image", "video", "audio"]
FileKind = Literal["json", "jsonl", "csv", "parquet", "lines"]
MAX_PATH_CHARS = 4096


@dataclass
class PackItem:
    """One media item: its path as the annotation names it (relative to the media root, or absolute / a key).
    ``candidates``: other paths to try, in order, when ``path`` does not exist (resolved by the pipeline)."""

    modality: Modality
    path: str
    candidates: list[str] = field(default_factory=list)


@dataclass
class PackRecord:
    """One annotation record in vlp's form. ``conversations`` holds exactly one placeholder per item, items in
    placeholder order; ``source`` is the record as read (goes into the shard's json)."""

    index: int  # running ordinal over all input files (sorted): the shard key comes from it
    items: list[PackItem]
    conversations: Optional[list[dict]]
    caption: Optional[str]
    source: dict
    id: Optional[str] = None  # the record's own id, kept as written (may repeat, may be unsafe for tar keys)
    system: Optional[str] = None  # a system prompt of the record (also the conversation's first turn)
    file: str = ""  # the annotation file it came from
    extra: dict = field(default_factory=dict)  # more keys for the shard's json (e.g. ``grounding``: the truth)


@dataclass
class PackError:
    """A record that cannot be packed: one clear reason. Counted and recorded by the pipeline."""

    index: int
    id: Optional[str]
    reason: str
    file: str = ""


class FormatCfg(PartCfg):
    """Parameters every annotation format has. ``type`` defaults to ``llava`` (so that a config field of this family
    has a default, e.g. for docs); ``vlp pack --format`` always names one."""

    type: str = "llava"
    file_kind: Literal["auto", "json", "jsonl", "csv", "parquet", "lines"] = Field(
        "auto", description="how to read the files; auto = from the extension (.json, .jsonl/.ndjson, .csv, "
                            ".parquet, .txt = lines)")
    max_record_bytes: int = Field(16 << 20, ge=1024, description="a record larger than this is an error")
    max_items: int = Field(64, ge=1, le=1024, description="a record naming more media items is an error")


class AnnotationFormat(Part):
    """Base of a format: ``kinds`` are the file kinds it reads; ``convert`` makes one record."""

    Cfg: ClassVar[type[FormatCfg]] = FormatCfg
    kinds: ClassVar[tuple[str, ...]] = ("json", "jsonl")
    cfg: FormatCfg

    def record_id(self, raw: dict) -> Optional[str]:
        """The record's own id (for error rows too), or None."""
        v = raw.get("id")
        return str(v) if isinstance(v, (str, int)) and not isinstance(v, bool) else None

    def select(self, raw: dict) -> Optional[str]:
        """None to pack the record; else why it is left out (e.g. ``split testA``): such records get no index and
        are counted by reason in the pack manifest's ``filtered``. Default: every record."""
        return None

    def convert(self, index: int, raw: dict) -> PackRecord:  # pragma: no cover - every format overrides it
        raise NotImplementedError


ANNOTATION_FORMATS = PartRegistry("annotation format", FormatCfg)


# ------------------------------------------------------------------------------------------------ shared checks

def need_str(raw: dict, key: str, what: str = "") -> str:
    """``raw[key]`` as a non-blank string, else ValueError naming the field."""
    v = raw.get(key)
    if v is None:
        raise ValueError(f"missing {what or repr(key)}")
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{what or repr(key)} must be a non-empty string, got {kind_of(v)}")
    return v


def check_path(p: Any, what: str) -> str:
    """A media path as written: a non-empty string without NUL, at most MAX_PATH_CHARS."""
    if not isinstance(p, str) or not p.strip():
        raise ValueError(f"{what} must be a non-empty string (a media path), got {kind_of(p)}")
    if len(p) > MAX_PATH_CHARS or "\x00" in p:
        raise ValueError(f"{what} is not a usable path ({len(p)} characters{', holds NUL' if chr(0) in p else ''})")
    return p


def path_list(raw: dict, key: str, max_items: int) -> list[str]:
    """``raw[key]``: absent -> [], a string -> [it], a list of strings -> it; else ValueError."""
    v = raw.get(key)
    if v is None:
        return []
    vals = [v] if isinstance(v, str) else v
    if not isinstance(vals, list):
        raise ValueError(f"{key!r} must be a path or a list of paths, got {kind_of(v)}")
    if len(vals) > max_items:
        raise ValueError(f"{key!r} names {len(vals)} media items, over the limit of {max_items}")
    return [check_path(p, f"{key!r} entry") for p in vals]


def record_turns(raw: dict) -> list[dict]:
    """The record's ``conversations`` after :func:`check_turns`; ValueError when it has none."""
    if "conversations" not in raw:
        raise ValueError("missing 'conversations'")
    return check_turns(raw["conversations"])


def check_turns(conv: Any, what: str = "conversations") -> list[dict]:
    """A copy of ``[{from, value}, ...]`` after vlp's turn rules: string roles and values, an optional system
    turn first, then user/assistant alternating from a user turn. ValueError(reason) otherwise."""
    if not isinstance(conv, list) or not conv:
        raise ValueError(f"{what} must be a non-empty list of turns, got {kind_of(conv)}")
    out = []
    for i, t in enumerate(conv):
        if not (isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)):
            raise ValueError(f"{what}[{i}] must be an object with string 'from' and 'value'")
        out.append({"from": t["from"], "value": t["value"]})
    roles = [turn_role(t) for t in out]  # ValueError for an unknown role
    body = roles[1:] if roles[0] == "system" else roles
    if not body or "system" in body:
        raise ValueError(f"{what}: a system turn may only come first, before a user turn")
    bad = next((i for i, r in enumerate(body) if r != ("user", "assistant")[i % 2]), None)
    if bad is not None:
        raise ValueError(f"{what}: turns must alternate user/assistant starting with a user turn "
                         f"(turn {bad + len(roles) - len(body)} is {out[bad + len(roles) - len(body)]['from']!r})")
    return out


def placed(key: str, conv: list[dict], items: Sequence[PackItem]) -> tuple[list[dict], list[PackItem]]:
    """vlp's placeholder rules (``vlp.data.sample.match_placeholders``): the conversation with one placeholder per
    item (one item without one gets it prepended), the items in placeholder order. ValueError on a mismatch."""
    conv, order = match_placeholders(key, conv, [it.modality for it in items])
    return conv, [items[i] for i in order]


def item_for(path: str, modality: Optional[str]) -> PackItem:
    """A PackItem; without ``modality`` it comes from the path's extension (ValueError when unknown)."""
    m = modality or modality_of(path.rsplit("/", 1)[-1].rpartition(".")[2] or "-")
    if m is None:
        raise ValueError(f"cannot tell the modality of {path!r} from its extension; set the format's modality")
    return PackItem(modality=m, path=path)


def pattern_fields(pattern: str) -> list[str]:
    """The field names of a ``{name}`` pattern; ValueError for anything but plain names (no ``{a.b}``, ``{a[0]}``,
    no positional ``{}``)."""
    names = []
    for _, name, spec, conv in string.Formatter().parse(pattern):
        if name is None:
            continue
        if not name.isidentifier() or spec or conv:
            raise ValueError(f"pattern {pattern!r}: fields must be plain {{name}}s, got {{{name}}}")
        names.append(name)
    return names


def fill(pattern: str, values: dict) -> str:
    """``pattern`` with each ``{name}`` replaced by ``values[name]`` (a string or an integer)."""
    out = {}
    for name in pattern_fields(pattern):
        v = values.get(name)
        if isinstance(v, float) and v.is_integer():  # parquet/JSON numbers read as floats
            v = int(v)
        if not isinstance(v, (str, int)) or isinstance(v, bool) or v == "":
            raise ValueError(f"field {name!r} (for the path pattern {pattern!r}) is missing or not a string/number, "
                             f"got {kind_of(v)}")
        out[name] = v
    return pattern.format(**out)


def kind_of(v: Any) -> str:
    return "nothing" if v is None else ("an empty string" if v == "" else f"a {type(v).__name__}")


def conversation_record(index: int, raw: dict, rid: Optional[str], conv: list[dict], items: list[PackItem],
                        system: Optional[str] = None) -> PackRecord:
    """A conversation record: placeholders matched to ``items`` (:func:`placed`), ``raw`` kept as the source."""
    conv, ordered = placed(rid if rid is not None else f"#{index}", conv, items)
    return PackRecord(index=index, items=ordered, conversations=conv, caption=None, source=raw, id=rid,
                      system=system)
