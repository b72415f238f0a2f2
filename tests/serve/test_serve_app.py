"""``vlp serve`` end to end: the Ray Serve application on loopback (a local Ray, the tiny untrained export), driven by
the real ``openai`` client. Every answer is compared with ``vlp chat``'s greedy answer for the same input
(ChatSession in this process, same decoding and encoding); bad requests get their 4xx and OpenAI error body and the
server keeps answering."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import free_port
from media_makers import encode, frames_of, pil_bytes

pytestmark = [pytest.mark.ray, pytest.mark.slow]

KEY = "test-key"
MAX_TOKENS = 8  # the server's default answer length here
LIMITS = {"max_media_bytes": 300_000, "max_request_bytes": 1_000_000, "max_media_items": 4, "max_tokens": 64}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-media")
    (d / "clip.mp4").write_bytes(encode(frames_of(12, seed=1, color="blue", direction="up")))
    (d / "photo.png").write_bytes(pil_bytes(frames_of(1, seed=2, color="green", shape="square")[0], "PNG"))
    (d / "other.jpg").write_bytes(pil_bytes(frames_of(1, seed=3)[0], "JPEG"))
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    return d


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    """The application built by ``vlp serve``'s own code (run_serve, not blocking), torn down after the module."""
    import ray
    from ray import serve

    from vlp.config import validate
    from vlp.serve import ServeConfig
    from vlp.serve.app import run_serve

    started = not ray.is_initialized()
    cfg = validate(ServeConfig, {
        "model": str(export), "model_name": "tiny", "port": free_port(), "api_key": KEY, "max_tokens": MAX_TOKENS,
        "limits": LIMITS, "batch": {"max_batch_size": 4, "batch_wait_timeout_s": 0.5},
        "deployment": {"num_cpus": 0.5}, "ray": {"num_cpus": 2, "progress_bars": False},
        "log_dir": str(tmp_path_factory.mktemp("serve"))})
    url = run_serve(cfg, block=False, log=lambda s: None)
    yield url
    serve.shutdown()
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def chat(export):
    """vlp chat's session on the same export: the reference answers."""
    from vlp.chat import ChatSession

    return ChatSession(str(export))


def chat_answer(session, paths: list, question: str, max_new_tokens: int = MAX_TOKENS) -> str:
    session.load_media([str(p) for p in paths])
    return "".join(session.ask(question, max_new_tokens=max_new_tokens))


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=300)


