"""WebDataset tar reading: grouping, skipped members, pickles never loaded, truncated/corrupt archives."""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile

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
    assert got[2].members == {"mp4": b"v3", "seg.json": b"[]"} and got[0].ignored == []


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
