"""The feature-set format: its layout, typed records (fingerprint, shard commit, manifest) and readers.
May import: storage, errors, formats.records (and vlp.data.sample, in the /1 lift: no torch, no Ray).

Layout under the output URI (:class:`FeatureSetLayout` names every path; nothing else spells them)::

    fingerprint.json        what the features depend on (encoder, weights hash, layer, mode, sampling...)
    config.yaml             the resolved config of the latest run
    parts/<shard>/<id>.parquet   feature rows (invisible until committed)
    errors/<shard>/<id>.jsonl    error records (idem)
    shards/<shard>.json     commit marker of one input shard: its parts, errors and counts
    manifest.json           written at the end of a run: format, inputs, per-shard counts, encoder, config
    errors.jsonl            every error record of the committed shards
    summary.json            throughput and timings of the latest run

A reader trusts only ``shards/*.json``: a run killed at any moment leaves parts that no marker lists,
and the next run deletes and redoes those shards. ``manifest.json`` carries the format version
(:data:`FEATURES_FORMAT`); readers refuse a feature set whose manifest names another (newer or unknown) one,
and read one without a manifest (never completed) or without a ``format`` key (the first version, /1).
``vlp-features/1`` has one media item per row (``features`` binary, ``shape`` list<int32>, ...);
``vlp-features/2`` has one row per sample with 0..N items: ``modalities``/``items`` list<string>, ``features``
list<binary>, ``shape`` list<list<int32>>, ``timestamps`` list<list<float32>>, ``num_frames``/``n_source_frames``
list<int32>, ``media_type`` the one modality / ``text`` / ``mixed`` (docs/architecture.md, "The general sample").
``vlp-features/3`` is the /2 layout for a set made with an audio tower: its rows may hold audio items, whose blocks
are (segments, tokens, D_a) and skip the pooler; a reader that knows no audio would take them for video frames, so
it must refuse the set. Sets without an audio tower are still written as /2. ``vlp-features/4`` is the /2 layout
written with ``output.mode: pixels``: its vision blocks are uint8 frames (T, 3, S, S), not fp16 features (audio
items, if any, as in /3); a reader that decodes every block as fp16 must refuse it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np

from ..storage import StorageConfig, get_fs, join, read_bytes, write_atomic
from .records import Record, RecordError, format_problem, parse_json

FEATURES_FORMAT = "vlp-features/2"  # what precompute writes: one row per sample, per-item list columns
FEATURES_AUDIO = "vlp-features/3"  # the /2 layout with audio items (a set made with an audio tower)
FEATURES_PIXELS = "vlp-features/4"  # the /2 layout holding uint8 frames (output.mode pixels), audio items allowed
FEATURES_V1 = "vlp-features/1"  # one media item per row; read by lifting its rows to the /2 shape
READ_FORMATS = (FEATURES_V1, FEATURES_FORMAT, FEATURES_AUDIO, FEATURES_PIXELS)  # what the readers read


def features_format(has_audio: bool, mode: str = "valley_pooled") -> str:
    """The format precompute writes: /4 for pixels, /3 for a set made with an audio tower, else /2."""
    if mode == "pixels":
        return FEATURES_PIXELS
    return FEATURES_AUDIO if has_audio else FEATURES_FORMAT


class FeatureSetFormatError(RecordError):
    """A feature set written in a format this vlp does not read; the message says how to rebuild it."""


# ------------------------------------------------------------------------------------------------ layout

class FeatureSetLayout:
    """Every path of one feature set: relative names (what commit markers store) and full URIs."""

    FINGERPRINT = "fingerprint.json"
    CONFIG = "config.yaml"
    PARTS = "parts"
    ERROR_PARTS = "errors"
    SHARDS = "shards"
    MANIFEST = "manifest.json"
    ERRORS = "errors.jsonl"
    SUMMARY = "summary.json"

    def __init__(self, uri: str, storage: StorageConfig | None = None):
        self.uri, self.storage = uri, storage

    def __repr__(self) -> str:
        return f"FeatureSetLayout({self.uri!r})"

    @staticmethod
    def part(shard: str, part_id: str) -> str:
        return f"{FeatureSetLayout.PARTS}/{shard}/{part_id}.parquet"

    @staticmethod
    def error_part(shard: str, part_id: str) -> str:
        return f"{FeatureSetLayout.ERROR_PARTS}/{shard}/{part_id}.jsonl"

    @staticmethod
    def shard_marker(shard: str) -> str:
        return f"{FeatureSetLayout.SHARDS}/{shard}.json"

    @staticmethod
    def shard_folders(shard: str) -> list[str]:
        """The folders of one shard's parts and error parts (deleted before the shard is redone)."""
        return [f"{FeatureSetLayout.PARTS}/{shard}", f"{FeatureSetLayout.ERROR_PARTS}/{shard}"]

    def uri_of(self, rel: str) -> str:
        return join(self.uri, rel)

    def fs(self):
        """(filesystem, root path within it)."""
        return get_fs(self.uri, self.storage)

    def exists(self, rel: str) -> bool:
        fs, root = self.fs()
        return fs.exists(join(root, rel))

    def is_feature_set(self) -> bool:
        """Whether the folder holds a feature set (finished or not)."""
        return self.exists(self.FINGERPRINT) or self.exists(self.MANIFEST)

    def read(self, rel: str) -> Optional[bytes]:
        return read_bytes(self.uri_of(rel), self.storage)

    def write(self, rel: str, data: bytes | str) -> None:
        write_atomic(self.uri_of(rel), data, self.storage)

    def remove(self, rel: str = "") -> None:
        """Delete ``rel`` (a folder, recursively; "" = the whole feature set) when it exists."""
        fs, root = self.fs()
        path = join(root, rel) if rel else root
        if fs.exists(path):
            fs.rm(path, recursive=True)

    def files(self, rel: str) -> list[str]:
        """Every file under the folder ``rel``, relative to the set (one listing, paginated on object stores)."""
        fs, root = self.fs()
        base = join(root, rel)
        if not fs.exists(base):
            return []
        return sorted(f"{rel}/{p[len(base):].lstrip('/')}" for p in fs.find(base))

    def marker_uris(self) -> list[str]:
        fs, root = self.fs()
        d = join(root, self.SHARDS)
        if not fs.exists(d):
            return []
        return sorted(p for p in fs.ls(d, detail=False) if p.endswith(".json"))


