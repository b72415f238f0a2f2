"""The OpenAI chat-completions protocol, without Ray or torch: a request body -> :class:`ChatRequest` (a vlp
conversation whose media parts are numbered slots), OpenAI-style errors, and the response / SSE chunk bodies.

Every problem with a request raises an :class:`APIError` subclass; ``e.status`` is its HTTP status and
``e.body()`` the OpenAI error body ``{"error": {"message", "type", "param", "code"}}``:

======================  ======  ==========================================================
error                   status  when
======================  ======  ==========================================================
:class:`BadRequest`     400     malformed JSON, a field of the wrong type or value, a prompt
                                over the token limit (code ``context_length_exceeded``),
                                media that cannot be read (no such file, scheme not allowed)
:class:`Unauthorized`   401     an API key is configured and the request lacks it
:class:`ModelNotFound`  404     ``model`` is not the served model
:class:`TooLarge`       413     the body or one media item is over its limit
:class:`BadMedia`       422     a media item that no decoder can read as an image or video
======================  ======  ==========================================================
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ..data.conversation import PLACEHOLDER_RE

ROLES = {"system": "system", "developer": "system", "user": "human", "assistant": "gpt"}
MEDIA_PARTS = ("image_url", "video_url")  # OpenAI's image part; the video part as vLLM takes it
MAX_STOPS = 4  # as OpenAI


class APIError(Exception):
    """A request the server refuses; ``status`` is the HTTP status, :meth:`body` the OpenAI error body."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(APIError):
    """400: malformed JSON, a bad field, a prompt over the token limit, media that cannot be fetched."""


class Unauthorized(APIError):
    """401: a key is configured and the request's ``Authorization: Bearer`` does not carry it."""

    status, type = 401, "authentication_error"


class ModelNotFound(APIError):
    """404: the request names another model than the one served."""

    status = 404


class TooLarge(APIError):
    """413: the request body or one media item is over its configured limit."""

    status = 413


class BadMedia(APIError):
    """422: a media item that no decoder can read as an image or a video."""

    status = 422


@dataclass
class MediaRef:
    """One media part of a request: its part type (``image_url`` / ``video_url``), URL and where it stands
    (``messages[i].content[j]``, the ``param`` of errors about it)."""

    kind: str
    url: str
    where: str


# a message's content: text, or the index of a media item in ChatRequest.media
Part = Union[str, int]


@dataclass
class ChatRequest:
    """A parsed, validated chat request. ``turns``: (vlp role ``system``/``human``/``gpt``, parts) in order."""

    model: str
    turns: list[tuple[str, list[Part]]]
    media: list[MediaRef]
    max_tokens: Optional[int] = None  # None: the server's default
    temperature: Optional[float] = None  # None: the server's default
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    seed: Optional[int] = None

    def conversation(self, modalities: list[str]) -> list[dict]:
        """vlp's ``{from, value}`` turns, the k-th media part written as ``<modalities[k]>``. Parts are joined as
        the exports' chat templates join them (``vlp.data.conversation``): text right after a media part starts
        on a new line, so ``[image, "What is it?"]`` is ``"<image>\\nWhat is it?"``, as ``vlp chat`` asks."""
        out = []
        for role, parts in self.turns:
            text, after_media = "", False
            for p in parts:
                if isinstance(p, int):
                    text, after_media = text + f"<{modalities[p]}>", True
                else:
                    text, after_media = text + ("\n" if after_media else "") + p, False
            out.append({"from": role, "value": text})
        return out


def check_auth(authorization: Optional[str], key: Optional[str]) -> None:
    """Unauthorized unless no key is configured or ``authorization`` is ``Bearer <key>``."""
    if not key:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        what = "no API key was given" if not authorization else "the API key is not valid"
        raise Unauthorized(f"{what}; send it as the header `Authorization: Bearer KEY`", code="invalid_api_key")


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object; BadRequest when it is not one."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRequest(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise BadRequest("the request body is nested too deeply to parse", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_json")
    return body


