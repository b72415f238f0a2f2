"""Local and S3 (or S3-compatible) storage through fsspec, plus shard-spec expansion.

Credentials never live in configs: s3fs takes them from the environment / instance role
(``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, IMDS). A config only says where the store is.
"""

from __future__ import annotations

import glob as _glob
import json
import os
import shutil
import time
from typing import Optional

import fsspec
from braceexpand import braceexpand
from pydantic import Field

from .config import Cfg
from .errors import OutputNotWritable, UserError


class StorageConfig(Cfg):
    """Where remote data lives. Credentials come from the environment, never from here."""

    endpoint_url: Optional[str] = Field(None, description="S3-compatible endpoint (MinIO, Ceph, moto); None = AWS")
    region: Optional[str] = Field(None, description="S3 region name")
    anon: bool = Field(False, description="anonymous access to public buckets")
    profile: Optional[str] = Field(None, description="AWS profile name from ~/.aws/credentials")


class StorageError(UserError, RuntimeError):
    """A store could not be reached or read; the message says what to check."""

    exit_code = 1  # the store, not the command line, needs fixing


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def storage_options(uri: str, storage: StorageConfig | None) -> dict:
    if not uri.startswith(("s3://", "s3a://")) or storage is None:
        return {}
    opts: dict = {"anon": storage.anon}
    client_kwargs = {}
    if storage.endpoint_url:
        client_kwargs["endpoint_url"] = storage.endpoint_url
    if storage.region:
        client_kwargs["region_name"] = storage.region
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    if storage.profile:
        opts["profile"] = storage.profile
    return opts


def get_fs(uri: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path-within-it) for a local path or URL."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri, storage))
    return fs, path


def join(base: str, *parts: str) -> str:
    base = base.rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts]])


def make_output_dir(uri: str, key: str, storage: StorageConfig | None = None):
    """Create the output folder ``uri`` (named by the config ``key``) -> (fs, path); OutputNotWritable when it
    cannot be (its parent is a file, a read-only place): the user's mistake, said in one line, before any work."""
    fs, root = get_fs(uri, storage)
    try:
        fs.makedirs(root, exist_ok=True)
    except OSError as e:  # NotADirectoryError, FileExistsError (a file there), PermissionError, ...
        raise OutputNotWritable(f"{key}={uri}: cannot create this folder ({e.strerror or e})") from None
    return fs, root


def write_atomic(uri: str, data: bytes | str, storage: StorageConfig | None = None) -> None:
    """Write a whole file so that a reader sees the old content or the new, never a torn one: a temp file in the
    same folder + rename locally, a single PUT on object stores (atomic there). Creates parent folders."""
    _put_atomic(uri, storage, lambda f: f.write(data.encode() if isinstance(data, str) else data))


def put_file_atomic(src: str, uri: str, storage: StorageConfig | None = None) -> None:
    """Copy the local file ``src`` to ``uri`` as :func:`write_atomic` writes bytes (never torn), streaming it:
    memory stays flat whatever its size (an upload per file on object stores)."""
    _put_atomic(uri, storage, lambda f: _copy_into(src, f), src)


def _copy_into(src: str, f) -> None:
    with open(src, "rb") as s:
        shutil.copyfileobj(s, f, 1 << 20)