def data_url(path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def ask(client, content, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **kw)


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def video(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def test_models_and_health(client, server):
    import httpx2 as httpx

    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    h = httpx.get(server.removesuffix("/v1") + "/health").json()  # no key needed
    assert h["status"] == "ok" and h["model"] == "tiny"


def test_text_only(client, chat):
    r = ask(client, "What color is the shape?")
    want = chat_answer(chat, [], "What color is the shape?")
    assert r.choices[0].message.content == want and want
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == MAX_TOKENS
    from vlp.data.conversation import prompt_ids

    n = len(prompt_ids([{"from": "human", "value": "What color is the shape?"}], chat.tok, chat.template))
    assert r.usage.prompt_tokens == n and r.usage.total_tokens == n + MAX_TOKENS


def test_image_data_url(client, chat, media):
    r = ask(client, [image(data_url(media / "photo.png", "image/png")), text("What shape is shown?")])
    assert r.choices[0].message.content == chat_answer(chat, [media / "photo.png"], "What shape is shown?")
    assert r.usage.prompt_tokens > 200  # the image's visual tokens are counted


def test_video_file_path(client, chat, media):
    want = chat_answer(chat, [media / "clip.mp4"], "Which direction does the shape move?")
    r = ask(client, [video(str(media / "clip.mp4")), text("Which direction does the shape move?")])
    assert r.choices[0].message.content == want
    # sent as an image_url part with a file:// URL it is sniffed as the video it is, as vlp chat's --image
    r = ask(client, [image(f"file://{media / 'clip.mp4'}"), text("Which direction does the shape move?")])
    assert r.choices[0].message.content == want


def test_streaming_and_stop(client, chat, media):
    content = [image(data_url(media / "other.jpg", "image/jpeg")), text("Describe it.")]
    want = chat_answer(chat, [media / "other.jpg"], "Describe it.", max_new_tokens=16)
    chunks = list(ask(client, content, stream=True, max_tokens=16, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == want and sum(1 for d in deltas if d) >= 2  # streamed in pieces
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16 and not chunks[-1].choices
    # a stop string cuts the answer (not included) and ends the stream with finish_reason stop
    stop = want.strip()[2:4]
    cut = want[:want.find(stop)]
    chunks = list(ask(client, content, stream=True, max_tokens=16, stop=[stop]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"
    r = ask(client, content, max_tokens=16, stop=stop)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (cut, "stop")


def test_concurrent_clients_are_batched_and_answered_alike(client, chat, media, server):
    """Four clients at once (four threads): each gets vlp chat's answer to its own question; they were decoded in
    batches of more than one."""
    import httpx2 as httpx

    cases = [([], "What color is the shape?"), ([media / "photo.png"], "What color is the shape?"),
             ([], "What shape is shown?"), ([media / "other.jpg"], "Which direction?")]
    wants = [chat_answer(chat, paths, q) for paths, q in cases]

    def one(i: int) -> str:
        paths, q = cases[i]
        parts = [image(data_url(p, "image/png" if p.suffix == ".png" else "image/jpeg")) for p in paths]
        if i % 2:  # streaming and not, mixed in one batch
            return "".join(c.choices[0].delta.content or "" for c in ask(client, parts + [text(q)], stream=True)
                           if c.choices)
        return ask(client, parts + [text(q)]).choices[0].message.content

    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(one, range(4)))
    assert got == wants
    assert httpx.get(server.removesuffix("/v1") + "/health").json()["largest_batch"] >= 2


def error_of(exc) -> dict:
    return exc.body if "error" not in (exc.body or {}) else exc.body["error"]


def test_bad_requests_get_4xx_and_the_server_keeps_serving(client, server, media, chat):
    import httpx2 as httpx
    import openai

    def fails(status: int, code, **kw) -> dict:
        with pytest.raises(openai.APIStatusError) as ei:
            client.chat.completions.create(**{"model": "tiny", **kw})
        err = error_of(ei.value)
        assert ei.value.status_code == status and err["code"] == code, err
        assert set(err) == {"message", "type", "param", "code"}
        return err

    msgs = lambda *parts: [{"role": "user", "content": list(parts)}]  # noqa: E731
    err = fails(404, "model_not_found", model="gpt-4o", messages=msgs(text("hi")))
    assert err["param"] == "model" and "`gpt-4o` does not exist" in err["message"]
    err = fails(422, "invalid_media", messages=msgs(video(str(media / "broken.mp4")), text("what?")))
    assert err["param"] == "messages[0].content[0]" and "broken.mp4" in err["message"]
    err = fails(422, "invalid_media", messages=msgs(image("data:image/png;base64," + base64.b64encode(
        b"not an image at all").decode()), text("what?")))
    big = base64.b64encode(bytes(400_000)).decode()  # over max_media_bytes, under max_request_bytes
    err = fails(413, "media_too_large", messages=msgs(image("data:image/png;base64," + big), text("what?")))
    assert "300000-byte limit" in err["message"]
    many = " ".join(["hello"] * 1200)
    err = fails(400, "context_length_exceeded", messages=msgs(text(many)))
    assert "at most 1024" in err["message"] and err["param"] == "messages"
    fails(400, None, messages=msgs(text("hi")), max_tokens=65)  # over limits.max_tokens
    fails(400, None, messages=msgs(text("hi")), extra_body={"n": 2})
    fails(400, "unsupported_url", messages=msgs(image("https://example.com/cat.jpg"), text("hi")))
    fails(400, None, messages=msgs(image(str(media / "missing.png")), text("hi")))

    url = server + "/chat/completions"
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body, headers, status, code in [
        (b'{"model": "tiny", "messages": [', auth, 400, "invalid_json"),
        (b"\xff\xfe not utf-8", auth, 400, "invalid_json"),
        (b"x" * 1_100_000, auth, 413, "request_too_large"),
        (json.dumps({"model": "tiny", "messages": msgs(text("hi"))}).encode(), {}, 401, "invalid_api_key"),
        (json.dumps({"model": "tiny", "messages": msgs(text("hi"))}).encode(),
         {"Authorization": "Bearer wrong"}, 401, "invalid_api_key"),
    ]:
        r = httpx.post(url, content=body, headers=headers, timeout=60)
        assert r.status_code == status and r.json()["error"]["code"] == code, r.text
    r = httpx.get(server + "/models", timeout=60)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(server + "/nowhere", headers=auth, timeout=60)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.AuthenticationError):
        __import__("openai").OpenAI(base_url=server, api_key="wrong", max_retries=0).models.list()

    # still serving, with the same answers
    r = ask(client, [image(data_url(media / "photo.png", "image/png")), text("What shape is shown?")])
    assert r.choices[0].message.content == chat_answer(chat, [media / "photo.png"], "What shape is shown?")


def browser():
    """Headless Chromium through Selenium (Debian's chromium + chromium-driver); skips when either is absent."""
    import shutil

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver; "
                    "make setup does where apt-get is available)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,900"):
        opts.add_argument(a)
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver))


def test_chat_page_in_a_headless_browser(server, chat, media):
    """The page at /: pick an image, ask, the answer streams in; a second question continues the conversation.
    Both answers are vlp chat's for the same session (its multi-turn ask)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chat.load_media([str(media / "photo.png")])
    wants = ["".join(chat.ask(q, max_new_tokens=MAX_TOKENS)) for q in ("What shape is shown?", "And its color?")]
    drv = browser()
    try:
        drv.get(server.removesuffix("/v1") + "/")
        drv.find_element(By.ID, "key").send_keys(KEY)
        drv.find_element(By.ID, "media").send_keys(str(media / "photo.png"))
        for i, q in enumerate(("What shape is shown?", "And its color?")):
            drv.find_element(By.ID, "question").send_keys(q)
            drv.find_element(By.ID, "send").click()
            WebDriverWait(drv, 180).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".answer[data-done]")) > i
                                          or d.find_elements(By.CSS_SELECTOR, ".error"))
            assert not drv.find_elements(By.CSS_SELECTOR, ".error"), drv.find_element(By.ID, "log").text
        answers = drv.find_elements(By.CSS_SELECTOR, ".answer")
        assert [a.get_attribute("textContent") for a in answers] == wants
        assert all(int(a.get_attribute("data-pieces")) >= 2 for a in answers)  # streamed in pieces
        assert drv.find_element(By.ID, "model").text == "tiny"
        assert [u.text for u in drv.find_elements(By.CSS_SELECTOR, ".user")] == ["What shape is shown?",
                                                                                 "And its color?"]
    finally:
        drv.quit()
