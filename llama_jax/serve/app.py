"""The OpenAI-compatible HTTP API over an `Engine`, with FastAPI.

    POST /v1/completions, POST /v1/chat/completions (`stream: true`: server-sent events ending in
    `data: [DONE]`), GET /v1/models, GET /health (503 {"status": "starting"} while the engine compiles),
    GET /metrics (Prometheus text, `metrics.py`)

Handlers turn a request into engine requests, submit them and wait for their events; the engine's own
thread runs the model, and tokenizing runs in a worker thread, so nothing a request does blocks the event loop
(`/health` answers at once under any load). A client that goes away mid-stream cancels its requests: their
slots are free at the engine's next step. Every refusal is an OpenAI-style error body: 400 for a bad request
(an unsupported field named), 401 without the API key, 413 for a body over 1 MiB however it is sent, 429 when
the queue is full, 503 while the server is still starting. Each request leaves one access-log line: its id,
path, status, tokens in and out, time to first token, duration, finish reasons (its prompt only with
`log_prompts`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llama_jax.chat import encode_dialog
from llama_jax.inference.engine import Engine
from llama_jax.inference.sampling import SamplingParams
from llama_jax.inference.types import EngineStatus, Event, QueueFull, make_request
from llama_jax.inference.types import Request as EngineRequest
from llama_jax.serve import protocol
from llama_jax.serve.metrics import CONTENT_TYPE, ServerMetrics
from llama_jax.serve.protocol import ChatRequest, CompletionRequest, error_body

MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_TOKENS = 256
access_log = logging.getLogger("llama_jax.access")


class _Refused(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def create_app(
    engine: Engine, model_name: str, chat_template: str | None, api_key: str | None = None, log_prompts: bool = False
) -> FastAPI:
    """The app over `engine` (started by the caller): handlers submit requests and read its status."""
    app = FastAPI(title="llama_jax", docs_url=None, redoc_url=None)
    metrics = ServerMetrics(engine.status, model_name)
    _guard(app, engine.status, api_key)
    _refuse_as_openai_does(app)
    _status_routes(app, engine.status, metrics, model_name)
    _generation_routes(app, engine, metrics, model_name, chat_template, log_prompts)
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

    @app.exception_handler(_Refused)
    async def refused(request: Request, error: _Refused):
        return _error(error.status, error.message, param=error.param, code=error.code)


def _status_routes(app: FastAPI, status: Callable[[], EngineStatus], metrics: ServerMetrics, model_name: str) -> None:
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
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "owned_by": "llama_jax", "created": 0}],
        }


def _generation_routes(
    app: FastAPI, engine: Engine, metrics: ServerMetrics, model_name: str, chat_template: str | None, log_prompts: bool
) -> None:
    tokenizer = engine.tokenizer

    def exchange(path: str, body, chat: bool) -> _Exchange:
        _check_model(body.model, model_name)
        shown = [m.model_dump() for m in body.messages] if chat else body.prompts
        return _Exchange(engine, metrics, model_name, path, chat, shown if log_prompts else None)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        call = exchange("/v1/completions", body, chat=False)
        prompts = await asyncio.to_thread(lambda: [tokenizer.encode(text, bos=True) for text in body.prompts])
        return await call.respond(body, prompts, logprobs=body.logprobs is not None)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        call = exchange("/v1/chat/completions", body, chat=True)
        if chat_template is None:
            raise _Refused(400, f"model {model_name} has no chat template; use /v1/completions", "messages")
        messages = [m.model_dump(exclude={"name"}) for m in body.messages]
        try:
            prompt = await asyncio.to_thread(encode_dialog, tokenizer, chat_template, messages)
        except ValueError as e:
            raise _Refused(400, str(e), "messages") from None
        return await call.respond(body, [prompt], logprobs=body.logprobs)


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


class _Exchange:
    """One API request from engine requests to response, timed for the metrics and the access log."""

    def __init__(self, engine: Engine, metrics: ServerMetrics, model_name: str, path: str, chat: bool, shown):
        self.engine, self.metrics, self.model_name, self.path, self.chat = engine, metrics, model_name, path, chat
        self.shown = shown  # the prompt as logged, or None (not logged)
        self.id = protocol.new_id("chatcmpl" if chat else "cmpl")
        self.arrived = time.perf_counter()
        self.first_token: float | None = None
        self.last_token = self.arrived

    async def respond(self, body, prompts: list[list[int]], logprobs: bool):
        requests = self._requests(body, prompts, logprobs)
        loop = asyncio.get_running_loop()
        queues: list[asyncio.Queue[Event]] = [asyncio.Queue() for _ in requests]

        def on_event(index: int, event: Event) -> None:  # in the engine's thread
            loop.call_soon_threadsafe(queues[index].put_nowait, event)

        try:
            handle = self.engine.submit(requests, on_event)
        except ValueError as e:  # a prompt or max_tokens beyond the context, ids outside the vocabulary
            param = "max_tokens" if (body.token_budget if self.chat else body.max_tokens) else "prompt"
            raise _Refused(400, str(e), param, "context_length_exceeded") from None
        except QueueFull as e:
            raise _Refused(429, f"the server is busy ({e}); retry later", code="rate_limit_exceeded") from None
        prompt_tokens = sum(len(ids) for ids in prompts)
        pieces = _Pieces(self.engine.tokenizer)
        if body.stream:
            stream = self._stream(prompt_tokens, queues, handle, pieces, logprobs, body.include_usage)
            return StreamingResponse(stream, media_type="text/event-stream")
        try:
            events = [await self._all_events(q) for q in queues]
        finally:  # the client went away while waiting: free the slots
            handle.cancel()
        texts = ["".join(e.text for e in evs) for evs in events]
        ids = [[t for e in evs for t in e.token_ids] for evs in events]
        lps = [
            protocol.token_logprobs(pieces(i), [p for e in evs for p in e.logprobs], 0, self.chat) if logprobs else None
            for i, evs in zip(ids, events)
        ]
        reasons = [evs[-1].finish_reason for evs in events]
        generated = sum(len(i) for i in ids)
        self._finished(prompt_tokens, generated, reasons)
        usage = protocol.usage(prompt_tokens, generated)
        return protocol.completion_response(self.id, self.model_name, texts, reasons, lps, usage, self.chat)

    def _requests(self, body, prompts: list[list[int]], logprobs: bool) -> list[EngineRequest]:
        """n requests per prompt, streams 0..n-1 of the seed; without max_tokens: DEFAULT_MAX_TOKENS, or what the
        context leaves."""
        if len(prompts) * body.n > protocol.MAX_CHOICES:
            raise _Refused(400, f"{len(prompts)} prompts × n {body.n} exceeds {protocol.MAX_CHOICES} choices", "n")
        budget = body.token_budget if self.chat else body.max_tokens
        sampling = SamplingParams(body.temperature, body.top_k, body.top_p)
        max_len = self.engine.settings.max_model_len
        return [
            make_request(
                ids,
                budget or max(1, min(DEFAULT_MAX_TOKENS, max_len - len(ids))),
                tokenizer=self.engine.tokenizer,
                sampling=sampling,
                seed=body.seed,
                stream=stream,
                stop_strings=body.stop_strings,
                logprobs=logprobs,
            )
            for ids in prompts
            for stream in range(body.n)
        ]

    def _observe(self, event: Event) -> None:
        now = time.perf_counter()
        if not event.token_ids:
            return
        if self.first_token is None:
            self.first_token = now
            self.metrics.first_token(now - self.arrived)
        else:
            self.metrics.tokens(now - self.last_token, len(event.token_ids))
        self.last_token = now

    async def _all_events(self, events: asyncio.Queue[Event]) -> list[Event]:
        collected = []
        while not collected or collected[-1].finish_reason is None:
            collected.append(await events.get())
            self._observe(collected[-1])
        return collected

    async def _stream(self, prompt_tokens, queues, handle, pieces, logprobs, include_usage) -> AsyncIterator[str]:
        """Server-sent events of every choice as its tokens come, then `data: [DONE]`."""

        def sse(payload: dict) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        pending = {asyncio.ensure_future(q.get()): i for i, q in enumerate(queues)}
        offsets, generated, reasons = [0] * len(queues), 0, []
        try:
            if self.chat:
                first = protocol.completion_chunk(self.id, self.model_name, 0, "", None, None, True)
                first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                yield sse(first)
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    index = pending.pop(task)
                    event = task.result()
                    self._observe(event)
                    generated += len(event.token_ids)
                    lp = None
                    if logprobs:
                        lp = protocol.token_logprobs(pieces(event.token_ids), event.logprobs, offsets[index], self.chat)
                    offsets[index] += len(event.text)
                    chunk = protocol.completion_chunk(
                        self.id, self.model_name, index, event.text, event.finish_reason, lp, self.chat
                    )
                    yield sse(chunk)
                    if event.finish_reason is None:
                        pending[asyncio.ensure_future(queues[index].get())] = index
                    else:
                        reasons.append(event.finish_reason)
            if include_usage:
                chunk = protocol.completion_chunk(self.id, self.model_name, 0, "", None, None, self.chat)
                chunk["choices"] = []
                chunk["usage"] = protocol.usage(prompt_tokens, generated)
                yield sse(chunk)
            yield "data: [DONE]\n\n"
        finally:  # finished, or the client disconnected: either way nothing more is wanted
            for task in pending:
                task.cancel()
            handle.cancel()
            self._finished(prompt_tokens, generated, reasons or ["cancelled"])

    def _finished(self, prompt_tokens: int, generated: int, reasons: list[str]) -> None:
        seconds = time.perf_counter() - self.arrived
        self.metrics.finished(prompt_tokens, generated, seconds, reasons)
        ttft = f"{(self.first_token - self.arrived) * 1e3:.0f}" if self.first_token is not None else "-"
        line = (
            f"{self.id} {self.path} 200 prompt_tokens={prompt_tokens} completion_tokens={generated} ttft_ms={ttft} "
            f"duration_ms={seconds * 1e3:.0f} finish={','.join(reasons)}"
        )
        if self.shown is not None:
            line += f" prompt={json.dumps(self.shown, ensure_ascii=False)}"
        access_log.info(line)


def _logged(path: str, response: Response) -> Response:
    """A refusal's access-log line: no request id yet, the path and the status."""
    access_log.info(f"- {path} {response.status_code}")
    return response


def _error(
    status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


def _check_model(requested: str, served: str) -> None:
    if requested != served:
        raise _Refused(
            400, f"model {requested!r} is not served here; this server serves {served!r}", "model", "model_not_found"
        )


class _Pieces:
    """Each token's text, for log-probabilities."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, token_ids: list[int]) -> list[str]:
        return [self.tokenizer.id_to_piece(t).replace("\u2581", " ") for t in token_ids]
