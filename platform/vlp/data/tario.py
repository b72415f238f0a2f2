"""Safe, streaming WebDataset tar reading.

Members are grouped into samples by key the way WebDataset does it (``dir/key.ext`` -> key
``dir/key``, extension = everything after the first dot of the basename). Nothing is ever
unpickled: ``.pyd``/``.pickle``/``.pkl`` members are ignored and counted. A tar cut off mid-member,
or a corrupt header, ends the shard with an error record for the affected sample; everything read
before it is still used.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from typing import IO, Iterator

PICKLE_EXTS = {"pyd", "pickle", "pkl"}
MAX_MEMBER_BYTES = 2 << 30  # refuse absurd members instead of exhausting memory


@dataclass
class RawSample:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    size: int = 0
    problem: str = ""  # set when a member had to be refused: the whole sample is then reported, not used


@dataclass
class TarProblem:
    key: str
    reason: str


def split_name(name: str) -> tuple[str, str]:
    """``a/b/000123.mp4`` -> (``a/b/000123``, ``mp4``); ``x.seg.json`` -> (``x``, ``seg.json``)."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{d}/{stem}" if d else stem
    return key, ext.lower() if dot else ""


class _HeaderWatch(tarfile.TarInfo):
    """TarInfo that remembers why header reading stopped.

    In stream mode ``tarfile`` ends the iteration *silently* (as if the archive were complete) when a
    header after the first is missing, cut short or fails its checksum; only a zero block is a real
    end-of-archive marker. This records the other cases so the reader can report them.
    """

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as e:
            tf._vlp_header_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            raise


def iter_tar_samples(fileobj: IO[bytes]) -> Iterator[RawSample | TarProblem]:
    """Yield samples (and problems) from a tar stream, in order, grouping adjacent members by key."""
    cur: RawSample | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_HeaderWatch) as tf:
            for ti in tf:
                if not ti.isfile():
                    continue
                if ti.name.startswith(("__", "._")) or "/__" in ti.name or "/._" in ti.name:
                    continue  # tar metadata / macOS resource forks, not samples
                key, ext = split_name(ti.name)
                if cur is not None and key != cur.key:
                    yield _finish(cur)
                    cur = None
                if cur is None:
                    cur = RawSample(key=key)
                if ext in PICKLE_EXTS or ext.endswith(tuple("." + e for e in PICKLE_EXTS)):
                    cur.ignored.append(ext)
                    continue
                if ti.size > MAX_MEMBER_BYTES:
                    cur.problem = f"member {ti.name} is {ti.size} bytes, over the {MAX_MEMBER_BYTES} limit"
                    continue
                f = tf.extractfile(ti)
                data = f.read() if f is not None else b""
                if len(data) != ti.size:
                    raise tarfile.ReadError(f"member {ti.name} truncated: {len(data)} of {ti.size} bytes")
                cur.members[ext] = data
                cur.size += len(data)
            bad_end = getattr(tf, "_vlp_header_error", None)
            if bad_end:
                # no end-of-archive marker: cut off at a member boundary or a corrupt header
                raise tarfile.ReadError(f"archive ends without an end-of-archive marker ({bad_end})")
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        # truncated or corrupt archive: the sample being read is lost, report it and stop
        lost = cur.key if cur is not None else "<shard>"
        yield TarProblem(lost, f"tar is truncated or corrupt: {type(e).__name__}: {e}")
        return
    if cur is not None:
        yield _finish(cur)


def _finish(sample: RawSample) -> RawSample | TarProblem:
    return TarProblem(sample.key, sample.problem) if sample.problem else sample


def write_tar(fileobj: IO[bytes], samples: list[tuple[str, dict[str, bytes]]], mtime: float = 0.0) -> int:
    """Write samples as a WebDataset tar (members ``{key}.{ext}``, in order). Returns bytes of payload."""
    import io as _io

    total = 0
    with tarfile.open(fileobj=fileobj, mode="w|") as tf:
        for key, members in samples:
            for ext, data in members.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                ti.mtime = mtime
                ti.mode = 0o644
                tf.addfile(ti, _io.BytesIO(data))
                total += len(data)
    return total
