"""vlp serve's request parsing, validation and error bodies, without Ray or a model (vlp.serve.protocol)."""

from __future__ import annotations

import json

import pytest

from vlp.serve.protocol import (APIError, BadMedia, BadRequest, ModelNotFound, TooLarge, Unauthorized, check_auth,
                                chunk_body, completion_body, parse_body, parse_request, sse)

M = "stage2"


def req(messages, **kw):
    return parse_request({"model": M, "messages": messages, **kw}, M, max_media=4, max_tokens_limit=100)


def user(*parts):
    return {"role": "user", "content": list(parts)}


def img(url="data:image/png;base64,AAAA"):
    return {"type": "image_url", "image_url": {"url": url}}


def test_text_and_media_parts_become_a_vlp_conversation():
    r = req([{"role": "system", "content": "Be brief."},
             user(img(), {"type": "text", "text": "What is it?"}),
             {"role": "assistant", "content": "A shape."},
             user({"type": "text", "text": "And this?"}, {"type": "video_url", "video_url": {"url": "/v.mp4"}})])
    assert [(m.kind, m.url, m.where) for m in r.media] == [
        ("image_url", "data:image/png;base64,AAAA", "messages[1].content[0]"),
        ("video_url", "/v.mp4", "messages[3].content[1]")]
    # the k-th media part is written as the modality its decoder found, joined as the exports' chat templates join
    assert r.conversation(["image", "video"]) == [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image>\nWhat is it?"},
        {"from": "gpt", "value": "A shape."}, {"from": "human", "value": "And this?<video>"}]
    # a video sent as an image_url part is a video (the decoder sniffs, as vlp chat's --image/--video)
    assert req([user(img(), img())]).conversation(["video", "image"]) == [{"from": "human", "value": "<video><image>"}]


def test_sampling_fields_defaults_and_values():
    r = req([{"role": "user", "content": "hi"}])
    assert (r.max_tokens, r.temperature, r.top_p, r.stop, r.stream, r.include_usage, r.seed) == (
        None, None, 1.0, [], False, False, None)
    r = req([{"role": "user", "content": "hi"}], max_tokens=7, temperature=0.5, top_p=0.9, stop="\n", stream=True,
            stream_options={"include_usage": True}, seed=3)
    assert (r.max_tokens, r.temperature, r.top_p, r.stop, r.stream, r.include_usage, r.seed) == (
        7, 0.5, 0.9, ["\n"], True, True, 3)
    assert req([{"role": "user", "content": "hi"}], max_completion_tokens=5, max_tokens=9).max_tokens == 5
    assert req([{"role": "user", "content": "hi"}], stop=["a", "bc"]).stop == ["a", "bc"]


