"""One API request, from its engine requests to its response or its stream, timed for the metrics and the access
log.

A chat that may call tools (`tools.py`) is read for calls when each choice finishes; streamed, a choice's text is
held back while it can still turn into a call and sent as one `tool_calls` delta when it does (the arguments whole:
a call is only known to be one once it parses), or as content as soon as it cannot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from llama_jax.inference.engine import Engine
from llama_jax.inference.sampling import SamplingParams
from llama_jax.inference.types import Event, QueueFull, make_request
from llama_jax.inference.types import Request as EngineRequest
from llama_jax.serve import protocol, tools
from llama_jax.serve.metrics import ServerMetrics

DEFAULT_MAX_TOKENS = 256
access_log = logging.getLogger("llama_jax.access")


class Refused(Exception):
    """A request the server answers with an error status and an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class Exchange:
    """One API request to `model` (the base model's name, or an adapter's: `adapter`) from engine requests to
    response."""

    def __init__(
        self,
        engine: Engine,
        metrics: ServerMetrics,
        model: str,
        adapter: str | None,
        path: str,
        body,
        shown,
        timeout: float | None = None,
    ):
        self.engine, self.metrics, self.model, self.adapter, self.path = engine, metrics, model, adapter, path
        self.timeout = timeout  # seconds from arrival to the last token, or None
        self.chat = isinstance(body, protocol.ChatRequest)
        self.body = body
        self.reads_calls = self.chat and body.calls_tools
        self.shown = shown  # the prompt as logged, or None (not logged)
        self.id = protocol.new_id("chatcmpl" if self.chat else "cmpl")
        self.arrived = time.perf_counter()
        self.first_token: float | None = None
        self.last_token = self.arrived

    async def respond(self, prompts: list[list[int]], logprobs: bool):
        body = self.body
        requests = self._requests(prompts, logprobs)
        loop = asyncio.get_running_loop()
        queues: list[asyncio.Queue[Event]] = [asyncio.Queue() for _ in requests]

        def on_event(index: int, event: Event) -> None:  # in the engine's thread
            loop.call_soon_threadsafe(queues[index].put_nowait, event)

        try:  # in a worker thread: checking a grammar compiles it (milliseconds, more for a large schema)
            handle = await asyncio.to_thread(self.engine.submit, requests, on_event)
        except ValueError as e:  # a prompt or max_tokens beyond the context, a grammar that does not compile
            code = "context_length_exceeded" if "positions" in str(e) else None
            param = self._param_of(str(e))
            message = f"{param}: {e}" if "constraint" in str(e) else str(e)
            raise Refused(400, message, param, code) from None
        except QueueFull as e:
            raise Refused(429, f"the server is busy ({e}); retry later", code="rate_limit_exceeded") from None
        prompt_tokens = sum(len(ids) for ids in prompts)
        pieces = _Pieces(self.engine.tokenizer)
        if body.stream:
            stream = self._stream(prompt_tokens, queues, handle, pieces, logprobs, body.include_usage)
            return StreamingResponse(stream, media_type="text/event-stream")
        try:
            events = await asyncio.wait_for(self._every_choice(queues), self._time_left())
        except TimeoutError:
            self._finished(prompt_tokens, 0, ["timeout"])
            raise Refused(408, self._timeout_message(), code="request_timeout") from None
        finally:  # finished, timed out, or the client went away while waiting: free the slots
            handle.cancel()
        texts = ["".join(e.text for e in evs) for evs in events]
        ids = [[t for e in evs for t in e.token_ids] for evs in events]
        lps = [
            protocol.token_logprobs(pieces(i), [p for e in evs for p in e.logprobs], 0, self.chat) if logprobs else None
            for i, evs in zip(ids, events)
        ]
        reasons = [evs[-1].finish_reason for evs in events]
        # A call is read from a finished answer only (one cut by max_tokens stays content, as when streamed).
        calls = [
            tools.parse_calls(t, body) if self.reads_calls and r == "stop" else None for t, r in zip(texts, reasons)
        ]
        reasons = ["tool_calls" if c else r for c, r in zip(calls, reasons)]
        generated = sum(len(i) for i in ids)
        self._finished(prompt_tokens, generated, reasons)
        usage = protocol.usage(prompt_tokens, generated)
        return protocol.completion_response(self.id, self.model, texts, reasons, lps, usage, self.chat, calls)

    def _param_of(self, message: str) -> str:
        """The request field an engine's refusal is about."""
        if "constraint" in message:
            given = [name for name in protocol.CONSTRAINT_FIELDS if getattr(self.body, name, None) is not None]
            return given[0] if given else "tools"
        return "max_tokens" if (self.body.token_budget if self.chat else self.body.max_tokens) else "prompt"

    def _requests(self, prompts: list[list[int]], logprobs: bool) -> list[EngineRequest]:
        """n requests per prompt, streams 0..n-1 of the seed; without max_tokens: DEFAULT_MAX_TOKENS, or what the
        context leaves."""
        body = self.body
        if len(prompts) * body.n > protocol.MAX_CHOICES:
            raise Refused(400, f"{len(prompts)} prompts × n {body.n} exceeds {protocol.MAX_CHOICES} choices", "n")
        budget = body.token_budget if self.chat else body.max_tokens
        sampling = SamplingParams(body.temperature, body.top_k, body.top_p)
        constraint = body.constraint() or (tools.call_constraint(body) if self.chat else None)
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
                constraint=constraint,
                adapter=self.adapter,
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
            self.metrics.first_token(self.model, now - self.arrived)
        else:
            self.metrics.tokens(self.model, now - self.last_token, len(event.token_ids))
        self.last_token = now

    def _time_left(self) -> float | None:
        return None if self.timeout is None else max(0.0, self.arrived + self.timeout - time.perf_counter())

    def _timeout_message(self) -> str:
        return f"the request ran past the server's --request-timeout of {self.timeout:g} s and was stopped"

    async def _every_choice(self, queues) -> list[list[Event]]:
        return [await self._all_events(q) for q in queues]

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
        answers = [_Answer(self.reads_calls) for _ in queues]
        offsets, generated, reasons = [0] * len(queues), 0, []
        try:
            if self.chat:
                first = protocol.completion_chunk(self.id, self.model, 0, "", None, None, True)
                first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                yield sse(first)
            while pending:
                done, _ = await asyncio.wait(pending, timeout=self._time_left(), return_when=asyncio.FIRST_COMPLETED)
                if not done:  # past --request-timeout: an error event ends the stream (its slots freed below)
                    reasons = ["timeout"]
                    error = protocol.error_body(self._timeout_message(), "timeout", code="request_timeout")
                    yield sse(error)
                    break
                for task in done:
                    index = pending.pop(task)
                    event = task.result()
                    self._observe(event)
                    generated += len(event.token_ids)
                    for text, ids, lps, reason, calls in answers[index].take(event, self.body):
                        lp = None
                        if logprobs:
                            lp = protocol.token_logprobs(pieces(ids), lps, offsets[index], self.chat)
                        offsets[index] += len(text)
                        chunk = protocol.completion_chunk(self.id, self.model, index, text, reason, lp, self.chat)
                        if calls:
                            chunk["choices"][0]["delta"] = {"tool_calls": protocol.call_deltas(calls)}
                        yield sse(chunk)
                    if event.finish_reason is None:
                        pending[asyncio.ensure_future(queues[index].get())] = index
                    else:
                        reasons.append(answers[index].reason)
            if include_usage:
                chunk = protocol.completion_chunk(self.id, self.model, 0, "", None, None, self.chat)
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
        self.metrics.finished(self.model, prompt_tokens, generated, seconds, reasons)
        ttft = f"{(self.first_token - self.arrived) * 1e3:.0f}" if self.first_token is not None else "-"
        line = (
            f"{self.id} {self.path} 200 model={self.model} prompt_tokens={prompt_tokens} "
            f"completion_tokens={generated} ttft_ms={ttft} duration_ms={seconds * 1e3:.0f} finish={','.join(reasons)}"
        )
        if self.shown is not None:
            line += f" prompt={json.dumps(self.shown, ensure_ascii=False)}"
        access_log.info(line)


