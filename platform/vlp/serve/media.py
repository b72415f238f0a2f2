"""A media part's URL -> its bytes, bounded: ``data:`` URLs (base64), local files (``file://`` or a path) and
``s3://`` objects (through vlp.storage's fsspec). Never more than ``limit + 1`` bytes are read or decoded; a
bigger item is :class:`TooLarge`. http(s) URLs are refused (the server does not fetch from the network for its
clients). Pure Python + fsspec; no Ray, no torch.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional

from ..storage import StorageConfig, get_fs
from .config import MediaConfig
from .protocol import BadRequest, TooLarge

# data: URL MIME types -> the extension handed to the decoder as a hint (it sniffs the contents either way)
MIME_EXT = {"image/jpeg": "jpg", "image/jpg": "jpg", "image/png": "png", "image/gif": "gif", "image/webp": "webp",
            "image/bmp": "bmp", "video/mp4": "mp4", "video/webm": "webm", "video/quicktime": "mov",
            "video/x-msvideo": "avi", "video/x-matroska": "mkv"}


@dataclass
class Media:
    """A media item's bytes, its extension hint for the decoder and how errors name it."""

    data: bytes
    ext: str
    name: str


def fetch(url: str, limit: int, policy: MediaConfig, where: str, storage: Optional[StorageConfig] = None) -> Media:
    """The bytes behind ``url`` (``where``: the request's param naming the part, for errors; ``storage``: the S3
    endpoint/region of s3:// URLs)."""
    if url.startswith("data:"):
        return from_data_url(url, limit, where)
    if url.startswith(("http://", "https://")):
        raise BadRequest(f"{where}: http(s) URLs are not fetched; send the media as a data: URL, or as a path or "
                         "s3:// URL the server can read", param=where, code="unsupported_url")
    if url.startswith(("s3://", "s3a://")):
        if not policy.s3:
            raise BadRequest(f"{where}: s3:// media are not allowed on this server", param=where)
        return from_store(url, limit, storage, where)
    if "://" in url and not url.startswith("file://"):
        raise BadRequest(f"{where}: unsupported URL scheme in {url[:40]!r} (data:, file://, a path, s3://)",
                         param=where, code="unsupported_url")
    return from_file(url[len("file://"):] if url.startswith("file://") else url, limit, policy, where)


def too_large(where: str, limit: int) -> TooLarge:
    return TooLarge(f"{where}: the media item is over the {limit}-byte limit", param=where, code="media_too_large")


def from_data_url(url: str, limit: int, where: str) -> Media:
    """``data:<mime>;base64,<payload>``, checked against ``limit`` before decoding (from the payload's length)."""
    head, sep, payload = url[len("data:"):].partition(",")
    if not sep or not head.endswith(";base64"):
        raise BadRequest(f"{where}: a data: URL must be `data:<mime type>;base64,<data>`", param=where)
    mime = head[: -len(";base64")].split(";")[0].strip().lower()
    payload = payload.strip()
    if (len(payload) - payload[-2:].count("=")) * 3 // 4 > limit:
        raise too_large(where, limit)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where}: the data: URL's payload is not valid base64", param=where) from None
    return Media(data, MIME_EXT.get(mime, ""), f"{where} ({mime or 'no MIME type'})")


def read_capped(f: BinaryIO, limit: int, where: str) -> bytes:
    """At most ``limit + 1`` bytes of ``f``; TooLarge when there are more than ``limit``."""
    data = f.read(limit + 1)
    if len(data) > limit:
        raise too_large(where, limit)
    return data


def from_file(path: str, limit: int, policy: MediaConfig, where: str) -> Media:
    """A file on the replica's machine (allowed by ``policy.local``, under ``policy.root`` when set)."""
    if not policy.local:
        raise BadRequest(f"{where}: local files are not allowed on this server; send a data: URL", param=where)
    p = Path(path).expanduser().resolve()
    if policy.root is not None and not is_under(p, Path(policy.root).expanduser().resolve()):
        raise BadRequest(f"{where}: {path} is outside the server's media root", param=where)
    try:
        with open(p, "rb") as f:
            return Media(read_capped(f, limit, where), p.suffix.lstrip(".").lower(), path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise BadRequest(f"{where}: {path}: no such file", param=where) from None
    except PermissionError:
        raise BadRequest(f"{where}: {path}: not readable by the server", param=where) from None


def is_under(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


def from_store(url: str, limit: int, storage: Optional[StorageConfig], where: str) -> Media:
    """An object on S3 (``storage``: endpoint, region; credentials from the environment)."""
    fs, path = get_fs(url, storage)
    try:
        with fs.open(path, "rb") as f:
            data = read_capped(f, limit, where)
    except FileNotFoundError:
        raise BadRequest(f"{where}: {url}: no such object", param=where) from None
    except (PermissionError, OSError) as e:  # s3fs: access denied, endpoint unreachable, ...
        raise BadRequest(f"{where}: {url}: cannot be read ({e})", param=where) from None
    return Media(data, os.path.splitext(path)[1].lstrip(".").lower(), url)
