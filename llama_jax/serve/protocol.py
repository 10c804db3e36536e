"""The OpenAI wire format: request bodies (checked by pydantic) and the JSON of responses and stream chunks.

Only what the engine does is accepted. A field this server does not know, or one it knows but does not
implement with the value given (`frequency_penalty` 2, `best_of` 3, `logit_bias`, `echo`, tools, ...), is
refused with a 400 that names it, never ignored into a different answer. `n` choices per prompt are `n`
requests with streams 0..n-1 of the request's seed. `seed` defaults to 0, so a request's tokens depend only on
what it says.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_PROMPTS = 16  # prompts in one completions request
MAX_CHOICES = 64  # prompts × n
MAX_STOP_STRINGS = 4  # as OpenAI allows
Temperature = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
# OpenAI fields whose default is accepted and any other value refused: the engine does not implement them.
Unimplemented = Literal[0]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: int = Field(default=0, ge=0)  # not OpenAI's; vLLM and others accept it
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    frequency_penalty: Unimplemented | None = None
    presence_penalty: Unimplemented | None = None
    user: str | None = None  # the caller's label for its end user: it changes no output

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOP_STRINGS} non-empty stop strings")
        return stop

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
    logprobs: Unimplemented | None = None  # 0: the chosen tokens' log-probabilities, no alternatives
    echo: Literal[False] = False
    best_of: int | None = None

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, best_of, info):
        if best_of is not None and best_of != info.data.get("n", 1):
            raise ValueError(f"best_of {best_of} is not supported: only best_of = n (every sample is returned)")
        return best_of

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None  # a participant's label: it changes no output


class ChatRequest(_Request):
    messages: Annotated[list[Message], Field(min_length=1, max_length=256)]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Unimplemented | None = None

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def completion_chunk(
    request_id: str, model: str, index: int, text: str, finish_reason: str | None, logprobs: dict | None, chat: bool
) -> dict[str, Any]:
    """One streamed chunk (`text` new since the last one)."""
    if chat:
        delta = {"content": text} if text or finish_reason is None else {}
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        kind = "text_completion"
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": [choice]}


def completion_response(
    request_id: str,
    model: str,
    texts: list[str],
    reasons: list[str],
    logprobs: list[dict | None],
    usage: dict[str, int],
    chat: bool,
) -> dict[str, Any]:
    if chat:
        choices = [
            {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp, "finish_reason": reason}
            for i, (text, reason, lp) in enumerate(zip(texts, reasons, logprobs))
        ]
        kind = "chat.completion"
    else:
        choices = [
            {"index": i, "text": text, "logprobs": lp, "finish_reason": reason}
            for i, (text, reason, lp) in enumerate(zip(texts, reasons, logprobs))
        ]
        kind = "text_completion"
    return {
        "id": request_id,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def token_logprobs(pieces: list[str], logprobs: list[float], offset: int, chat: bool) -> dict[str, Any]:
    """The log-probabilities of chosen tokens, in the completions or the chat format."""
    if chat:
        return {
            "content": [
                {"token": piece, "logprob": logprob, "bytes": list(piece.encode()), "top_logprobs": []}
                for piece, logprob in zip(pieces, logprobs)
            ]
        }
    offsets = []
    for piece in pieces:
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": pieces, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": offsets}
