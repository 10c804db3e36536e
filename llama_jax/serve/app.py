"""The OpenAI-compatible HTTP API over an `Engine`, with FastAPI.

    POST /v1/completions, POST /v1/chat/completions (`stream: true`: server-sent events ending in
    `data: [DONE]`), GET /v1/models, GET /health (503 {"status": "starting"} while the engine compiles)

Handlers turn a request into engine requests, submit them and wait for their events; the engine's own
thread runs the model, so no handler ever blocks it, and events cross over through the handler's event loop.
A client that goes away mid-stream cancels its requests: their slots are free at the engine's next step.
Every refusal is an OpenAI-style error body: 400 for a bad request, 401 without the API key, 413 for a
body over the bound, 429 when the queue is full, 503 while the server is still starting.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from llama_jax.chat import encode_dialog
from llama_jax.inference.engine import Engine
from llama_jax.inference.sampling import SamplingParams
from llama_jax.inference.scheduler import Event, QueueFull
from llama_jax.inference.scheduler import Request as EngineRequest
from llama_jax.serve import protocol
from llama_jax.serve.protocol import ChatRequest, CompletionRequest, error_body

MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_TOKENS = 256


class _Refused(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def create_app(engine: Engine, model_name: str, chat_template: str | None, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="llama_jax", docs_url=None, redoc_url=None)
    tokenizer = engine.tokenizer

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1/") and not engine.ready:
            done, total = engine.warm
            return _error(
                503, f"the server is starting: {done} of {total} programs compiled; retry when /health says ok"
            )
        if request.url.path.startswith("/v1/"):
            if api_key is not None and not secrets.compare_digest(
                request.headers.get("authorization", ""), f"Bearer {api_key}"
            ):
                return _error(
                    401,
                    "missing or wrong API key: send Authorization: Bearer KEY",
                    kind="authentication_error",
                    code="invalid_api_key",
                )
            size = request.headers.get("content-length")
            if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
                return _error(413, f"request bodies are limited to {MAX_BODY_BYTES} bytes")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        return _error(400, f"{where}: {first['msg']}" if where else first["msg"], param=where or None)

    @app.exception_handler(_Refused)
    async def refused(request: Request, error: _Refused):
        return _error(error.status, error.message, param=error.param, code=error.code)

    @app.get("/health")
    async def health():
        if not engine.ready:  # compiling its programs: the first requests would wait for them (vLLM's 503)
            done, total = engine.warm
            return JSONResponse({"status": "starting", "compiled": done, "programs": total}, status_code=503)
        return {
            "status": "ok",
            "compiled": len(engine.backend.compiled),
            "programs": len(engine.backend.programs()),
            "slots": engine.slots,
            "running": len(engine.scheduler.running),
            "waiting": len(engine.scheduler.queue),
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "owned_by": "llama_jax", "created": 0}],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        _check_model(body.model, model_name)
        prompts = [tokenizer.encode(text, bos=True) for text in body.prompts]
        return await _respond(engine, body, model_name, prompts, chat=False, logprobs=body.logprobs is not None)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        _check_model(body.model, model_name)
        if chat_template is None:
            raise _Refused(400, f"model {model_name} has no chat template; use /v1/completions", "messages")
        try:
            prompt = encode_dialog(tokenizer, chat_template, [m.model_dump() for m in body.messages])
        except ValueError as e:
            raise _Refused(400, str(e), "messages") from None
        return await _respond(engine, body, model_name, [prompt], chat=True, logprobs=body.logprobs)

    return app


def _error(
    status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


def _check_model(requested: str, served: str) -> None:
    if requested != served:
        raise _Refused(
            400, f"model {requested!r} is not served here; this server serves {served!r}", "model", "model_not_found"
        )


async def _respond(engine: Engine, body, model_name: str, prompts: list[list[int]], chat: bool, logprobs: bool):
    budget = body.token_budget if chat else body.max_tokens
    sampling = SamplingParams(body.temperature, body.top_k, body.top_p)
    stop_ids = tuple(engine.tokenizer.stop_ids)
    # Without max_tokens: DEFAULT_MAX_TOKENS, or what the context leaves.
    requests = [
        EngineRequest(
            tuple(ids),
            budget or max(1, min(DEFAULT_MAX_TOKENS, engine.max_len - len(ids))),
            sampling,
            body.seed,
            0,
            stop_ids,
            body.stop_strings,
            logprobs=logprobs,
        )
        for ids in prompts
    ]
    for request in requests:
        try:
            engine.check(request)
        except ValueError as e:
            raise _Refused(400, str(e), "max_tokens" if budget else "prompt", "context_length_exceeded") from None
    loop = asyncio.get_running_loop()
    queues: list[asyncio.Queue[Event]] = [asyncio.Queue() for _ in requests]
    handles = []
    try:
        for request, events in zip(requests, queues):
            handles.append(
                engine.submit(request, lambda event, q=events: loop.call_soon_threadsafe(q.put_nowait, event))
            )
    except QueueFull as e:
        for handle in handles:
            handle.cancel()
        raise _Refused(429, f"the server is busy ({e}); retry later", code="rate_limit_exceeded") from None
    request_id = protocol.new_id("chatcmpl" if chat else "cmpl")
    pieces = _Pieces(engine.tokenizer)
    if body.stream:
        stream = _stream(request_id, model_name, requests, queues, handles, pieces, chat, logprobs, body.include_usage)
        return StreamingResponse(stream, media_type="text/event-stream")
    try:
        events = [await _all_events(q) for q in queues]
    finally:
        for handle in handles:  # the client went away while waiting: free the slots
            handle.cancel()
    texts = ["".join(e.text for e in evs) for evs in events]
    ids = [[t for e in evs for t in e.token_ids] for evs in events]
    lps = [
        protocol.token_logprobs(pieces(i), [p for e in evs for p in e.logprobs], 0, chat) if logprobs else None
        for i, evs in zip(ids, events)
    ]
    usage = protocol.usage(sum(len(r.prompt_ids) for r in requests), sum(len(i) for i in ids))
    return protocol.completion_response(
        request_id, model_name, texts, [evs[-1].finish_reason for evs in events], lps, usage, chat
    )


async def _all_events(events: asyncio.Queue[Event]) -> list[Event]:
    collected = []
    while not collected or collected[-1].finish_reason is None:
        collected.append(await events.get())
    return collected


async def _stream(
    request_id, model_name, requests, queues, handles, pieces, chat, logprobs, include_usage
) -> AsyncIterator[str]:
    """Server-sent events of every choice as its tokens come, then `data: [DONE]`."""

    def sse(payload: dict) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    pending = {asyncio.ensure_future(q.get()): i for i, q in enumerate(queues)}
    offsets, completion_tokens = [0] * len(queues), 0
    try:
        if chat:
            first = protocol.completion_chunk(request_id, model_name, 0, "", None, None, True)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            yield sse(first)
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = pending.pop(task)
                event = task.result()
                completion_tokens += len(event.token_ids)
                lp = None
                if logprobs:
                    lp = protocol.token_logprobs(pieces(event.token_ids), event.logprobs, offsets[index], chat)
                offsets[index] += len(event.text)
                yield sse(
                    protocol.completion_chunk(request_id, model_name, index, event.text, event.finish_reason, lp, chat)
                )
                if event.finish_reason is None:
                    pending[asyncio.ensure_future(queues[index].get())] = index
        if include_usage:
            chunk = protocol.completion_chunk(request_id, model_name, 0, "", None, None, chat)
            chunk["choices"] = []
            chunk["usage"] = protocol.usage(sum(len(r.prompt_ids) for r in requests), completion_tokens)
            yield sse(chunk)
        yield "data: [DONE]\n\n"
    finally:  # finished, or the client disconnected: either way nothing more is wanted
        for task in pending:
            task.cancel()
        for handle in handles:
            handle.cancel()


class _Pieces:
    """Each token's text, for log-probabilities."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, token_ids: list[int]) -> list[str]:
        return [self.tokenizer.id_to_piece(t).replace("\u2581", " ") for t in token_ids]
