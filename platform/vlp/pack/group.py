"""One group of records -> its shard(s): fetch each record's media (a ranged GET per file, on a few threads),
build the WebDataset sample, stream it into ``webdataset.ShardWriter``. A plain callable (:class:`PackGroup`), testable without Ray; the pipeline maps it over
the groups.

A sample in the shards (the video2dataset / img2dataset layout the precompute reader parses,
``vlp.data.sample``):

    {key}.{ext}            the one media item (key.jpg, key.mp4), or per modality numbered: key.0.jpg, key.1.jpg,
                           key.0.mp4 (the k-th <image> placeholder is image k)
    {key}.json             {"conversations", "caption", "id", "system", "format", "file", "media", "source"}:
                           vlp's conversation (one placeholder per item), the record's media paths as written and
                           the original record under "source"
    {key}.txt              the caption, where there is one

``key`` is the record's running index, zero-padded (deterministic: the same annotations give the same shards,
byte for byte; tar mtimes are pinned). A record that cannot be packed (a missing, unreadable, oversized or
non-media file) is an error line naming the record and the item, never a crash.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Callable, Iterable, Iterator, Optional, TypeVar

from ..data.media import sniff
from ..data.sample import modality_of
from ..data.tario import TAR_HEADERS
from ..storage import StorageConfig, get_fs, is_remote, join, put_file_atomic
from .config import PackConfig
from .formats import PackError, PackItem, PackRecord

CONTAINER_EXT = {"jpeg": "jpg", "png": "png", "webp": "webp", "bmp": "bmp", "gif": "gif", "mp4": "mp4",
                 "matroska": "mkv", "avi": "avi"}  # sniffed container -> member extension, for paths without one
KEY_DIGITS = 9
T = TypeVar("T")
R = TypeVar("R")


def record_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def media_uri(root: str, path: str) -> str:
    """Where an item's path points: absolute paths and URLs as written, others under ``root``. ValueError for a
    relative path that climbs out of the media root."""
    if "://" in path or path.startswith("/"):
        return path
    if ".." in path.replace("\\", "/").split("/"):
        raise ValueError("the path leaves the media root ('..')")
    return join(root, path) if root else path


def read_item(item: PackItem, cfg: PackConfig) -> tuple[bytes, str]:
    """(bytes, path that held them) of the first of the item's path and candidates that exists: one ranged GET
    each (at most max_item_bytes + 1 bytes, so memory stays bounded whatever the file holds). ValueError(reason)
    when none exists, or the file is a folder, too large or unreadable."""
    for p in [item.path, *item.candidates]:
        fs, path = get_fs(media_uri(cfg.media_root, p), cfg.storage)
        try:
            data = fs.cat_file(path, start=0, end=cfg.max_item_bytes + 1)
        except FileNotFoundError:
            continue
        except IsADirectoryError:
            raise ValueError(f"{p} is a folder, not a media file") from None
        except OSError as e:
            raise ValueError(f"{p} cannot be read: {type(e).__name__}: {e}") from None
        if len(data) > cfg.max_item_bytes:
            raise ValueError(f"{p} is over max_item_bytes={cfg.max_item_bytes}")
        if not data:
            raise ValueError(f"{p} is empty")
        return data, p
    tried = f" (tried {', '.join([item.path, *item.candidates])})" if item.candidates else ""
    where = f" under media root {cfg.media_root}" if cfg.media_root else ""
    raise ValueError(f"{item.path}: no such file{where}{tried}")


def member_ext(item: PackItem, path: str, data: bytes, check: str) -> str:
    """The member extension for an item: its file's, when that names the item's modality, else the sniffed
    container's. ValueError when the bytes are no image/video (``check == "sniff"``) or no extension fits."""
    kind, container = sniff(data)
    if check == "sniff" and item.modality in ("image", "video") and kind == "unknown":
        raise ValueError(f"{path} is not an image or video (its first bytes match no known container)")
    ext = path.rsplit("/", 1)[-1].rpartition(".")[2].lower() if "." in path.rsplit("/", 1)[-1] else ""
    if modality_of(ext) == item.modality:
        return ext
    ext = CONTAINER_EXT.get(container, "")
    if modality_of(ext) != item.modality:
        raise ValueError(f"{path}: cannot tell a {item.modality} file extension for it (sniffed: {container})")
    return ext


def build_sample(rec: PackRecord, cfg: PackConfig) -> dict:
    """The WebDataset sample of a record (``__key__`` + members); ValueError naming the item on a media problem."""
    sample: dict = {"__key__": record_key(rec.index)}
    single = len(rec.items) == 1
    pos: dict[str, int] = {}
    for i, item in enumerate(rec.items):
        try:
            data, path = read_item(item, cfg)
            ext = member_ext(item, path, data, cfg.media_check)
        except ValueError as e:
            raise ValueError(f"item {i} ({item.modality} {item.path}): {e}") from None
        k = pos.get(item.modality, 0)
        pos[item.modality] = k + 1
        sample[ext if single else f"{k}.{ext}"] = data
    meta = {"conversations": rec.conversations, "caption": rec.caption, "id": rec.id, "system": rec.system,
            "format": cfg.format.type, "file": rec.file, "media": [it.path for it in rec.items], "source": rec.source,
            **rec.extra}
    sample["json"] = json.dumps({k: v for k, v in meta.items() if v is not None}, ensure_ascii=False).encode()
    if rec.caption:
        sample["txt"] = rec.caption.encode()
    return sample