def _layout(uri: str | FeatureSetLayout, storage: StorageConfig | None) -> FeatureSetLayout:
    return uri if isinstance(uri, FeatureSetLayout) else FeatureSetLayout(uri, storage)


# ------------------------------------------------------------------------------------------------ records

class EncoderInfo(Record):
    """The frozen tower the features come from (fingerprint, manifest and export info ``encoder``)."""

    type: str
    path: str
    weights_sha256: Optional[str] = None
    layer: int
    hidden_size: int
    image_size: int


class AudioEncoderInfo(Record):
    """The frozen audio tower audio items' features come from, and how their audio was cut (``decode``: the
    ``data.audio`` config). Absent from sets made without one (fingerprint, manifest and export ``audio``)."""

    type: str
    path: str
    weights_sha256: Optional[str] = None
    layer: int
    hidden_size: int
    tokens_per_segment: int
    num_mel_bins: int
    max_length: int
    decode: dict[str, Any] = {}


class PreprocessInfo(Record):
    """Geometry and normalisation actually used (resolved: never None in what precompute writes)."""

    size: Optional[int] = None
    pad_to_square: bool = False
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    resampler: Optional[str] = None


class Fingerprint(Record):
    """``fingerprint.json``: what the features depend on; a resume with another fingerprint is refused."""

    encoder: EncoderInfo
    mode: str
    sampling: dict[str, Any]
    preprocess: Optional[PreprocessInfo] = None  # absent in sets made before it was recorded
    sample: Optional[dict[str, Any]] = None  # the SampleConfig (which samples are kept); absent before /2
    audio: Optional[AudioEncoderInfo] = None  # set only when precompute had an audio tower

    @classmethod
    def read(cls, layout: FeatureSetLayout) -> Optional["Fingerprint"]:
        data = layout.read(layout.FINGERPRINT)
        return None if data is None else cls.from_bytes(data, layout.uri_of(layout.FINGERPRINT))

    def write(self, layout: FeatureSetLayout) -> None:
        layout.write(layout.FINGERPRINT, self.to_bytes())

    def differences(self, other: "Fingerprint") -> list[str]:
        """Top-level keys whose values differ (as written), sorted."""
        a, b = self.to_json(), other.to_json()
        return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


class ShardCounts(Record):
    """One shard's counts, as the manifest lists them."""

    n_ok: int
    n_err: int
    expected: Optional[int] = None
    frames: int = 0
    media: dict[str, int] = {}  # samples by media_type (/2: a modality, "text" or "mixed")
    items: dict[str, int] = {}  # media items by modality (absent before /2)
    ignored_members: dict[str, int] = {}