class _Answer:
    """One streamed choice: what to send of each event. While the text may still become tool calls it is held
    (with its tokens and log-probabilities); once it cannot, what was held goes out as content."""

    def __init__(self, reads_calls: bool):
        self.holding = reads_calls
        self.text, self.ids, self.logprobs = "", [], []
        self.reason: str | None = None

    def take(self, event: Event, body) -> list[tuple[str, list[int], list[float], str | None, list | None]]:
        """(text, token ids, log-probabilities, finish reason, tool calls) of each chunk to send now."""
        self.reason = event.finish_reason
        if not self.holding:
            return [(event.text, event.token_ids, event.logprobs, event.finish_reason, None)]
        self.text += event.text
        self.ids += event.token_ids
        self.logprobs += event.logprobs
        if event.finish_reason is not None:
            calls = tools.parse_calls(self.text, body)
            if calls and event.finish_reason == "stop":
                self.reason = "tool_calls"
                return [("", [], [], "tool_calls", calls)]
        elif tools.may_become_calls(self.text):
            return []
        self.holding = False
        return [(self.text, self.ids, self.logprobs, event.finish_reason, None)]


class _Pieces:
    """Each token's text, for log-probabilities."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, token_ids: list[int]) -> list[str]:
        return [self.tokenizer.id_to_piece(t).replace("\u2581", " ") for t in token_ids]


def served_model(requested: str, base: str, adapters: tuple[str, ...]) -> str | None:
    """The adapter a request's `model` names (None: the base model); Refused when it names neither."""
    if requested == base:
        return None
    if requested in adapters:
        return requested
    names = ", ".join(repr(name) for name in (base, *adapters))
    raise Refused(
        400, f"model {requested!r} is not served here; this server serves {names}", "model", "model_not_found"
    )
