"""``vlp serve``: the Ray Serve application. One deployment (:class:`ChatServer`, FastAPI ingress) whose replicas
each hold the export (:class:`vlp.serve.engine.Engine`) and batch their clients' requests with ``@serve.batch``.

Routes (under the config's ``route_prefix``):

- ``POST /v1/chat/completions``: OpenAI chat completions, streaming (SSE) or not
- ``GET /v1/models``, ``GET /v1/models/{id}``: the served model
- ``GET /health``: ``{"status": "ok", ...}`` once the replica has loaded the model (no key needed)
- ``GET /``: the chat page (vlp.serve.page; the config's ``page: false`` turns it off)

Entry points: ``vlp serve --config FILE`` (:func:`run_serve`), ``serve run vlp.serve.app:build config=FILE`` and
a Serve config's ``import_path: vlp.serve.app:build`` (:func:`build`).

No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations (``Request``) at runtime.
"""

import asyncio
import json
import time
from functools import partial
from pathlib import Path
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import load_config, validate
from ..storage import is_remote
from .config import ServeConfig
from .engine import Engine, Job
from .page import PAGE
from .protocol import (APIError, BadRequest, ModelNotFound, TooLarge, check_auth, chunk_body, completion_body,
                       completion_id, model_card, models_body, parse_body, parse_request, sse, usage)

api = FastAPI(title="vlp serve", docs_url=None, redoc_url=None, openapi_url=None)


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@api.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes (404), wrong methods (405): OpenAI error bodies too."""
    e = APIError(f"{request.method} {request.url.path}: {exc.detail}", code="not_found" if exc.status_code == 404
                 else None)
    e.status = exc.status_code
    return error_response(e)


@api.exception_handler(RequestValidationError)
async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(BadRequest(f"invalid request: {exc.errors()}"))


@api.exception_handler(Exception)
async def server_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug or a failure of the replica (not of the request): 500 with an OpenAI body; the replica keeps serving."""
    e = APIError(f"internal error: {type(exc).__name__}: {exc}")
    e.status, e.type = 500, "server_error"
    return error_response(e)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (TooLarge) as soon as it is over ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the request body is {declared} bytes, over the {limit}-byte limit", code="request_too_large")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise TooLarge(f"the request body is over the {limit}-byte limit", code="request_too_large")
    return bytes(buf)


@serve.deployment(name="VLPChat")
@serve.ingress(api)
class ChatServer:
    """One replica: the export on the config's device, its clients' requests batched across clients."""

    def __init__(self, cfg: dict):
        self.cfg = validate(ServeConfig, cfg, "vlp serve")
        self.key = self.cfg.resolve_api_key()
        self.engine = Engine(self.cfg)
        self.created = int(time.time())
        self.batches, self.largest_batch = 0, 0
        self.generate_batch.set_max_batch_size(self.cfg.batch.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.cfg.batch.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate_batch(self, jobs: list[Job]) -> AsyncIterator[list]:
        """The jobs that arrived together, decoded together (Engine.stream_batch, its steps run off the event
        loop): per step one Delta per job; StopAsyncIteration ends a job's stream."""
        self.batches, self.largest_batch = self.batches + 1, max(self.largest_batch, len(jobs))
        steps = self.engine.stream_batch(jobs)
        while (step := await asyncio.to_thread(next, steps, None)) is not None:
            yield [d if d is not None else StopAsyncIteration for d in step]

    @api.get("/")
    async def page(self, request: Request):
        if not self.cfg.page:
            return await http_error(request, StarletteHTTPException(404, "Not Found"))
        return HTMLResponse(PAGE)

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.engine.name, "batches": self.batches,
                "largest_batch": self.largest_batch}

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            check_auth(request.headers.get("authorization"), self.key)
        except APIError as e:
            return error_response(e)
        return models_body(self.engine.name, self.created)

    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request):
        try:
            check_auth(request.headers.get("authorization"), self.key)
            if model_id != self.engine.name:
                raise ModelNotFound(f"the model `{model_id}` does not exist", param="model", code="model_not_found")
        except APIError as e:
            return error_response(e)
        return model_card(self.engine.name, self.created)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        try:
            check_auth(request.headers.get("authorization"), self.key)
            lim = self.cfg.limits
            body = parse_body(await read_body(request, lim.max_request_bytes))
            req = parse_request(body, self.engine.name, lim.max_media_items, lim.max_tokens)
            job = await asyncio.to_thread(self.engine.prepare, req)  # media decoding and encoding: off the loop
        except APIError as e:
            return error_response(e)
        if req.stream:
            return StreamingResponse(self.events(job, req.include_usage), media_type="text/event-stream")
        return await self.complete(job)

    async def complete(self, job: Job) -> dict:
        """A non-streaming answer: the whole text, its finish reason and usage."""
        text, finish, n = "", "stop", 0
        try:
            async for d in self.generate_batch(job):  # to its end: the batch ends each stream after its final Delta
                text += d.text
                if d.finish:
                    finish, n = d.finish, d.completion_tokens
        finally:  # also when the request is cancelled (the client went away): decode no further for it
            job.cancelled = True
        return completion_body(completion_id(), self.engine.name, text, finish, job.prompt_tokens, n)

    async def events(self, job: Job, include_usage: bool) -> AsyncIterator[bytes]:
        """The answer as SSE ``chat.completion.chunk`` events, then ``data: [DONE]``. A client that goes away
        cancels its job (the batch decodes no further for it)."""
        chunk = partial(chunk_body, completion_id(), self.engine.name, int(time.time()))
        try:
            yield sse(chunk({"role": "assistant", "content": ""}))
            async for d in self.generate_batch(job):  # to its end (as in complete)
                if d.text:
                    yield sse(chunk({"content": d.text}))
                if d.finish:
                    yield sse(chunk({}, d.finish))
                    if include_usage:
                        yield sse(chunk({}, usage_=usage(job.prompt_tokens, d.completion_tokens)))
                    yield sse(None)
        finally:
            job.cancelled = True