class ShardCommit(Record):
    """``shards/<shard>.json``: the commit marker of one input shard (its parts, error parts and counts)."""

    shard: str
    parts: list[str] = []
    errors: list[str] = []
    n_ok: int
    n_err: int
    expected: Optional[int] = None
    frames: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    media: dict[str, int] = {}
    items: dict[str, int] = {}
    ignored_members: dict[str, int] = {}
    committed_at: Optional[float] = None

    def write(self, layout: FeatureSetLayout) -> None:
        layout.write(layout.shard_marker(self.shard), self.to_bytes())

    @classmethod
    def read_all(cls, layout: FeatureSetLayout) -> dict[str, "ShardCommit"]:
        """{shard name: commit} of every shard whose marker exists."""
        fs, _ = layout.fs()
        out = {}
        for p in layout.marker_uris():
            with fs.open(p, "rb") as f:
                rec = cls.from_bytes(f.read(), p)
            out[rec.shard] = rec
        return out

    def counts(self) -> ShardCounts:
        items = {"items": self.items} if "items" in self.model_fields_set else {}  # absent in /1 commits
        return ShardCounts(n_ok=self.n_ok, n_err=self.n_err, expected=self.expected, frames=self.frames,
                           media=self.media, ignored_members=self.ignored_members, **items)


class Totals(Record):
    samples_ok: int
    samples_failed: int = 0
    samples_text: int = 0  # text-only samples (counted in samples_ok)
    items_by_modality: dict[str, int] = {}


class Manifest(Record):
    """``manifest.json``: written when a run completes; ``format`` is the layout version (absent = the first)."""

    format: Optional[str] = None
    vlp_version: Optional[str] = None
    created_at: Optional[float] = None
    host: Optional[str] = None
    inputs: list[str] = []
    shard_names: dict[str, str] = {}
    shards: dict[str, ShardCounts] = {}
    encoder: Optional[EncoderInfo] = None
    audio: Optional[AudioEncoderInfo] = None
    layer: Optional[int] = None
    mode: Optional[str] = None
    sampling: Optional[dict[str, Any]] = None
    preprocess: Optional[PreprocessInfo] = None
    totals: Totals
    config: Optional[dict[str, Any]] = None

    @classmethod
    def read(cls, layout: FeatureSetLayout) -> Optional["Manifest"]:
        """The manifest, None when the set never completed. Raises FeatureSetFormatError for a format this vlp
        does not read (checked before anything else of the file is looked at)."""
        source = layout.uri_of(layout.MANIFEST)
        data = layout.read(layout.MANIFEST)
        if data is None:
            return None
        obj = parse_json(data, source)
        found = obj.get("format") if isinstance(obj, dict) else None
        problem = None if found in READ_FORMATS else format_problem(found, FEATURES_AUDIO)
        if problem:
            newer = "newer" in problem
            raise FeatureSetFormatError(
                f"feature set {layout.uri}: {problem}; {'upgrade vlp, or ' if newer else ''}rebuild it with "
                f"`vlp precompute` and output.overwrite=true (or a new output.uri)")
        return cls.from_json(obj, source)

    def write(self, layout: FeatureSetLayout) -> None:
        layout.write(layout.MANIFEST, self.to_bytes())


@dataclass(frozen=True)
class FeatureSetInfo:
    """What training needs to know of a completed feature set."""

    uri: str
    fingerprint: Fingerprint
    manifest: Manifest

    @property
    def hidden_size(self) -> int:
        return self.fingerprint.encoder.hidden_size

    @property
    def audio_hidden_size(self) -> Optional[int]:
        """D of the audio items' features; None when the set was made without an audio tower."""
        return self.fingerprint.audio.hidden_size if self.fingerprint.audio else None

    @property
    def mode(self) -> str:
        return self.fingerprint.mode

    @property
    def samples(self) -> int:
        return self.manifest.totals.samples_ok


# ------------------------------------------------------------------------------------------------ readers

def read_feature_set(uri: str, storage: StorageConfig | None = None) -> FeatureSetInfo:
    """Fingerprint + manifest of a completed feature set. FileNotFoundError when it is missing or incomplete,
    FeatureSetFormatError when it is in a format this vlp does not read."""
    layout = FeatureSetLayout(uri, storage)
    man = Manifest.read(layout)
    fp = Fingerprint.read(layout)
    if fp is None or man is None:
        raise FileNotFoundError(f"feature set {uri} is missing or incomplete (no manifest.json); run vlp precompute")
    return FeatureSetInfo(uri, fp, man)


def committed_shards(uri: str | FeatureSetLayout, storage: StorageConfig | None = None) -> dict[str, ShardCommit]:
    """{shard name: commit record} of every shard whose marker exists."""
    return ShardCommit.read_all(_layout(uri, storage))


