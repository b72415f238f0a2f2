"""The general sample: text plus 0..N media items, parsed from a WebDataset sample's members.

A :class:`Sample` is a key, a caption and/or a conversation, its media :class:`MediaItem` s in placeholder
order, and the sample's JSON (``meta``). :func:`parse_sample` builds one from a ``vlp.data.tario.RawSample``
(``members`` maps the name after the key to bytes: ``{"mp4": .., "json": .., "txt": ..}``). Rules:

* **Modality** from the member's last extension: ``media.VIDEO_EXTS`` -> video, ``media.IMAGE_EXTS`` -> image,
  ``media.AUDIO_EXTS`` -> audio. A video member named in the JSON's ``"audios"`` list is an audio item: its
  soundtrack (a sample may name one mp4 in both ``"videos"`` and ``"audios"``: the video and its audio).
* **Which members, in which order.** If the JSON has any of ``"images"`` / ``"videos"`` / ``"audios"``
  (lists of member names, as LLaMA-Factory/LLaVA annotations name their media), those lists are the whole
  truth: each names a member (``"0.jpg"``, or ``"<key>.0.jpg"``) or, when it holds a ``/``, a reference (a
  path/URI, kept as ``MediaItem.ref``; resolving it is the decode stage's job); media members not named are
  ignored (listed in ``Sample.ignored``). Otherwise every media member is an item, ordered per modality by
  its numeric prefix: WebDataset's ``key.0.jpg``, ``key.1.jpg`` are members ``0.jpg``, ``1.jpg``; a bare
  ``jpg`` counts as position 0 (so ``jpg`` + ``1.jpg`` is fine, ``jpg`` + ``0.jpg`` is ambiguous: an error).
  A media-looking member with a non-numeric prefix (``thumb.jpg``) is ignored and listed, as before.
* **Placeholders.** ``<image>``/``<video>``/``<audio>`` in the user turns are matched to the items in order,
  per modality: the k-th ``<image>`` is the k-th image item. Items are then ordered as their placeholders
  appear (``MediaItem.index``), which is the order the model splices them in. A conversation with no
  placeholder and exactly one item gets ``<modality>\\n`` prepended to its first user turn (LLaVA's
  convention; caption data relies on it). Any other count mismatch raises ValueError naming the key and the
  counts. Without a conversation (caption data) the items keep their member order: numeric position (or place
  in the JSON's list), then video < image < audio; :meth:`Sample.conversation` writes one placeholder per item.
  :func:`match_placeholders` applies the same rules to rows already made (a conversation + their modalities).
* **Text-only**: no media member is a valid sample (``SampleConfig.text_only``), if it has a caption or a
  conversation without placeholders.
* **Hostile input** is bounded: at most ``max_items`` items, a JSON member of at most ``max_json_bytes``,
  a sample of at most ``max_sample_bytes`` (enforced while reading the tar: ``vlp.data.tario``),
  JSON nested too deeply is a ValueError, not a crash.

Every problem is a ``ValueError(reason)`` (the read stage records it as an error row for the sample).
Imports vlp.config, vlp.data.media (extension lists), vlp.data.conversation, vlp.data.tario; no torch, no Ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

from pydantic import Field

from ..config import Cfg
from .conversation import MAX_PLACEHOLDERS, PLACEHOLDER_RE, caption_conversation, turn_role
from .media import AUDIO_EXTS, IMAGE_EXTS, VIDEO_EXTS
from .tario import MAX_SAMPLE_BYTES, RawSample

Modality = Literal["image", "video", "audio"]
MODALITY_ORDER = ("video", "image", "audio")  # tie-break of the member order across modalities
LIST_KEYS = {"images": "image", "videos": "video", "audios": "audio"}  # JSON keys that name the media
MAX_POSITION_DIGITS = 6  # key.123456.jpg at most: a longer numeric prefix is not a position


class SampleConfig(Cfg):
    """How raw samples become :class:`Sample` s."""

    max_items: int = Field(64, ge=1, le=MAX_PLACEHOLDERS, description="refuse samples with more media items")
    max_json_bytes: int = Field(16 << 20, ge=1, description="refuse a .json member larger than this")
    max_sample_bytes: int = Field(MAX_SAMPLE_BYTES, ge=1, description="refuse a sample whose members read from the "
                                  "shard (media, .json, .txt) add up to more than this; the rest of it is streamed "
                                  "past, not held (members no stage reads are never held)")
    text_only: bool = Field(True, description="keep samples without media as text-only samples; false refuses "
                            "them ('no media member'), as vlp did before text-only samples existed")


@dataclass(frozen=True)
class MediaItem:
    """One media item of a sample: the bytes of a member, or a reference (path/URI) to resolve later."""

    modality: Modality
    name: str  # the member name after the key ("0.jpg", "mp4"), or the reference as written in the JSON
    ext: str  # container extension, lower case ("jpg"); "" for a reference without a known one
    index: int  # position among the sample's items = the order of its placeholder in the conversation
    data: Optional[bytes] = field(default=None, repr=False)
    ref: Optional[str] = None

    def __post_init__(self):
        if (self.data is None) == (self.ref is None):
            raise ValueError("a media item holds either bytes or a reference")


@dataclass
class Sample:
    """Text plus 0..N media items. ``conversations`` (None for caption-only data) holds exactly one
    placeholder per item, in ``items`` order; ``meta`` is the sample's JSON object as read."""

    key: str
    caption: str = ""
    conversations: Optional[list[dict]] = None
    items: list[MediaItem] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # media-looking members not used (see the module doc)

    @property
    def modalities(self) -> list[str]:
        return [it.modality for it in self.items]

    @property
    def text_only(self) -> bool:
        return not self.items

    def conversation(self, fmt: Literal["auto", "caption", "conversation"] = "auto") -> list[dict]:
        """What training tokenises: the conversation, or (``caption``, or ``auto`` without one) the caption as a
        one-turn conversation with one placeholder per item in order. ValueError when the one asked for is absent."""
        if fmt == "conversation" or (fmt == "auto" and self.conversations):
            if not self.conversations:
                raise ValueError(f"sample {self.key!r} has no conversations")
            return [dict(t) for t in self.conversations]
        if not self.caption:
            raise ValueError(f"sample {self.key!r} has no caption")
        return caption_conversation(self.caption, self.modalities)