def parse_request(body: dict, served: str, max_media: int, max_tokens_limit: int) -> ChatRequest:
    """A chat-completions body -> ChatRequest, every field checked (APIError on the first problem)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("`model` is required (a string)", param="model")
    if model != served:
        raise ModelNotFound(f"the model `{model}` does not exist; this server serves `{served}`", param="model",
                            code="model_not_found")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("`messages` must be a non-empty list", param="messages")
    media: list[MediaRef] = []
    turns = [parse_message(m, i, media) for i, m in enumerate(msgs)]
    check_turn_order(turns)
    if len(media) > max_media:
        raise BadRequest(f"{len(media)} media parts; at most {max_media} per request", param="messages")
    return ChatRequest(model, turns, media, **sampling_fields(body, max_tokens_limit))


def parse_message(m: Any, i: int, media: list[MediaRef]) -> tuple[str, list[Part]]:
    """One message -> (vlp role, parts); its media parts are appended to ``media`` and named by index."""
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise BadRequest(f"{where} must be an object", param=where)
    role = m.get("role")
    if role not in ROLES:
        raise BadRequest(f"{where}.role must be one of {', '.join(ROLES)} (got {role!r})", param=f"{where}.role")
    content = m.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, str):
        parts: list[Part] = [content]
    elif isinstance(content, list):
        parts = [content_part(p, f"{where}.content[{j}]", media) for j, p in enumerate(content)]
    else:
        raise BadRequest(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    if any(isinstance(p, int) for p in parts) and role != "user":
        raise BadRequest(f"{where}: only user messages may hold media parts", param=f"{where}.content")
    if any(isinstance(p, str) and PLACEHOLDER_RE.search(p) for p in parts):
        raise BadRequest(f"{where}: text may not hold <image>, <video> or <audio>; send media as image_url / "
                         "video_url parts", param=f"{where}.content")
    return ROLES[role], parts


def content_part(p: Any, where: str, media: list[MediaRef]) -> Part:
    """A content part -> its text, or the index of its media item (appended to ``media``)."""
    kind = p.get("type") if isinstance(p, dict) else None
    if kind == "text":
        if not isinstance(p.get("text"), str):
            raise BadRequest(f"{where}.text must be a string", param=f"{where}.text")
        return p["text"]
    if kind not in MEDIA_PARTS:
        raise BadRequest(f"{where}: part type {kind!r} is not supported (text, image_url, video_url)",
                         param=f"{where}.type")
    ref = p.get(kind)
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str) or not url:
        raise BadRequest(f"{where}.{kind}.url must be a non-empty string", param=f"{where}.{kind}.url")
    media.append(MediaRef(kind, url, where))
    return len(media) - 1


def check_turn_order(turns: list[tuple[str, list[Part]]]) -> None:
    """System messages anywhere (the last one counts, as vlp's templates take it); the others alternate from a
    user message to a final user message."""
    roles = [r for r, _ in turns if r != "system"]
    if not roles or roles[0] != "human" or roles[-1] != "human":
        raise BadRequest("the conversation must start and end with a user message", param="messages")
    if any(a == b for a, b in zip(roles, roles[1:])):
        raise BadRequest("user and assistant messages must alternate", param="messages")


def sampling_fields(body: dict, max_tokens_limit: int) -> dict:
    """max_tokens, temperature, top_p, stop, stream, seed (and n, which must be 1), checked."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not is_int(max_tokens) or not 1 <= max_tokens <= max_tokens_limit):
        raise BadRequest(f"max_tokens must be an integer from 1 to {max_tokens_limit} (got {max_tokens!r})",
                         param="max_tokens")
    temperature = number(body, "temperature", 0.0, 2.0)
    top_p = number(body, "top_p", 0.0, 1.0)
    if top_p == 0.0:
        raise BadRequest("top_p must be above 0", param="top_p")
    if body.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported", param="n")
    seed = body.get("seed")
    if seed is not None and not is_int(seed):
        raise BadRequest("seed must be an integer", param="seed")
    stream = body.get("stream", False)
    opts = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(opts, dict):
        raise BadRequest("stream must be true or false, stream_options an object", param="stream")
    return {"max_tokens": max_tokens, "temperature": temperature, "top_p": 1.0 if top_p is None else top_p,
            "stop": stops(body.get("stop")), "stream": stream, "include_usage": bool(opts.get("include_usage")),
            "seed": seed}


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def number(body: dict, key: str, lo: float, hi: float) -> Optional[float]:
    """``body[key]`` as a float in [lo, hi], or None when absent."""
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise BadRequest(f"{key} must be a number from {lo:g} to {hi:g} (got {v!r})", param=key)
    return float(v)


def stops(v: Any) -> list[str]:
    """``stop``: null, a string or a list of up to 4 non-empty strings."""
    if v is None:
        return []
    v = [v] if isinstance(v, str) else v
    if not isinstance(v, list) or len(v) > MAX_STOPS or not all(isinstance(s, str) and s for s in v):
        raise BadRequest(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", param="stop")
    return v


# --------------------------------------------------------------------------------------------- responses
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(cid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
                    created: Optional[int] = None) -> dict:
    """A non-streaming ``chat.completion``."""
    return {"id": cid, "object": "chat.completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(cid: str, model: str, created: int, delta: dict, finish: Optional[str] = None,
               usage_: Optional[dict] = None) -> dict:
    """One ``chat.completion.chunk`` of a stream (no choices, only ``usage``, when ``usage_`` is given)."""
    choices = [] if usage_ is not None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def sse(obj: Optional[dict]) -> bytes:
    """One server-sent event: ``data: {json}``, or ``data: [DONE]`` for None."""
    return b"data: " + (json.dumps(obj).encode() if obj is not None else b"[DONE]") + b"\n\n"


def models_body(model: str, created: int) -> dict:
    return {"object": "list", "data": [model_card(model, created)]}


def model_card(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "vlp"}