def _parts(layout: FeatureSetLayout) -> list[str]:
    return [layout.uri_of(p) for rec in ShardCommit.read_all(layout).values() for p in rec.parts]


def feature_parts(uri: str, storage: StorageConfig | None = None) -> list[str]:
    """Full URIs of every committed Parquet part (after checking the set's format)."""
    layout = FeatureSetLayout(uri, storage)
    Manifest.read(layout)
    return _parts(layout)


def feature_part_paths(parts: list[str], storage: StorageConfig | None = None) -> list[str]:
    """Part URIs (:func:`feature_parts`) -> the paths ``read_parquet`` is given (without the scheme)."""
    return [get_fs(p, storage)[1] for p in parts]


def part_num_rows(part: str, storage: StorageConfig | None = None) -> int:
    """Rows of one Parquet part (a URI of :func:`feature_parts`), from its footer: no column is read."""
    import pyarrow.parquet as pq

    fs, path = get_fs(part, storage)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def part_uids(part: str, storage: StorageConfig | None = None) -> list[str]:
    """The sample uids of one Parquet part, in row order, reading only their columns: ``uid``, or ``shard/key``
    for rows written before there was one (what :func:`vlp.train.data.row_uids` makes of a batch)."""
    import pyarrow.parquet as pq

    fs, path = get_fs(part, storage)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        if "uid" in pf.schema_arrow.names:
            return [str(u) for u in pf.read(columns=["uid"]).column("uid").to_pylist()]
        t = pf.read(columns=["shard", "key"])
    return [f"{s}/{k}" for s, k in zip(t.column("shard").to_pylist(), t.column("key").to_pylist())]


