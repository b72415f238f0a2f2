"""WebDataset tar reading: grouping, skipped members, pickles never loaded, truncated/corrupt archives."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import pickle
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from vlp.data import tario
from vlp.data.tario import RawSample, TarProblem, iter_tar_samples, split_name, write_tar


def tar_bytes(samples, **kw) -> bytes:
    buf = io.BytesIO()
    write_tar(buf, samples, **kw)
    return buf.getvalue()


def read(data: bytes) -> list[RawSample | TarProblem]:
    return list(iter_tar_samples(io.BytesIO(data)))


def summary(items) -> list[tuple]:
    return [("sample", x.key, tuple(sorted(x.members))) if isinstance(x, RawSample) else ("problem", x.key)
            for x in items]


def four_samples() -> list[tuple[str, dict[str, bytes]]]:
    return [(f"s{i}", {"mp4": bytes([i + 1]) * 1000, "txt": b"caption %d" % i}) for i in range(4)]


def member_offsets(data: bytes) -> dict[str, tuple[int, int, int]]:
    """{member name: (header offset, data offset, size)} of a well-formed tar."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {ti.name: (ti.offset, ti.offset_data, ti.size) for ti in tf}


class Evil:
    """Unpickling this creates ``path`` (a harmless stand-in for arbitrary code execution)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ------------------------------------------------------------------------------------------------ naming

@pytest.mark.parametrize("name,expect", [
    ("000123.mp4", ("000123", "mp4")),
    ("a/b/000123.mp4", ("a/b/000123", "mp4")),
    ("x.seg.json", ("x", "seg.json")),
    ("dir.v2/x.JPG", ("dir.v2/x", "jpg")),  # dots in folders do not split; extensions are lower-cased
    ("noext", ("noext", "")),
    (".hidden", ("", "hidden")),
])
def test_split_name(name, expect):
    assert split_name(name) == expect


# ------------------------------------------------------------------------------------------------ good archives

def test_roundtrip_groups_by_key_in_order():
    samples = [("a/001", {"mp4": b"v1", "txt": b"t1", "json": b"{}"}), ("a/002", {"jpg": b"i2", "txt": b"t2"}),
               ("b/001", {"mp4": b"v3", "seg.json": b"[]"})]
    total = write_tar(out := io.BytesIO(), samples)
    assert total == sum(len(v) for _, m in samples for v in m.values())
    got = read(out.getvalue())
    assert [x.key for x in got] == ["a/001", "a/002", "b/001"]
    assert all(isinstance(x, RawSample) for x in got)
    assert got[0].members == {"mp4": b"v1", "txt": b"t1", "json": b"{}"} and got[0].size == 6
    assert got[0].ignored == [] and got[2].members == {"mp4": b"v3"} and got[2].size == 2
    assert got[2].ignored == ["seg.json"]  # no stage reads it: streamed past, listed (not held, not dropped)
    everything = list(iter_tar_samples(io.BytesIO(out.getvalue()), wanted=lambda ext: True))
    assert everything[2].members == {"mp4": b"v3", "seg.json": b"[]"} and everything[2].ignored == []


def test_empty_tar_yields_nothing():
    assert read(tar_bytes([])) == []


def test_gzip_tar():
    assert summary(read(gzip.compress(tar_bytes(four_samples())))) == [
        ("sample", f"s{i}", ("mp4", "txt")) for i in range(4)]


def test_non_adjacent_members_make_separate_samples():
    # WebDataset groups *adjacent* members; a key seen again later is a new sample
    data = tar_bytes([("k", {"mp4": b"v"}), ("j", {"txt": b"t"}), ("k", {"txt": b"t"})])
    assert summary(read(data)) == [("sample", "k", ("mp4",)), ("sample", "j", ("txt",)), ("sample", "k", ("txt",))]


def test_metadata_dirs_and_links_are_skipped():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        def add(name, data=b"x", type_=tarfile.REGTYPE):
            ti = tarfile.TarInfo(name)
            ti.type = type_
            ti.size = len(data) if type_ == tarfile.REGTYPE else 0
            tf.addfile(ti, io.BytesIO(data) if type_ == tarfile.REGTYPE else None)
        add("shard", type_=tarfile.DIRTYPE)
        add("__index__.json", b"{}")
        add("shard/__meta__.txt", b"m")
        add("shard/._001.mp4", b"resource fork")
        add("._001.mp4", b"resource fork")
        add("shard/001.mp4", b"video")
        add("shard/001.txt", b"cap")
        ti = tarfile.TarInfo("shard/001.jpg")
        ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(ti)
    got = read(buf.getvalue())
    assert summary(got) == [("sample", "shard/001", ("mp4", "txt"))]
    assert got[0].members["mp4"] == b"video"


def test_macos_resource_forks_in_folders_do_not_split_samples():
    # macOS tar writes an AppleDouble "._name" member right before each file, in every folder
    members = []
    for key in ("shard/001", "shard/002"):
        for ext in ("mp4", "txt"):
            members += [(f"shard/._{key[-3:]}.{ext}", b"\x00\x05\x16\x07"), (f"{key}.{ext}", ext.encode())]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    got = read(buf.getvalue())
    assert summary(got) == [("sample", "shard/001", ("mp4", "txt")), ("sample", "shard/002", ("mp4", "txt"))]


# ------------------------------------------------------------------------------------------------ pickles

@pytest.mark.parametrize("ext", ["pyd", "pickle", "pkl", "seg.pyd", "PKL"])
def test_pickle_members_are_never_loaded(tmp_path, ext):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(Evil(marker))
    pickle.loads(payload)  # the trap is armed: loading it does create the marker
    assert marker.exists()
    marker.unlink()
    data = tar_bytes([("k", {"mp4": b"v", ext: payload, "txt": b"cap"})])
    got = read(data)
    assert not marker.exists()
    assert len(got) == 1 and isinstance(got[0], RawSample)
    assert got[0].members == {"mp4": b"v", "txt": b"cap"}
    assert got[0].ignored == [ext.lower()] and got[0].size == 4


def test_oversized_member_is_refused_not_read(monkeypatch):
    monkeypatch.setattr(tario, "MAX_MEMBER_BYTES", 100)
    got = read(tar_bytes([("k", {"mp4": b"x" * 101, "txt": b"cap"}), ("j", {"mp4": b"ok", "txt": b"cap"})]))
    assert isinstance(got[0], TarProblem) and got[0].key == "k" and "over the 100 limit" in got[0].reason
    # the sample is reported once (never also used without its media), later samples are read
    assert summary(got[1:]) == [("sample", "j", ("mp4", "txt"))]


# ------------------------------------------------------------------------------------------------ broken archives

def test_cut_mid_member():
    data = tar_bytes(four_samples())
    _, d2, _ = member_offsets(data)["s2.mp4"]
    got = read(data[: d2 + 500])
    assert summary(got) == [("sample", "s0", ("mp4", "txt")), ("sample", "s1", ("mp4", "txt")), ("problem", "s2")]
    assert "truncated or corrupt" in got[-1].reason


def test_cut_mid_member_of_skipped_pickle():
    samples = [("s0", {"mp4": b"v", "txt": b"t"}), ("s1", {"mp4": b"v", "pyd": b"p" * 5000, "txt": b"t"})]
    data = tar_bytes(samples)
    _, d, _ = member_offsets(data)["s1.pyd"]
    assert summary(read(data[: d + 100])) == [("sample", "s0", ("mp4", "txt")), ("problem", "s1")]


def test_cut_in_padding_after_member():
    data = tar_bytes(four_samples())
    _, d, size = member_offsets(data)["s1.txt"]
    got = read(data[: d + size + 3])
    assert summary(got) == [("sample", "s0", ("mp4", "txt")), ("problem", "s1")]


@pytest.mark.parametrize("where", ["at_header", "mid_header"])
def test_cut_at_or_inside_a_header(where):
    """tarfile's stream mode used to end silently here, as if the archive were complete: the cut was
    never reported and the shard looked whole."""
    data = tar_bytes(four_samples())
    h2, _, _ = member_offsets(data)["s2.mp4"]
    got = read(data[: h2 + (0 if where == "at_header" else 100)])
    assert summary(got) == [("sample", "s0", ("mp4", "txt")), ("problem", "s1")]
    assert "end-of-archive" in got[-1].reason


def test_missing_end_of_archive_marker():
    data = tar_bytes(four_samples())
    _, d, size = member_offsets(data)["s3.txt"]
    got = read(data[: d + 512])  # last member complete with its padding, no zero blocks after it
    assert [x.key for x in got] == ["s0", "s1", "s2", "s3"] and isinstance(got[-1], TarProblem)
    assert all(isinstance(x, RawSample) for x in got[:3])


def test_corrupt_header_checksum_is_reported():
    data = bytearray(tar_bytes(four_samples()))
    h2, _, _ = member_offsets(bytes(data))["s2.mp4"]
    data[h2 + 148:h2 + 156] = b"0000000\x00"  # wrong checksum in the (pax) header of s2.mp4
    got = read(bytes(data))
    assert summary(got) == [("sample", "s0", ("mp4", "txt")), ("problem", "s1")]
    assert "checksum" in got[-1].reason


def test_not_a_tar_and_empty_file():
    for data in (b"", b"this is not a tar archive\n" * 40):
        got = read(data)
        assert len(got) == 1 and isinstance(got[0], TarProblem) and got[0].key == "<shard>"
        assert got[0].reason.startswith("tar is truncated or corrupt")


def test_truncated_gzip_tar():
    import os

    samples = [(f"s{i}", {"mp4": os.urandom(3000), "txt": b"c"}) for i in range(6)]  # incompressible
    gz = gzip.compress(tar_bytes(samples))
    got = read(gz[: len(gz) // 2])
    assert isinstance(got[-1], TarProblem) and got[-1].key.startswith("s")
    assert all(isinstance(x, RawSample) and x.members["txt"] == b"c" for x in got[:-1])
    assert 1 <= len(got) - 1 < 6


# ------------------------------------------------------------------------------------------------ what is held

@pytest.mark.parametrize("ext,wanted", [
    ("mp4", True), ("0.jpg", True), ("12.MP4".lower(), True), ("thumb.png", True), ("json", True), ("txt", True),
    ("wav", True),  # audio is read: an audio item
    ("seg.json", False), ("bin", False), ("npy", False), ("cls", False), ("pyd", False), ("", False),
])
def test_wanted_member(ext, wanted):
    assert tario.wanted_member(ext) is wanted


def test_unwanted_members_are_streamed_past_and_listed():
    samples = [("k", {"0.bin": b"\0" * 5000, "mp4": b"v", "npy": b"n" * 3000, "1.jpg": b"i", "txt": b"cap"}),
               ("j", {"cls": b"3", "txt": b"t"})]
    got = read(tar_bytes(samples))
    assert summary(got) == [("sample", "k", ("1.jpg", "mp4", "txt")), ("sample", "j", ("txt",))]
    assert got[0].ignored == ["0.bin", "npy"] and got[0].size == 5 and got[1].ignored == ["cls"]
    # a caller's predicate: everything but captions is skipped (and listed)
    only_txt = list(iter_tar_samples(io.BytesIO(tar_bytes(samples)), wanted=lambda ext: ext == "txt"))
    assert [x.ignored for x in only_txt] == [["0.bin", "mp4", "npy", "1.jpg"], ["cls"]]


def test_sample_over_max_sample_bytes_is_refused():
    samples = [("big", {"txt": b"cap", "0.mp4": b"a" * 60, "1.mp4": b"b" * 60, "2.mp4": b"c" * 60}),
               ("small", {"mp4": b"v" * 90, "txt": b"cap"})]
    got = list(iter_tar_samples(io.BytesIO(tar_bytes(samples)), max_sample_bytes=100))
    assert summary(got) == [("problem", "big"), ("sample", "small", ("mp4", "txt"))]
    assert got[0].reason == ("sample 'big' is over the max_sample_bytes limit of 100 at member big.1.mp4 "
                             "(60 bytes, after 63 bytes of earlier members)")
    assert summary(read(tar_bytes(samples)))[0] == ("sample", "big", ("0.mp4", "1.mp4", "2.mp4", "txt"))  # default


@pytest.mark.parametrize("kind", ["pax", "gnu_longname"])
def test_oversized_extended_header_is_refused(kind):
    """tarfile reads a pax / GNU long-name block whole, whatever size it claims: 2 MiB here, a gigabyte in a
    hostile shard."""
    buf = io.BytesIO()
    fmt = tarfile.PAX_FORMAT if kind == "pax" else tarfile.GNU_FORMAT
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, pax in [("s0.txt", {}), ("s1.txt" if kind == "pax" else "x" * (2 << 20) + ".txt",
                                           {"comment": "x" * (2 << 20)} if kind == "pax" else {})]:
            ti = tarfile.TarInfo(name)
            ti.size, ti.pax_headers = 3, pax
            tf.addfile(ti, io.BytesIO(b"cap"))
    got = read(buf.getvalue())
    assert summary(got) == [("problem", "s0")]  # the sample being read when the header came is lost, as at a cut
    assert f"over the {tario.MAX_HEADER_BYTES} limit" in got[0].reason


# ------------------------------------------------------------------------------------------------ compression

@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress])
def test_compressed_tars_are_read(compress):
    assert summary(read(compress(tar_bytes(four_samples())))) == [
        ("sample", f"s{i}", ("mp4", "txt")) for i in range(4)]


@pytest.mark.parametrize("tool", ["zstd", "lz4"])
def test_zstd_and_lz4_shards_are_refused_by_magic(tmp_path, tool):
    if shutil.which(tool) is None:
        pytest.skip(f"no {tool} command to make the shard with")
    (tmp_path / "s.tar").write_bytes(tar_bytes(four_samples()))
    made = subprocess.run([tool, "-q", "-c", str(tmp_path / "s.tar")], check=True, capture_output=True).stdout
    got = read(made)
    assert len(got) == 1 and got[0].key == "<shard>"
    assert got[0].reason == (f"shard is {tool}-compressed; vlp reads uncompressed WebDataset tars (or gzip, bzip2, "
                             f"xz ones): decompress it first ({tool} -d SHARD)")


@pytest.mark.parametrize("compress", [gzip.compress, lzma.compress])
def test_corrupt_compressed_data_is_a_problem_not_a_crash(compress):
    rnd = random.Random(0)
    samples = [(f"s{i}", {"mp4": rnd.randbytes(3000), "txt": b"c"}) for i in range(4)]  # incompressible
    data = bytearray(compress(tar_bytes(samples)))
    data[len(data) // 2:len(data) // 2 + 64] = bytes(range(64))  # in s2's mp4: zlib.error / LZMAError, not OSError
    got = read(bytes(data))
    assert isinstance(got[-1], TarProblem) and "truncated or corrupt" in got[-1].reason
    assert all(isinstance(x, RawSample) for x in got[:-1])


# ------------------------------------------------------------------------------------------------ bounded memory

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
PEAK_BOUND_MIB = 200  # peak RSS of a whole `vlp inspect` process (Python + imports: ~60 MiB here)


class Zeros:
    """A read-only file of ``n`` zero bytes that never exists whole (tarfile.addfile copies it in chunks)."""

    def __init__(self, n: int):
        self.left = n

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        self.left -= size
        return bytes(size)


def zeros_shard(path: Path, opener, members: list[tuple[str, int]]) -> Path:
    """A compressed tar of members ``(name, size)`` made of zeros, written in a streaming fashion."""
    with opener(path, "wb") as raw, tarfile.open(fileobj=raw, mode="w|", copybufsize=MiB) as tf:
        for name, size in members:
            ti = tarfile.TarInfo(name)
            ti.size = size
            tf.addfile(ti, Zeros(size) if size > 100 else io.BytesIO(b"a caption"[:size]))
    return path


# `vlp inspect` with its peak RSS (VmHWM: of this process image only; wait4's ru_maxrss would count the pages of
# the test process it was forked from) printed last on stderr
WITH_PEAK = ("import atexit, runpy, sys\n"
             "atexit.register(lambda: print(next(x for x in open('/proc/self/status') if x.startswith('VmHWM')), "
             "file=sys.stderr))\n"
             "sys.argv[0] = 'vlp'\n"
             "runpy.run_module('vlp.cli', run_name='__main__')\n")


def inspect_in_a_process(shard: Path, *flags: str) -> tuple[dict, float]:
    """Run ``vlp inspect --json --no-decode`` on ``shard`` as a user would -> (report, peak RSS in MiB)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    p = subprocess.run([sys.executable, "-c", WITH_PEAK, "inspect", "--json", "--no-decode", *flags, str(shard)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    hwm = p.stderr.strip().splitlines()[-1]  # "VmHWM:    61234 kB"
    assert hwm.startswith("VmHWM:") and hwm.endswith("kB"), p.stderr
    return json.loads(p.stdout), int(hwm.split()[1]) / 1024


def test_memory_stays_bounded_with_huge_members_in_a_gzip_shard(tmp_path):
    """The issue's shard, shrunk: four 64 MiB members no stage uses (~1.2 MB gzipped), then a sample whose media
    pass --max-sample-bytes. vlp used to read all of them whole (a peak of ~470 MiB)."""
    shard = zeros_shard(tmp_path / "bomb.tar", lambda p, m: gzip.open(p, m, compresslevel=1), [
        ("big.txt", 9), *[(f"big.{i}.bin", 64 * MiB) for i in range(4)],
        ("fat.txt", 9), *[(f"fat.{i}.mp4", 32 * MiB) for i in range(3)],
        ("ok.txt", 9)])
    rep, peak = inspect_in_a_process(shard, "--max-sample-bytes", str(16 * MiB))
    assert rep["samples"] == 3 and rep["ok"] == 2 and rep["samples_text"] == 2
    assert rep["ignored_members"] == {f"{i}.bin": 1 for i in range(4)}
    [err] = rep["error_records"]
    assert err["key"] == "fat" and err["reason"].startswith(f"sample 'fat' is over the max_sample_bytes limit of "
                                                            f"{16 * MiB} at member fat.0.mp4 ({32 * MiB} bytes")
    assert peak < PEAK_BOUND_MIB, f"peak RSS {peak:.0f} MiB"


def test_memory_stays_bounded_on_a_bzip2_bomb(tmp_path):
    """128 MiB of zeros is 200 bytes of bzip2: tarfile's own decompression (mode r|*, webdataset's) inflates all of
    it from its first 10 KiB read; the bounded decompressor hands out what is asked for."""
    shard = zeros_shard(tmp_path / "bomb.tar", bz2.open, [("b.txt", 9), ("b.bin", 128 * MiB)])
    assert shard.stat().st_size < 10_240
    rep, peak = inspect_in_a_process(shard)
    assert rep["ok"] == 1 and rep["ignored_members"] == {"bin": 1}
    assert peak < PEAK_BOUND_MIB, f"peak RSS {peak:.0f} MiB"


def test_memory_does_not_grow_with_the_member_count():
    """tarfile in stream mode keeps a TarInfo per member read (~0.5 KB each: 50 MiB per 100k members) unless the
    reader lets go of them."""
    import tracemalloc

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|") as tf:
        for i in range(6000):
            tf.addfile(tarfile.TarInfo(f"{i:06d}.cls"), io.BytesIO(b""))
    buf.seek(0)
    samples = iter_tar_samples(buf)
    tracemalloc.start()
    try:
        used = []
        for n in range(5000):  # the tar stays open: the reader is inside it
            next(samples)
            if n in (999, 4999):
                used.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert used[1] - used[0] < 200_000, f"{used[1] - used[0]} bytes more after 4000 more members"
    assert sum(1 for _ in samples) == 1000