def _put_atomic(uri: str, storage: StorageConfig | None, write, src: Optional[str] = None) -> None:
    """``write(file)`` fills a temp file in ``uri``'s folder, renamed over it; on object stores it writes the
    object directly (``fs.put_file`` for a local ``src``), which is atomic there."""
    fs, path = get_fs(uri, storage)
    if is_remote(uri):  # object stores have no folders to make (s3fs would check the bucket on every call)
        if src is not None:
            fs.put_file(src, path)
            return
        with fs.open(path, "wb") as f:
            write(f)
        return
    fs.makedirs(path.rsplit("/", 1)[0] or "/", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def cache_dir() -> str:
    """vlp's cache folder on this node (``$VLP_CACHE``, default ``~/.cache/vlp``): presets, localized exports."""
    return os.environ.get("VLP_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "vlp"))


def localize(uri: str, storage: StorageConfig | None = None) -> str:
    """A remote file or folder (an earlier stage's export on S3) -> a local copy in the node's cache; a local path
    unchanged. The copy is named after the URI and what it holds (each file's name, size and ETag: one listing), so a
    changed folder is fetched again; concurrent callers on a node (training workers) wait for one download (a file
    lock), streamed file by file; a process asks the store once per URI."""
    import fcntl
    import hashlib
    import tempfile

    if not is_remote(uri):
        return uri
    memo = _LOCAL_COPIES.get((uri, storage.endpoint_url if storage else None))
    if memo and os.path.exists(memo):  # fetched by this process already (an export does not change under a run)
        return memo
    fs, root = get_fs(uri, storage)
    files = {p: i for p, i in fs.find(root, detail=True).items() if i.get("type", "file") == "file"}
    if not files:
        raise StorageError(f"{uri}: nothing there to read (no such file or folder)")
    single = list(files) == [root]
    sig = json.dumps([uri, sorted((p, i.get("size"), i.get("ETag")) for p, i in files.items())], default=str)
    target = os.path.join(cache_dir(), "remote", hashlib.sha256(sig.encode()).hexdigest()[:24])
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(target, ".complete")):
            tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".fetch-")
            for p in files:
                rel = os.path.basename(p) if single else p[len(root):].lstrip("/")
                os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
                fs.get_file(p, os.path.join(tmp, rel))
            open(os.path.join(tmp, ".complete"), "w").close()
            shutil.rmtree(target, ignore_errors=True)
            os.rename(tmp, target)
    local = os.path.join(target, os.path.basename(root)) if single else target
    _LOCAL_COPIES[(uri, storage.endpoint_url if storage else None)] = local
    return local


_LOCAL_COPIES: dict[tuple[str, Optional[str]], str] = {}


def read_bytes(uri: str, storage: StorageConfig | None = None) -> Optional[bytes]:
    """The whole file, or None when it does not exist."""
    fs, path = get_fs(uri, storage)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


class Appender:
    """Append-only text log (metrics.jsonl, samples.jsonl) on local disk or an object store.

    Locally every :meth:`write` appends to the file. Object stores cannot append, and rewriting the object on every
    write makes the traffic quadratic in its length; here writes are buffered and each :meth:`flush` PUTs the buffer
    as a new part ``<uri>.parts/<n>`` (every byte is uploaded once). A flush happens when the buffer holds
    ``flush_bytes`` or ``flush_s`` seconds passed since the last one, and on :meth:`close`. A new Appender on the
    same URI (a resumed run) continues the part numbering. Read the whole log back with :func:`read_appended`."""

    def __init__(self, uri: str, storage: StorageConfig | None = None, flush_bytes: int = 1 << 20,
                 flush_s: float = 30.0):
        self.uri, self.storage, self.flush_bytes, self.flush_s = uri, storage, flush_bytes, flush_s
        self.remote = is_remote(uri)
        self._buf: list[str] = []
        self._size, self._last = 0, time.monotonic()
        self._next = _next_part(uri, storage) if self.remote else 0
        self._local = None if self.remote else get_fs(uri)[1]  # a plain path, also for file:// URIs
        if not self.remote:
            os.makedirs(os.path.dirname(os.path.abspath(self._local)), exist_ok=True)

    def write(self, text: str) -> None:
        if not self.remote:
            with open(self._local, "a") as f:
                f.write(text)
            return
        self._buf.append(text)
        self._size += len(text)
        if self._size >= self.flush_bytes or time.monotonic() - self._last >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            write_atomic(join(self.uri + ".parts", f"{self._next:08d}"), "".join(self._buf), self.storage)
            self._next += 1
            self._buf, self._size = [], 0
        self._last = time.monotonic()

    def close(self) -> None:
        self.flush()