def modality_of(ext: str) -> Optional[Modality]:
    """``"jpg"``/``"0.jpg"`` -> ``"image"``; ``"mp4"`` -> ``"video"``; ``"wav"`` -> ``"audio"``; else None."""
    e = ext.rsplit(".", 1)[-1].lower()
    if e in VIDEO_EXTS:
        return "video"
    if e in IMAGE_EXTS:
        return "image"
    if e in AUDIO_EXTS:
        return "audio"
    return None


def parse_sample(raw: RawSample, cfg: SampleConfig | None = None) -> Sample:
    """A raw WebDataset sample -> :class:`Sample` (rules in the module doc). Raises ValueError(reason)."""
    cfg = cfg or SampleConfig()
    meta = _read_json(raw, cfg)
    caption = _read_caption(raw, meta)
    conv = _read_conversations(meta)
    if not caption and not conv:
        raise ValueError("missing caption (no .txt member and no caption/conversations in .json)")
    media, ignored = _explicit_media(raw, meta, cfg) if any(k in meta for k in LIST_KEYS) else _member_media(raw)
    n = sum(len(v) for v in media.values())
    if n > cfg.max_items:
        raise ValueError(f"sample {raw.key!r} has {n} media items, over the limit of {cfg.max_items}")
    if n == 0 and not cfg.text_only:
        raise ValueError(f"no media member (sample has: {', '.join(sorted(raw.members)) or 'nothing'})")
    conv, order = _match_placeholders(raw.key, conv, media)
    items = [MediaItem(modality=m, name=name, ext=ext, index=i, data=data, ref=ref)
             for i, (m, (_, name, ext, data, ref)) in enumerate(order)]
    return Sample(key=raw.key, caption=caption, conversations=conv, items=items, meta=meta, ignored=ignored)