@pytest.mark.parametrize("body, param, needle", [
    ({"messages": [{"role": "user", "content": "x"}]}, "model", "`model` is required"),
    ({"model": M}, "messages", "non-empty list"),
    ({"model": M, "messages": []}, "messages", "non-empty list"),
    ({"model": M, "messages": ["x"]}, "messages[0]", "must be an object"),
    ({"model": M, "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "must be one of"),
    ({"model": M, "messages": [{"role": "user", "content": 3}]}, "messages[0].content", "string or a list"),
    ({"model": M, "messages": [user({"type": "input_audio"})]}, "messages[0].content[0].type", "not supported"),
    ({"model": M, "messages": [user({"type": "text", "text": 1})]}, "messages[0].content[0].text", "must be a str"),
    ({"model": M, "messages": [user({"type": "image_url", "image_url": {}})]}, "messages[0].content[0].image_url.url",
     "non-empty string"),
    ({"model": M, "messages": [{"role": "user", "content": "<image> what?"}]}, "messages[0].content", "<image>"),
    ({"model": M, "messages": [{"role": "assistant", "content": "x"}]}, "messages", "start and end with a user"),
    ({"model": M, "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "messages",
     "alternate"),
    ({"model": M, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [img()]},
                               {"role": "user", "content": "b"}]}, "messages[1].content", "only user messages"),
    ({"model": M, "messages": [user(*[img()] * 5)]}, "messages", "at most 4"),
    ({"model": M, "messages": [user()], "max_tokens": 0}, "max_tokens", "from 1 to 100"),
    ({"model": M, "messages": [user()], "max_tokens": 101}, "max_tokens", "from 1 to 100"),
    ({"model": M, "messages": [user()], "max_tokens": True}, "max_tokens", "integer"),
    ({"model": M, "messages": [user()], "temperature": 3}, "temperature", "from 0 to 2"),
    ({"model": M, "messages": [user()], "temperature": "hot"}, "temperature", "number"),
    ({"model": M, "messages": [user()], "top_p": 0}, "top_p", "above 0"),
    ({"model": M, "messages": [user()], "n": 2}, "n", "n=1"),
    ({"model": M, "messages": [user()], "stop": ["a"] * 5}, "stop", "at most 4"),
    ({"model": M, "messages": [user()], "stop": [""]}, "stop", "non-empty"),
    ({"model": M, "messages": [user()], "stream": "yes"}, "stream", "true or false"),
    ({"model": M, "messages": [user()], "seed": 1.5}, "seed", "integer"),
])
def test_bad_requests_are_400_naming_the_field(body, param, needle):
    with pytest.raises(BadRequest) as ei:
        parse_request(body, M, max_media=4, max_tokens_limit=100)
    e = ei.value
    assert e.status == 400 and e.param == param and needle in e.message, (e.param, e.message)
    assert e.body() == {"error": {"message": e.message, "type": "invalid_request_error", "param": param,
                                  "code": e.code}}


def test_unknown_model_is_404_model_not_found():
    with pytest.raises(ModelNotFound) as ei:
        parse_request({"model": "gpt-4o", "messages": [user()]}, M, 4, 100)
    assert ei.value.status == 404
    assert ei.value.body()["error"] == {"message": "the model `gpt-4o` does not exist; this server serves `stage2`",
                                        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}


@pytest.mark.parametrize("raw", [b"{nope", b"\xff\xfe", b"[1, 2]", b"\"text\"", b"[" * 100000])
def test_malformed_json_is_400(raw):
    with pytest.raises(BadRequest) as ei:
        parse_body(raw)
    assert ei.value.code == "invalid_json" and ei.value.status == 400


def test_error_statuses_and_types():
    assert [c("m").status for c in (BadRequest, Unauthorized, ModelNotFound, TooLarge, BadMedia)] == [
        400, 401, 404, 413, 422]
    assert Unauthorized("m").body()["error"]["type"] == "authentication_error"
    assert all(issubclass(c, APIError) for c in (BadRequest, Unauthorized, ModelNotFound, TooLarge, BadMedia))


def test_api_key():
    check_auth(None, None)  # no key configured: anything goes
    check_auth("Bearer whatever", None)
    check_auth("Bearer s3cret", "s3cret")
    check_auth("bearer s3cret", "s3cret")
    for header in (None, "", "Bearer", "Bearer wrong", "Basic s3cret", "s3cret"):
        with pytest.raises(Unauthorized) as ei:
            check_auth(header, "s3cret")
        assert ei.value.status == 401 and ei.value.code == "invalid_api_key"
    with pytest.raises(Unauthorized, match="no API key was given"):
        check_auth(None, "k")


def test_response_bodies():
    c = completion_body("chatcmpl-1", M, "Red.", "stop", 10, 2, created=5)
    assert c == {"id": "chatcmpl-1", "object": "chat.completion", "created": 5, "model": M,
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "Red."}, "logprobs": None,
                              "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}}
    ch = chunk_body("chatcmpl-1", M, 5, {"content": "R"})
    assert ch["object"] == "chat.completion.chunk" and ch["choices"][0]["delta"] == {"content": "R"}
    u = chunk_body("chatcmpl-1", M, 5, {}, usage_={"prompt_tokens": 1})
    assert u["choices"] == [] and u["usage"] == {"prompt_tokens": 1}
    assert sse({"a": 1}) == b'data: {"a": 1}\n\n' and sse(None) == b"data: [DONE]\n\n"
    assert json.loads(sse(ch)[len(b"data: "):]) == ch
