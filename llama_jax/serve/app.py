"""The OpenAI-compatible HTTP API over an `Engine`, with FastAPI.

    POST /v1/completions, POST /v1/chat/completions (`stream: true`: server-sent events ending in
    `data: [DONE]`), GET /v1/models, GET /health (503 {"status": "starting"} while the engine compiles),
    GET /metrics (Prometheus text, `metrics.py`)

Handlers turn a request into engine requests (`exchange.py`), submit them and wait for their events; the engine's
own thread runs the model, and tokenizing runs in a worker thread, so nothing a request does blocks the event loop
(`/health` answers at once under any load). A request's `model` is the base model's name or one of its LoRA
adapters' (`--lora-modules`): requests to different adapters share the engine's steps. A client that goes away
mid-stream cancels its requests: their slots are free at the engine's next step. Every refusal is an OpenAI-style
error body: 400 for a bad request (an unsupported field named), 401 without the API key, 413 for a body over 1 MiB
however it is sent, 429 when the queue is full, 503 while the server is still starting. Each request leaves one
access-log line: its id, path, status, tokens in and out, time to first token, duration, finish reasons (its prompt
only with `log_prompts`).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from llama_jax.chat import encode_dialog
from llama_jax.inference.engine import Engine
from llama_jax.inference.types import EngineStatus
from llama_jax.serve import tools
from llama_jax.serve.exchange import Exchange, Refused, access_log, served_model
from llama_jax.serve.metrics import CONTENT_TYPE, ServerMetrics
from llama_jax.serve.protocol import ChatRequest, CompletionRequest, error_body

MAX_BODY_BYTES = 1 << 20
__all__ = ["access_log", "create_app"]


def create_app(
    engine: Engine,
    model_name: str,
    chat_template: str | None,
    api_key: str | None = None,
    log_prompts: bool = False,
    request_timeout: float | None = None,
) -> FastAPI:
    """The app over `engine` (started by the caller): handlers submit requests and read its status. Requests
    name `model_name` for the base model, or one of `engine.adapters`; one still running `request_timeout`
    seconds after it arrived is ended with a timeout error (408, or an error event in its stream)."""
    app = FastAPI(title="llama_jax", docs_url=None, redoc_url=None)
    metrics = ServerMetrics(engine.status, model_name)
    _guard(app, engine.status, api_key)
    _refuse_as_openai_does(app)
    _status_routes(app, engine.status, metrics, (model_name, *engine.adapters))
    _generation_routes(app, engine, metrics, model_name, chat_template, log_prompts, request_timeout)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    return app


def _guard(app: FastAPI, status: Callable[[], EngineStatus], api_key: str | None) -> None:
    """/v1/ requests wait for the engine's programs (503) and need the API key (401)."""

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if path.startswith("/v1/"):
            now = status()
            if not now.ready:
                message = (
                    f"the server is starting: {len(now.compiled)} of {len(now.programs)} programs compiled; "
                    "retry when /health says ok"
                )
                return _logged(path, _error(503, message))
        if path.startswith("/v1/") and api_key is not None:
            if not secrets.compare_digest(request.headers.get("authorization", ""), f"Bearer {api_key}"):
                message = "missing or wrong API key: send Authorization: Bearer KEY"
                return _logged(path, _error(401, message, kind="authentication_error", code="invalid_api_key"))
        response = await call_next(request)
        return _logged(path, response) if path.startswith("/v1/") and response.status_code != 200 else response


def _refuse_as_openai_does(app: FastAPI) -> None:
    """Bad bodies and refused requests as OpenAI-style error bodies; a field the server lacks is named."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        if first["type"] in ("extra_forbidden", "literal_error") and where:
            value = json.dumps(first.get("input"))[:40]
            return _error(400, f"{where} = {value} is not supported by this server", param=where)
        message = first["msg"].removeprefix("Value error, ")
        return _error(400, f"{where}: {message}" if where else message, param=where or None)

    @app.exception_handler(Refused)
    async def refused(request: Request, error: Refused):
        return _error(error.status, error.message, param=error.param, code=error.code)


def _status_routes(
    app: FastAPI, status: Callable[[], EngineStatus], metrics: ServerMetrics, served: tuple[str, ...]
) -> None:
    @app.get("/health")
    async def health():
        now = status()
        if not now.ready:  # compiling its programs: the first requests would wait for them (vLLM's 503)
            body = {"status": "starting", "compiled": len(now.compiled), "programs": len(now.programs)}
            return JSONResponse(body, status_code=503)
        return {
            "status": "ok",
            "compiled": len(now.compiled),
            "programs": len(now.programs),
            "slots": now.max_num_seqs,
            "running": now.running,
            "waiting": now.waiting,
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        # An adapter names its base as its parent, as vLLM lists LoRA modules.
        base = {"id": served[0], "object": "model", "owned_by": "llama_jax", "created": 0}
        adapters = [{**base, "id": name, "parent": served[0]} for name in served[1:]]
        return {"object": "list", "data": [base, *adapters]}


def _generation_routes(
    app: FastAPI,
    engine: Engine,
    metrics: ServerMetrics,
    model_name: str,
    chat_template: str | None,
    log_prompts: bool,
    request_timeout: float | None,
) -> None:
    tokenizer = engine.tokenizer

    def exchange(path: str, body) -> Exchange:
        adapter = served_model(body.model, model_name, engine.adapters)
        chat = isinstance(body, ChatRequest)
        shown = [m.model_dump(exclude_none=True) for m in body.messages] if chat else body.prompts
        shown = shown if log_prompts else None
        return Exchange(engine, metrics, body.model, adapter, path, body, shown, request_timeout)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        call = exchange("/v1/completions", body)
        prompts = await asyncio.to_thread(lambda: [tokenizer.encode(text, bos=True) for text in body.prompts])
        return await call.respond(prompts, logprobs=body.logprobs is not None)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        call = exchange("/v1/chat/completions", body)
        if chat_template is None:
            raise Refused(400, f"model {model_name} has no chat template; use /v1/completions", "messages")
        try:
            messages = tools.chat_messages(body)
            definitions = tools.tools_for_template(body)
            prompt = await asyncio.to_thread(encode_dialog, tokenizer, chat_template, messages, definitions)
        except ValueError as e:
            raise Refused(400, str(e), "tools" if "tool" in str(e) else "messages") from None
        return await call.respond([prompt], logprobs=body.logprobs)


class BodyLimit:
    """ASGI middleware: a /v1/ request body is read whole before the app sees it, and refused with 413 as soon
    as it passes `limit` bytes — however it is sent, with a Content-Length or in chunks — or with 400 when it is
    not UTF-8 text."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        size = headers.get(b"content-length", b"").decode("latin-1")
        too_big = _error(413, f"request bodies are limited to {self.limit} bytes")
        if size and (not size.isdigit() or int(size) > self.limit):
            return await _logged(scope["path"], too_big)(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                return await _logged(scope["path"], too_big)(scope, receive, send)
            if not message.get("more_body"):
                break
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            response = _error(400, f"the body is not valid UTF-8 text ({e.reason} at byte {e.start})")
            return await _logged(scope["path"], response)(scope, receive, send)
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()  # a disconnect, for a streaming response
            delivered = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


def _logged(path: str, response: Response) -> Response:
    """A refusal's access-log line: no request id yet, the path and the status."""
    access_log.info(f"- {path} {response.status_code}")
    return response


def _error(
    status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)