def match_placeholders(key: str, conv: list[dict], modalities: Sequence[str]) -> tuple[list[dict], list[int]]:
    """The placeholder rules of :func:`parse_sample` for rows already made (a feature row's ``conversations`` and
    ``modalities``): -> (a copy of the conversation, with ``<m>\\n`` prepended when it has no placeholder and there is
    one item; for each placeholder in order, the index of its item in ``modalities``). ValueError on a mismatch."""
    media: dict[str, list[_Entry]] = {m: [] for m in MODALITY_ORDER}
    for i, m in enumerate(modalities):
        if m not in media:
            raise ValueError(f"sample {key!r}: unknown modality {m!r}")
        media[m].append((i, "", "", b"", None))
    out, order = _match_placeholders(key, [dict(t) for t in conv], media)
    return out, [entry[0] for _, entry in order]


# one media entry before it gets its index: (position, name, ext, data, ref); position = the numeric prefix of
# the member (bare = 0), or the place in the JSON's list
_Entry = tuple[int, str, str, Optional[bytes], Optional[str]]


def _read_json(raw: RawSample, cfg: SampleConfig) -> dict:
    data = raw.members.get("json")
    if data is None:
        return {}
    if len(data) > cfg.max_json_bytes:
        raise ValueError(f"json member is {len(data)} bytes, over the {cfg.max_json_bytes} limit")
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"json member is not valid UTF-8 JSON: {e}") from None
    except RecursionError:  # json nested thousands deep: not a ValueError, would kill the reader
        raise ValueError("json member is nested too deeply to parse") from None
    if not isinstance(meta, dict):
        raise ValueError("json member is not an object")
    return meta


def _read_caption(raw: RawSample, meta: dict) -> str:
    caption = ""
    if "txt" in raw.members:
        try:
            caption = raw.members["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise ValueError(f"caption (.txt) is not valid UTF-8: {e}") from None
    if not caption and isinstance(meta.get("caption"), str):  # no .txt, or a blank one
        caption = meta["caption"].strip()
    return caption


def _read_conversations(meta: dict) -> Optional[list[dict]]:
    conv = meta.get("conversations")
    if conv is None:
        return None
    ok = isinstance(conv, list) and conv and all(
        isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str) for t in conv)
    if not ok:
        raise ValueError("conversations must be a non-empty list of {from, value} objects")
    return [dict(t) for t in conv]  # copies: placeholders may be added, meta stays as read


def _member_media(raw: RawSample) -> tuple[dict[str, list[_Entry]], list[str]]:
    """Implicit order: every media member, per modality by numeric prefix (bare = 0)."""
    found: dict[str, dict[int, str]] = {m: {} for m in MODALITY_ORDER}
    ignored = []
    for name in raw.members:
        m = modality_of(name)
        if m is None:
            continue
        prefix, _, _ = name.rpartition(".")
        if prefix and not (prefix.isascii() and prefix.isdigit() and len(prefix) <= MAX_POSITION_DIGITS):
            ignored.append(name)  # "thumb.jpg": not numbered, so not an item (name it in the json to use it)
            continue
        pos = int(prefix) if prefix else 0
        if pos in found[m]:
            raise ValueError(f"sample {raw.key!r}: media members {found[m][pos]!r} and {name!r} both take {m} "
                             f"position {pos}; number them key.0.ext, key.1.ext or name the order in the json "
                             f"('images'/'videos' lists)")
        found[m][pos] = name
    media = {m: [(pos, n, n.rsplit(".", 1)[-1].lower(), raw.members[n], None) for pos, n in sorted(found[m].items())]
             for m in MODALITY_ORDER}
    return media, sorted(ignored)