def plan_line(entry: PackRecord | PackError) -> str:
    """One line of a group's plan file (what the driver hands a group task)."""
    return json.dumps({"error" if isinstance(entry, PackError) else "record": asdict(entry)}, ensure_ascii=False)


def parse_plan_line(line: str) -> PackRecord | PackError:
    obj = json.loads(line)
    if "error" in obj:
        return PackError(**obj["error"])
    rec = obj["record"]
    return PackRecord(**{**rec, "items": [PackItem(**it) for it in rec["items"]]})


def error_line(entry: PackRecord | PackError, reason: str, stage: str) -> str:
    """One JSON line of the group's error file: which record (index, id, file), why, and at which stage."""
    return json.dumps({"key": record_key(entry.index), "index": entry.index, "id": entry.id, "file": entry.file,
                       "stage": stage, "reason": reason}, ensure_ascii=False)


def shard_names(prefix: str, group: int, n: int) -> list[str]:
    """Final names of a group's n shard files: one -> prefix-000007.tar; several -> prefix-000007-0.tar, ..."""
    base = f"{prefix}-{group:06d}"
    return [f"{base}.tar"] if n == 1 else [f"{base}-{k}.tar" for k in range(n)]


def publish(local_files: list[str], names: list[str], out: str, storage: Optional[StorageConfig]) -> list[str]:
    """Copy the written tars to ``out`` under their final names (``storage.put_file_atomic``: a reader never sees a
    half-written shard). -> their URIs."""
    uris = [join(out, name) for name in names]
    for src, uri in zip(local_files, uris):
        put_file_atomic(src, uri, storage)
    return uris


def fetch_threads(cfg: PackConfig) -> int:
    """``cfg.fetch_threads``, with 0 (auto) resolved: 8 for media on an object store, where each read waits on the
    network; 0 on local disk, where reads are fast and threads only add lock hand-offs (measured: 1.5x slower)."""
    return cfg.fetch_threads or (8 if is_remote(cfg.media_root) else 0)


def built_in_order(entries: Iterable[PackRecord | PackError], cfg: PackConfig,
                   pool: Optional[ThreadPoolExecutor] = None
                   ) -> Iterator[tuple[PackRecord | PackError, Optional[dict], str, str]]:
    """(entry, sample or None, error stage, error reason) for each entry, in input order; the samples are built
    (media fetched) on ``pool`` (None: :func:`fetch_threads` threads of its own, or none: in this thread) with
    at most twice as many in flight as fetch threads, so a group's media is never all in memory at once and fetch
    latency (object stores) overlaps."""
    threads = fetch_threads(cfg)
    if pool is None and threads:
        with ThreadPoolExecutor(threads) as own:
            yield from built_in_order(entries, cfg, own)
        return

    def one(e):
        if isinstance(e, PackError):
            return e, None, "annotation", e.reason
        try:
            return e, build_sample(e, cfg), "", ""
        except ValueError as err:
            return e, None, "media", str(err)

    yield from map(one, entries) if pool is None else in_order(pool, one, entries, 2 * threads)


def in_order(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], window: int) -> Iterator[R]:
    """``fn(item)`` of each item, run on ``pool`` and yielded in input order, with at most ``window`` submitted and
    not yet yielded (memory stays bounded however many items there are)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class GroupWriter:
    """Samples -> webdataset.ShardWriter in a temp folder (a new file past max_shard_bytes), opened at the first
    sample; :meth:`publish` moves the files to ``out`` under their final names (none for a group without a
    packable record)."""

    def __init__(self, group: int, cfg: PackConfig):
        self.group, self.cfg = group, cfg
        self.tmp = tempfile.mkdtemp(prefix="vlp-pack-")
        self.sink = None

    def write(self, sample: dict) -> None:
        import webdataset as wds

        if self.sink is None:
            self.sink = wds.ShardWriter(os.path.join(self.tmp, "part-%d.tar"), maxcount=1 << 62,
                                        maxsize=self.cfg.max_shard_bytes, verbose=0, **TAR_HEADERS)
        self.sink.write(sample)

    def publish(self) -> list[str]:
        try:
            if self.sink is None:
                return []
            self.sink.close()
            files = sorted((f for f in os.listdir(self.tmp) if f.endswith(".tar")), key=lambda f: int(f[5:-4]))
            return publish([os.path.join(self.tmp, f) for f in files],
                           shard_names(self.cfg.prefix, self.group, len(files)), self.cfg.out, self.cfg.storage)
        finally:
            self.close()

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