def app_for(cfg: ServeConfig):
    """The Serve application of a config: the deployment with its replicas/autoscaling, resources and limits,
    bound to the config (a local model path made absolute where the application is built)."""
    if not is_remote(cfg.model):
        cfg = cfg.model_copy(update={"model": str(Path(cfg.model).expanduser().resolve())})
    return ChatServer.options(**cfg.deployment_options()).bind(cfg.model_dump(mode="json"))


def config_from_args(args: Optional[dict]) -> ServeConfig:
    """``serve run vlp.serve.app:build config=FILE key=value ...`` / a Serve config's ``args``: ``config`` is a
    ``serve*.yaml`` file, every other key a dotted override of it (strings as on vlp's command line)."""
    args = dict(args or {})
    path = args.pop("config", None)
    overrides = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in args.items()]
    return load_config(ServeConfig, path, overrides)


def build(args: Optional[dict] = None):
    """The application builder: ``serve run vlp.serve.app:build config=configs/local/serve.yaml``."""
    return app_for(config_from_args(args))


def run_serve(cfg: ServeConfig, block: bool = True, log=print) -> str:
    """``vlp serve``: Ray (local, or the cluster of ``ray.address``), Serve's HTTP proxy on ``host:port``, the
    application; with ``block``, serve until Ctrl-C, then take the application down. -> the base URL (…/v1)."""
    from ..formats.export import ExportInfo
    from ..runlog import ray_output

    if not is_remote(cfg.model) and not cfg.ray.address:
        ExportInfo.read(cfg.model)  # NotAnExport / ExportFormatError before Ray starts
    if cfg.api_key_env and not cfg.ray.address:
        cfg.resolve_api_key()  # MissingKey now, not as a replica that never starts
    with ray_output(cfg.log_dir, cfg.ray.verbose, cfg.storage, log) as log:  # <log_dir>/logs/ray.log
        return serve_app(cfg, block, log)


def serve_app(cfg: ServeConfig, block: bool, log) -> str:
    """:func:`run_serve` after its checks: Ray, Serve, the application; with ``block``, until Ctrl-C."""
    import ray

    from ..runlog import gate_ray_loggers
    from ..runtime import init_ray

    started = not ray.is_initialized()
    init_ray(cfg.ray, log=log)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(app_for(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    gate_ray_loggers()  # Serve's loggers, should it have configured more
    url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/v1"
    log(f"[vlp] serve: model {cfg.served_model()} at {url} (OpenAI API; GET {url[:-3]}/health)")
    if not block:
        return url
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log("[vlp] serve: shutting down")
    finally:
        serve.delete(cfg.app_name)
        if started:
            serve.shutdown()
            ray.shutdown()
    return url
