"""Safe, streaming WebDataset tar reading, with memory bounded whatever a shard holds.

Members are grouped into samples by key the way WebDataset does it (``dir/key.ext`` -> key
``dir/key``, extension = everything after the first dot of the basename). Nothing is ever
unpickled: ``.pyd``/``.pickle``/``.pkl`` members are ignored and counted. A tar cut off mid-member,
or a corrupt header, ends the shard with an error record for the affected sample; everything read
before it is still used.

Memory: only members a stage uses are held (:func:`wanted_member`: ``json``, ``txt`` and media, numbered
or not); every other member is streamed past in :data:`SKIP_CHUNK` pieces and listed in
``RawSample.ignored``. A sample whose held members would pass ``max_sample_bytes`` (``SampleConfig``), or
one member over :data:`MAX_MEMBER_BYTES`, becomes a :class:`TarProblem` naming the sample, the member and
the limit; the rest of that sample is streamed past. A gzip / bzip2 / xz shard is read through the
standard library's decompressors, which hand out at most the size asked for (tarfile asks for 10 KiB at a
time), so a decompression bomb costs time, not memory; zstd / lz4 shards are refused by their magic bytes.
Extended headers (pax, GNU long names), which tarfile reads whole, are limited to :data:`MAX_HEADER_BYTES`.

Why not ``webdataset.tariterators.tar_file_iterator`` (webdataset 1.0.2): it opens ``r|*``, whose
decompression is unbounded per read (10 KiB of bzip2 inflates to gigabytes in one call), reads every selected
member whole with ``extractfile(..).read()`` and cannot refuse one by its size first (``select_files`` sees
the name only), takes no ``tarinfo`` class (so a corrupt header ends it silently, as if the shard were
complete) and reports failures to a handler that either stops or drops, with no record for the sample.
vlp uses webdataset to write shards (``vlp.synth.shards``); :func:`write_tar` stays for tests that write
hostile tars by hand.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import IO, Callable, Iterator

from .media import AUDIO_EXTS, IMAGE_EXTS, VIDEO_EXTS

PICKLE_EXTS = {"pyd", "pickle", "pkl"}
# a member is one Arrow ``binary`` value downstream, and those hold at most 2 GiB
MAX_MEMBER_BYTES = 2 << 30
# default of SampleConfig.max_sample_bytes: far above a real sample (WebVid/CC3M: a few MB; an hour of 1080p at
# 2 Mbit/s is ~0.9 GB), low enough that a read task holding one sample (and its row copy) stays within a few GiB
MAX_SAMPLE_BYTES = 1 << 30
# the tar headers of every shard vlp writes (webdataset.TarWriter / ShardWriter keywords): fixed, so the same
# samples give the same bytes; members are written as given (bytes), never re-encoded
TAR_HEADERS = {"mtime": 0.0, "mode": 0o644, "user": "", "group": "", "encoder": False}
MAX_HEADER_BYTES = 1 << 20  # pax / GNU long-name blocks: a path and a few fields, never megabytes
SKIP_CHUNK = 1 << 20  # members streamed past are read (and dropped) this much at a time
TEXT_EXTS = ("json", "txt")
MEDIA_EXTS = frozenset((*VIDEO_EXTS, *IMAGE_EXTS, *AUDIO_EXTS))
# leading bytes of compressed streams: read through a bounded decompressor, or refused
DECOMPRESSORS: dict[bytes, Callable[[IO[bytes]], IO[bytes]]] = {
    b"\x1f\x8b": lambda f: gzip.GzipFile(fileobj=f, mode="rb"), b"BZh": bz2.BZ2File, b"\xfd7zXZ\x00": lzma.LZMAFile}
REFUSED = {b"\x28\xb5\x2f\xfd": ("zstd", "zstd -d"), b"\x04\x22\x4d\x18": ("lz4", "lz4 -d")}


@dataclass
class RawSample:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # extensions of members not held (pickles, unwanted)
    size: int = 0  # bytes held in ``members``
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


def wanted_member(ext: str) -> bool:
    """Whether a stage uses a member with this extension: ``json``, ``txt``, or media by its last extension
    (``mp4``, ``0.jpg``, ``thumb.png``: a json ``images`` list may name any of them, see ``data.sample``)."""
    return ext in TEXT_EXTS or ext.rpartition(".")[2] in MEDIA_EXTS


def is_pickle(ext: str) -> bool:
    return ext in PICKLE_EXTS or ext.endswith(tuple("." + e for e in PICKLE_EXTS))


class _HeaderWatch(tarfile.TarInfo):
    """TarInfo that remembers why header reading stopped, and refuses oversized extended headers.

    In stream mode ``tarfile`` ends the iteration *silently* (as if the archive were complete) when a
    header after the first is missing, cut short or fails its checksum; only a zero block is a real
    end-of-archive marker. This records the other cases so the reader can report them. ``tarfile`` reads
    a pax or GNU long-name block whole, whatever size its header claims: refused over MAX_HEADER_BYTES.
    """

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as e:
            tf._vlp_header_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            raise

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        ti = super().frombuf(buf, encoding, errors)
        extended = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                    tarfile.GNUTYPE_LONGLINK)
        if ti.type in extended and ti.size > MAX_HEADER_BYTES:
            # ReadError, not a HeaderError: tarfile passes it on instead of ending the archive quietly
            raise tarfile.ReadError(f"an extended header (type {ti.type!r}) of {ti.size} bytes, over the "
                                    f"{MAX_HEADER_BYTES} limit")
        return ti


class _Prefixed:
    """A read-only stream: ``head`` (bytes already read to sniff the format), then the rest of ``f``."""

    def __init__(self, head: bytes, f: IO[bytes]):
        self.head, self.f = head, f

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.f.read(n)
        if n is None or n < 0:
            out, self.head = self.head + self.f.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out + (self.f.read(n - len(out)) if len(out) < n else b"")


def open_decompressed(fileobj: IO[bytes]) -> tuple[IO[bytes] | None, str]:
    """The shard's tar stream, decompressed (gzip, bzip2, xz) by magic bytes -> (stream, ""), or
    (None, reason) for a compression vlp refuses."""
    head = fileobj.read(6)
    stream = _Prefixed(head, fileobj)
    for magic, (name, tool) in REFUSED.items():
        if head.startswith(magic):
            return None, (f"shard is {name}-compressed; vlp reads uncompressed WebDataset tars (or gzip, bzip2, xz "
                          f"ones): decompress it first ({tool} SHARD)")
    for magic, opener in DECOMPRESSORS.items():
        if head.startswith(magic):
            return opener(stream), ""
    return stream, ""


def iter_tar_samples(fileobj: IO[bytes], wanted: Callable[[str], bool] = wanted_member,
                     max_sample_bytes: int = MAX_SAMPLE_BYTES) -> Iterator[RawSample | TarProblem]:
    """Yield samples (and problems) from a tar stream, in order, grouping adjacent members by key.

    Members whose extension ``wanted`` refuses (and pickles, always) are streamed past and listed in
    ``RawSample.ignored``; a sample holding more than ``max_sample_bytes`` becomes a TarProblem."""
    cur: RawSample | None = None
    try:
        stream, refused = open_decompressed(fileobj)
        if stream is None:
            yield TarProblem("<shard>", refused)
            return
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_HeaderWatch) as tf:
            for ti in tf:
                tf.members = []  # stream mode would keep every TarInfo: memory would grow with the member count
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
                _take_member(tf, ti, ext, cur, wanted, max_sample_bytes)
            bad_end = getattr(tf, "_vlp_header_error", None)
            if bad_end:
                # no end-of-archive marker: cut off at a member boundary or a corrupt header
                raise tarfile.ReadError(f"archive ends without an end-of-archive marker ({bad_end})")
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as e:
        # truncated or corrupt archive (or compressed stream): the sample being read is lost, report it and stop
        lost = cur.key if cur is not None else "<shard>"
        yield TarProblem(lost, f"tar is truncated or corrupt: {type(e).__name__}: {e}")
        return
    if cur is not None:
        yield _finish(cur)


def _take_member(tf: tarfile.TarFile, ti: tarfile.TarInfo, ext: str, cur: RawSample,
                 wanted: Callable[[str], bool], max_sample_bytes: int) -> None:
    """Hold member ``ti`` in ``cur``, or stream past it: listed as ignored, or refusing the whole sample."""
    if cur.problem:  # the sample is refused already: nothing more of it is held
        _stream_past(tf, ti)
        return
    if is_pickle(ext) or not wanted(ext):
        cur.ignored.append(ext)
        _stream_past(tf, ti)
        return
    if ti.size > MAX_MEMBER_BYTES:
        cur.problem = f"member {ti.name} is {ti.size} bytes, over the {MAX_MEMBER_BYTES} limit"
    elif cur.size + ti.size > max_sample_bytes:
        cur.problem = (f"sample {cur.key!r} is over the max_sample_bytes limit of {max_sample_bytes} at member "
                       f"{ti.name} ({ti.size} bytes, after {cur.size} bytes of earlier members)")
    if cur.problem:
        cur.members.clear()  # let go of what was held
        _stream_past(tf, ti)
        return
    f = tf.extractfile(ti)
    data = f.read() if f is not None else b""
    if len(data) != ti.size:
        raise tarfile.ReadError(f"member {ti.name} truncated: {len(data)} of {ti.size} bytes")
    cur.members[ext] = data
    cur.size += len(data)


def _stream_past(tf: tarfile.TarFile, ti: tarfile.TarInfo) -> None:
    """Read member ``ti`` through, SKIP_CHUNK bytes at a time, holding none of it (a cut is a ReadError)."""
    f = tf.extractfile(ti)
    left = ti.size if f is not None else 0
    while left > 0:
        got = len(f.read(min(left, SKIP_CHUNK)))
        if got == 0:
            raise tarfile.ReadError(f"member {ti.name} truncated: {ti.size - left} of {ti.size} bytes")
        left -= got


def _finish(sample: RawSample) -> RawSample | TarProblem:
    return TarProblem(sample.key, sample.problem) if sample.problem else sample


def write_tar(fileobj: IO[bytes], samples: list[tuple[str, dict[str, bytes]]], mtime: float = 0.0) -> int:
    """Write samples as a WebDataset tar (members ``{key}.{ext}``, in the order given). Returns bytes of payload.

    For tests that need exact control over a tar (member order, hostile names or contents, cut or corrupted
    afterwards); shards vlp makes are written with ``webdataset.ShardWriter`` (``vlp.synth.shards``)."""
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