def _next_part(uri: str, storage: StorageConfig | None) -> int:
    fs, path = get_fs(uri + ".parts", storage)
    fs.invalidate_cache(path)
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return 0
    return max((int(n) + 1 for n in names if n.isdigit()), default=0)


def read_appended(uri: str, storage: StorageConfig | None = None) -> str:
    """The whole text of an :class:`Appender` log: the file itself (local, or written whole) then its parts."""
    head = read_bytes(uri, storage) or b""
    if not is_remote(uri):
        return head.decode()
    fs, path = get_fs(uri + ".parts", storage)
    fs.invalidate_cache(path)
    try:
        parts = sorted(p for p in fs.ls(path, detail=False) if p.rsplit("/", 1)[-1].isdigit())
    except FileNotFoundError:
        parts = []
    return head.decode() + "".join(fs.cat(p).decode() for p in parts)


def describe_storage_error(uri: str, exc: BaseException) -> str:
    """Turn botocore/s3fs exceptions into a message a user can act on."""
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    hints = []
    if isinstance(exc, PermissionError) or any(s in low for s in (
            "invalidaccesskeyid", "access key id", "signaturedoesnotmatch", "accessdenied", "forbidden",
            "nocredentials", "unable to locate credentials", "expiredtoken", "403")):
        hints.append("credentials were rejected or missing: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                     "AWS_PROFILE (storage.profile) or the instance role")
    if "nosuchbucket" in low:
        hints.append("the bucket does not exist")
    if "could not connect" in low or "connect timeout" in low or "endpoint" in low:
        hints.append("the endpoint could not be reached: check storage.endpoint_url")
    hint = ("; " + "; ".join(hints)) if hints else ""
    return f"cannot access {uri}: {text}{hint}"


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def expand_shards(specs: list[str] | str, storage: StorageConfig | None = None,
                  suffixes: tuple[str, ...] = (".tar",)) -> list[str]:
    """Expand shard specs into a sorted, de-duplicated list of shard URIs.

    Accepts local folders (every ``*.tar`` inside), globs, brace ranges
    (``webvid-{00000..00099}.tar``) and ``s3://`` URLs of any of those. A spec that matches nothing
    is an error, as is a brace-range member that does not exist.
    """
    if isinstance(specs, str):
        specs = [specs]
    out: list[str] = []
    missing: list[str] = []
    for spec in specs:
        for one in braceexpand(spec):
            remote = is_remote(one)
            try:
                fs, path = get_fs(one, storage)
                if _has_glob(path):
                    found = sorted(fs.glob(path)) if remote else sorted(_glob.glob(path))
                    found = [f for f in found if f.endswith(suffixes)]
                    if not found:
                        missing.append(f"{one} (glob matched nothing)")
                elif fs.isdir(path):
                    found = sorted(f for f in fs.find(path) if f.endswith(suffixes))
                    if not found:
                        missing.append(f"{one} (folder holds no {'/'.join(suffixes)} files)")
                elif fs.exists(path):
                    found = [path]
                else:
                    found = []
                    missing.append(f"{one} (does not exist)")
            except (OSError, PermissionError) as e:
                raise StorageError(describe_storage_error(one, e)) from e
            except Exception as e:  # botocore errors are not OSError subclasses
                if type(e).__module__.startswith(("botocore", "aiobotocore", "s3fs")):
                    raise StorageError(describe_storage_error(one, e)) from e
                raise
            proto = one.split("://", 1)[0] + "://" if remote else ""
            out.extend(f if not proto or f.startswith(proto) else proto + f for f in found)
            if not remote:
                out[len(out) - len(found):] = [os.path.abspath(f) for f in found]
    if missing:
        raise StorageError("shard spec matched nothing:\n  " + "\n  ".join(missing))
    seen = set()
    uniq = []
    for f in out:
        if f not in seen:
            seen.add(f)
            uniq.append(f)
    return uniq