def _explicit_media(raw: RawSample, meta: dict, cfg: SampleConfig) -> tuple[dict[str, list[_Entry]], list[str]]:
    """The JSON's images/videos/audios lists, in their order; members they do not name are ignored."""
    media: dict[str, list[_Entry]] = {m: [] for m in MODALITY_ORDER}
    used = set()
    stem = raw.key.rsplit("/", 1)[-1] + "."
    for list_key, modality in LIST_KEYS.items():
        names = meta.get(list_key)
        if names is None:
            continue
        if not isinstance(names, list) or not all(isinstance(x, str) and x for x in names):
            raise ValueError(f"json {list_key!r} must be a list of member names")
        if len(names) > cfg.max_items:
            raise ValueError(f"sample {raw.key!r}: json {list_key!r} names {len(names)} items, over the limit "
                             f"of {cfg.max_items}")
        for pos, x in enumerate(names):
            name = x[len(stem):] if x not in raw.members and x.startswith(stem) else x
            if name in raw.members:
                found = modality_of(name)
                if found != modality and (modality, found) != ("audio", "video"):  # a video's soundtrack is audio
                    raise ValueError(f"json {list_key!r} names member {x!r}, which is not {modality} media")
                media[modality].append((pos, name, name.rsplit(".", 1)[-1].lower(), raw.members[name], None))
                used.add(name)
            elif "/" in x and len(x) <= 4096 and "\x00" not in x:  # a path or URI: resolved by the decode stage
                ext = x.rsplit("/", 1)[-1].rpartition(".")[2].lower()
                ok = (modality, "video") if modality == "audio" else (modality,)  # a video's soundtrack is audio
                media[modality].append((pos, x, ext if modality_of(ext) in ok else "", None, x))
            else:
                have = ", ".join(sorted(raw.members))
                raise ValueError(f"json {list_key!r} names member {x!r}, which the sample lacks (it has: {have})")
    ignored = sorted(n for n in raw.members if modality_of(n) is not None and n not in used)
    return media, ignored


def _match_placeholders(key: str, conv: Optional[list[dict]], media: dict[str, list[_Entry]]
                        ) -> tuple[Optional[list[dict]], list[tuple[str, _Entry]]]:
    """-> (conversation with exactly one placeholder per item, items in placeholder order)."""
    if conv is None:  # caption data: member order, numeric position first, then video < image < audio
        flat = [(m, e) for m in MODALITY_ORDER for e in media[m]]
        return None, sorted(flat, key=lambda me: (me[1][0], MODALITY_ORDER.index(me[0])))
    wanted: list[str] = []
    for t in conv:
        kinds = [mm.group(1) for mm in PLACEHOLDER_RE.finditer(t["value"])]
        if kinds and turn_role(t) != "user":
            raise ValueError(f"sample {key!r}: placeholders may only appear in user turns, not {t['from']!r}")
        wanted += kinds
    n_items = sum(len(v) for v in media.values())
    if not wanted and n_items == 1:  # LLaVA convention: the one item goes before the first user turn's text
        m = next(m for m in MODALITY_ORDER if media[m])
        first = next((i for i, t in enumerate(conv) if turn_role(t) == "user"), None)
        if first is None:
            raise ValueError(f"sample {key!r}: the conversation has no user turn to put the <{m}> placeholder in")
        conv[first]["value"] = f"<{m}>\n" + conv[first]["value"]
        wanted = [m]
    bad = [f"{wanted.count(m)} <{m}> placeholder(s) but {len(media[m])} {m} item(s)"
           for m in MODALITY_ORDER if wanted.count(m) != len(media[m])]
    if bad:
        raise ValueError(f"sample {key!r}: placeholder/media count mismatch: {'; '.join(bad)}")
    nxt = {m: iter(media[m]) for m in MODALITY_ORDER}
    return conv, [(m, next(nxt[m])) for m in wanted]