def decode_features(features: bytes, shape) -> np.ndarray:
    """One stored block -> array of ``shape``: fp16 (P + T, D) for valley_pooled, (T, 1 + P, D) for frames,
    (segments, tokens, D_a) for audio; uint8 (T, 3, S, S) for pixels. The element size is the block's bytes per
    element of ``shape`` (2: fp16, 1: uint8); anything else is a damaged row (ValueError)."""
    dims = tuple(int(s) for s in shape)
    n = int(np.prod(dims)) if dims else 0
    dtype = {2: np.float16, 1: np.uint8}.get(len(features) // n if n and len(features) % n == 0 else 0)
    if dtype is None:
        raise ValueError(f"feature block of {len(features)} bytes does not fit shape {list(dims)} in fp16 or uint8")
    return np.frombuffer(features, dtype=dtype).reshape(dims)


def decode_item_features(features, shapes) -> list[np.ndarray]:
    """A /2 row's ``features`` (one fp16 block per item) and ``shape`` (one shape per item) -> one array per item
    ([] for a text-only row)."""
    return [decode_features(f, s) for f, s in zip(features, shapes)]


# /1 columns that hold one item's value and become one-element lists in /2
V1_ITEM_COLUMNS = ("features", "shape", "timestamps", "num_frames", "n_source_frames")


def is_v1(manifest: Optional[Manifest]) -> bool:
    """Whether a set's rows are /1 (one item per row): a manifest without ``format`` or with ``vlp-features/1``.
    (A set that never completed has no manifest: see :func:`_rows_are_v1`.)"""
    return manifest is not None and manifest.format in (None, FEATURES_V1)


def lift_v1_conversations(key: str, conversations: Optional[str], media_type: str) -> Optional[str]:
    """A /1 row's conversations (JSON) with the placeholder rules of the general sample applied to its one item:
    an old conversation without a placeholder gets ``<media_type>\\n`` before its first user turn (its features
    were silently dropped before). One that does not match its item is kept as it was (training skips it:
    "placeholders do not match the media items")."""
    from ..data.sample import match_placeholders  # no torch, no Ray

    if not conversations:
        return conversations
    try:
        conv = json.loads(conversations)
        lifted, _ = match_placeholders(key, conv, [media_type])
    except (ValueError, TypeError, KeyError, AttributeError):
        return conversations
    return conversations if lifted == conv else json.dumps(lifted)


def lift_v1_row(row: dict) -> dict:
    """One /1 feature row (as ``to_pylist`` gives it) -> the /2 row of its one item (a new dict)."""
    out = dict(row)
    for k in V1_ITEM_COLUMNS:
        if k in row:
            out[k] = [row[k]]
    out["modalities"] = [row["media_type"]]
    out["items"] = [""]  # /1 did not record the member's name
    out["conversations"] = lift_v1_conversations(row["key"], row.get("conversations"), row["media_type"])
    return out


def lift_v1_batch(table):
    """A /1 batch (a ``pyarrow.Table``: a Parquet part, or a Ray Data ``batch_format="pyarrow"`` batch) -> /2:
    every per-item column wrapped in a one-element list (``features: binary -> list<binary>``, ``shape:
    list<int32> -> list<list<int32>>``...), ``modalities = [media_type]``, ``items = [""]`` and the conversations
    through :func:`lift_v1_conversations`."""
    import pyarrow as pa

    offsets = pa.array(np.arange(table.num_rows + 1, dtype=np.int32))

    def one_each(name: str):  # column of n values -> column of n one-element lists
        return pa.ListArray.from_arrays(offsets, table.column(name).combine_chunks())

    for k in V1_ITEM_COLUMNS:
        if k in table.column_names:
            table = table.set_column(table.column_names.index(k), k, one_each(k))
    table = table.append_column("modalities", one_each("media_type"))
    table = table.append_column("items", pa.ListArray.from_arrays(offsets, pa.array([""] * table.num_rows)))
    if "conversations" in table.column_names:
        keys, convs, mts = (table.column(c).to_pylist() for c in ("key", "conversations", "media_type"))
        lifted = pa.array([lift_v1_conversations(k, c, m) for k, c, m in zip(keys, convs, mts)], pa.string())
        table = table.set_column(table.column_names.index("conversations"), "conversations", lifted)
    return table


def _rows_are_v1(layout: FeatureSetLayout, manifest: Optional[Manifest], parts: list[str]) -> bool:
    """/1 or /2 rows: from the manifest's format; a set that never completed (no manifest) from its first part's
    columns (/2 rows have ``modalities``)."""
    if manifest is not None:
        return is_v1(manifest)
    if not parts:
        return False
    import pyarrow.parquet as pq

    fs, path = get_fs(parts[0], layout.storage)
    with fs.open(path, "rb") as f:
        return "modalities" not in pq.read_schema(f).names


def iter_feature_rows(uri: str, storage: StorageConfig | None = None) -> Iterator[dict]:
    """Plain-Python reader (no Ray): every committed row, /2-shaped (a /1 set is lifted, :func:`lift_v1_row`),
    with ``features`` decoded to one float16 array per item."""
    import pyarrow.parquet as pq

    layout = FeatureSetLayout(uri, storage)
    parts = _parts(layout)
    v1 = _rows_are_v1(layout, Manifest.read(layout), parts)
    for part in parts:
        fs, path = get_fs(part, storage)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        for r in table.to_pylist():
            r = lift_v1_row(r) if v1 else r
            r["features"] = decode_item_features(r["features"], r["shape"])
            yield r


def _decode_batch(batch: dict) -> dict:
    feats = [decode_item_features(f, s) for f, s in zip(batch["features"], batch["shape"])]
    arr = np.empty(len(feats), dtype=object)
    arr[:] = feats
    batch["features"] = arr
    return batch


def open_feature_dataset(uri: str, storage: StorageConfig | None = None, decode: bool = True,
                         include_paths: bool = False):
    """A Ray Dataset over the committed rows of a feature set (what training streams), /2-shaped whatever the
    set's format (a /1 set is lifted by a ``map_batches`` step, :func:`lift_v1_batch`).

    Columns: uid (``shard/key``, unique), key, shard, media_type, caption, conversations (JSON), meta (JSON), mode,
    and per item (lists of equal length, [] for a text-only row): modalities, items, timestamps, num_frames,
    n_source_frames, features (fp16 bytes; one float16 array per item when ``decode``), shape; with
    ``include_paths`` also ``path``, the row's part as :func:`feature_part_paths` gives it.
    """
    import pyarrow.fs as pafs
    import ray

    layout = FeatureSetLayout(uri, storage)
    manifest = Manifest.read(layout)
    parts = _parts(layout)
    if not parts:
        state = "has no manifest (never completed)" if manifest is None else "holds no committed features"
        raise FileNotFoundError(f"feature set {uri} {state}")
    fs, _ = get_fs(uri, storage)
    filesystem = None if "://" not in uri else pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    ds = ray.data.read_parquet(feature_part_paths(parts, storage), filesystem=filesystem,
                               include_paths=include_paths)
    if _rows_are_v1(layout, manifest, parts):
        ds = ds.map_batches(lift_v1_batch, batch_format="pyarrow", batch_size=256)
    if decode:
        ds = ds.map_batches(_decode_batch, batch_format="numpy", batch_size=64)
    return ds
