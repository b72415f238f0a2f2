"""A replica's work without Ray (vlp.serve.engine): requests -> jobs (media encoded as vlp chat does, tokens counted
and limited), the batch step decoding several jobs in lockstep with vlp chat's answers, and an s3:// export."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from media_makers import encode, frames_of, pil_bytes
from vlp.config import validate
from vlp.serve.config import ServeConfig
from vlp.serve.protocol import BadMedia, BadRequest, TooLarge, parse_request


@pytest.fixture(scope="module")
def engine(export):
    from vlp.serve.engine import Engine

    return Engine(validate(ServeConfig, {"model": str(export), "model_name": "tiny", "max_tokens": 6,
                                         "limits": {"max_media_bytes": 100_000}}))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine-media")
    (d / "clip.mp4").write_bytes(encode(frames_of(10, seed=4)))
    (d / "photo.png").write_bytes(pil_bytes(frames_of(1, seed=5)[0], "PNG"))
    return d


def request(content, **kw):
    return parse_request({"model": "tiny", "messages": [{"role": "user", "content": content}], **kw}, "tiny", 4, 64)


def run(engine, jobs) -> list[tuple[str, str, int]]:
    """Every job's (text, finish reason, completion tokens) from the batch step."""
    texts, ends = [""] * len(jobs), [None] * len(jobs)
    for step in engine.stream_batch(jobs):
        assert len(step) == len(jobs)
        for i, d in enumerate(step):
            if d is None:
                assert ends[i] is not None  # None only after the final Delta
                continue
            assert ends[i] is None
            texts[i] += d.text
            if d.finish:
                ends[i] = (d.finish, d.completion_tokens)
    return [(t, *e) for t, e in zip(texts, ends)]


def test_batch_of_jobs_answers_as_vlp_chat(engine, files, export):
    from vlp.chat import ChatSession

    chat = ChatSession(str(export))
    cases = [("What color?", []), ("What shape?", [files / "photo.png"]), ("Where does it go?", [files / "clip.mp4"])]
    jobs = [engine.prepare(request([{"type": "video_url", "video_url": {"url": str(p)}} for p in paths]
                                   + [{"type": "text", "text": q}])) for q, paths in cases]
    assert [[it.modality for it in j.items] for j in jobs] == [[], ["image"], ["video"]]
    wants = []
    for q, paths in cases:
        chat.load_media([str(p) for p in paths])
        wants.append("".join(chat.ask(q, max_new_tokens=6)))
    assert run(engine, jobs) == [(w, "length", 6) for w in wants]


def test_stop_cancels_its_job_only(engine):
    full = run(engine, [engine.prepare(request("What color?", max_tokens=12))])[0][0]
    stop = full.strip()[1:3]
    a = engine.prepare(request("What color?", max_tokens=12, stop=stop))
    b = engine.prepare(request("Hi", max_tokens=12))
    (ta, fa, na), (tb, fb, nb) = run(engine, [a, b])
    assert (ta, fa) == (full[:full.find(stop)], "stop") and na < 12 and a.cancelled
    assert (fb, nb) == ("length", 12)


def test_token_limits(engine):
    n = engine.prepare(request("Hi")).prompt_tokens
    assert engine.prepare(request("Hi")).max_tokens == 6  # the server's default
    with pytest.raises(BadRequest) as ei:
        engine.prepare(request(" ".join(["hello"] * 1200)))
    assert ei.value.code == "context_length_exceeded"
    engine.prompt_limit = n - 1  # limits.max_prompt_tokens below the prompt
    try:
        with pytest.raises(BadRequest, match=f"the prompt is {n} tokens"):
            engine.prepare(request("Hi"))
    finally:
        engine.prompt_limit = engine.positions
    assert engine.budget(engine.positions - 3, None) == 3  # the default answer is cut to the room left
    with pytest.raises(BadRequest, match="asks for"):
        engine.budget(engine.positions - 3, 4)


def test_media_errors(engine, files):
    bad = "data:video/mp4;base64," + base64.b64encode(b"garbage" * 100).decode()
    with pytest.raises(BadMedia) as ei:
        engine.prepare(request([{"type": "image_url", "image_url": {"url": bad}}]))
    assert ei.value.status == 422 and ei.value.param == "messages[0].content[0]"
    big = "data:image/png;base64," + base64.b64encode(bytes(100_001)).decode()
    with pytest.raises(TooLarge):
        engine.prepare(request([{"type": "image_url", "image_url": {"url": big}}]))


def test_export_on_s3_is_copied_once(export, s3_server, tmp_path, monkeypatch):
    import boto3

    from conftest import make_bucket
    from vlp.storage import StorageConfig, localize

    monkeypatch.setenv("VLP_CACHE", str(tmp_path / "cache"))
    make_bucket(s3_server, "serve-models")
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for f in export.rglob("*"):
        if f.is_file():
            s3.upload_file(str(f), "serve-models", f"runs/tiny/export/{f.relative_to(export).as_posix()}")
    st = StorageConfig(endpoint_url=s3_server)
    local = localize("s3://serve-models/runs/tiny/export", st)
    got = sorted(p.relative_to(local).as_posix() for p in Path(local).rglob("*") if p.is_file() and p.name != ".complete")
    assert got == sorted(f.relative_to(export).as_posix() for f in export.rglob("*") if f.is_file())
    assert localize("s3://serve-models/runs/tiny/export", st) == local  # cached
    from vlp.formats.export import load_model

    load_model(local)
    assert localize(str(export)) == str(export)
