"""Media parts -> bytes within the size limit (vlp.serve.media): data URLs, local files, S3 (moto), refusals."""

from __future__ import annotations

import base64
import io

import pytest

from vlp.serve.config import MediaConfig
from vlp.serve.media import fetch, read_capped
from vlp.serve.protocol import BadRequest, TooLarge
from vlp.storage import StorageConfig

OPEN = MediaConfig()
W = "messages[0].content[0]"


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def test_data_url():
    m = fetch(data_url(b"\x89PNG-bytes"), 100, OPEN, W)
    assert (m.data, m.ext) == (b"\x89PNG-bytes", "png")
    assert fetch(data_url(b"x" * 10, "video/mp4"), 10, OPEN, W).ext == "mp4"
    assert fetch(data_url(b"x", "application/octet-stream"), 10, OPEN, W).ext == ""  # the decoder sniffs


@pytest.mark.parametrize("n", [11, 12, 13, 1000])
def test_data_url_over_the_limit_is_413_before_decoding(n):
    with pytest.raises(TooLarge) as ei:
        fetch(data_url(b"x" * n), 10, OPEN, W)
    assert ei.value.status == 413 and ei.value.code == "media_too_large" and ei.value.param == W


@pytest.mark.parametrize("url, needle", [
    ("data:image/png,rawbytes", "base64"),
    ("data:image/png;base64,@@@@", "not valid base64"),
    ("https://example.com/cat.jpg", "not fetched"),
    ("ftp://host/x.jpg", "unsupported URL scheme"),
])
def test_refused_urls_are_400(url, needle):
    with pytest.raises(BadRequest, match=needle) as ei:
        fetch(url, 100, OPEN, W)
    assert ei.value.param == W


def test_local_files(tmp_path):
    (tmp_path / "a.JPG").write_bytes(b"12345")
    for url in (str(tmp_path / "a.JPG"), f"file://{tmp_path / 'a.JPG'}"):
        m = fetch(url, 5, OPEN, W)
        assert (m.data, m.ext) == (b"12345", "jpg")
    with pytest.raises(TooLarge):
        fetch(str(tmp_path / "a.JPG"), 4, OPEN, W)
    with pytest.raises(BadRequest, match="no such file"):
        fetch(str(tmp_path / "missing.jpg"), 5, OPEN, W)
    with pytest.raises(BadRequest, match="no such file"):
        fetch(str(tmp_path), 5, OPEN, W)  # a folder
    with pytest.raises(BadRequest, match="local files are not allowed"):
        fetch(str(tmp_path / "a.JPG"), 5, MediaConfig(local=False), W)
    inside = MediaConfig(root=str(tmp_path / "media"))
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "b.png").write_bytes(b"b")
    assert fetch(str(tmp_path / "media" / "b.png"), 5, inside, W).data == b"b"
    for outside in (str(tmp_path / "a.JPG"), str(tmp_path / "media" / ".." / "a.JPG")):
        with pytest.raises(BadRequest, match="outside the server's media root"):
            fetch(outside, 5, inside, W)


def test_never_reads_more_than_limit_plus_one():
    class Counting(io.BytesIO):
        asked = []

        def read(self, n=-1):
            self.asked.append(n)
            return super().read(n)

    f = Counting(b"x" * 10_000)
    with pytest.raises(TooLarge):
        read_capped(f, 100, W)
    assert f.asked == [101]


def test_s3(s3_server):
    import boto3

    from conftest import make_bucket

    make_bucket(s3_server, "serve-media")
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").put_object(
        Bucket="serve-media", Key="clips/a.mp4", Body=b"0123456789")
    st = StorageConfig(endpoint_url=s3_server)
    m = fetch("s3://serve-media/clips/a.mp4", 10, OPEN, W, st)
    assert (m.data, m.ext, m.name) == (b"0123456789", "mp4", "s3://serve-media/clips/a.mp4")
    with pytest.raises(TooLarge):
        fetch("s3://serve-media/clips/a.mp4", 9, OPEN, W, st)
    with pytest.raises(BadRequest, match="no such object"):
        fetch("s3://serve-media/clips/b.mp4", 10, OPEN, W, st)
    with pytest.raises(BadRequest, match="s3:// media are not allowed"):
        fetch("s3://serve-media/clips/a.mp4", 10, MediaConfig(s3=False), W, st)
