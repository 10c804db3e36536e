"""The OpenAI wire format: request bodies (checked by pydantic) and the JSON of responses and stream chunks.

Only what the engine does is accepted. A field this server does not know, or one it knows but does not
implement with the value given (`frequency_penalty` 2, `best_of` 3, `logit_bias`, `echo`, ...), is refused
with a 400 that names it, never ignored into a different answer. `n` choices per prompt are `n` requests with
streams 0..n-1 of the request's seed. `seed` defaults to 0, so a request's tokens depend only on what it says.

Structured outputs: `response_format` (`json_object`, `json_schema`) and vLLM's `guided_json`,
`guided_regex`, `guided_choice` and `guided_grammar` (a Lark grammar, llguidance's dialect), at most one of
them, become the request's grammar (`Constraint`). Tools: `tools`, `tool_choice` and messages carrying tool
calls and results (`tools.py` renders and parses them).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llama_jax.inference.constraints import Constraint

MAX_PROMPTS = 16  # prompts in one completions request
MAX_CHOICES = 64  # prompts × n
MAX_STOP_STRINGS = 4  # as OpenAI allows
Temperature = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
# OpenAI fields whose default is accepted and any other value refused: the engine does not implement them.
Unimplemented = Literal[0]


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # the schema is always followed strictly: a grammar cannot be followed loosely


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format: json_schema is given with type json_schema, and only then")
        return self


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
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1, max_length=256)] | None = None
    guided_grammar: str | None = None

    @model_validator(mode="after")
    def _one_constraint(self):
        given = [name for name in CONSTRAINT_FIELDS if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type == "text":
            given.remove("response_format")
        if len(given) > 1:
            raise ValueError(f"give one of {', '.join(given)}: a request follows one grammar")
        return self

    def constraint(self) -> Constraint | None:
        """The grammar the request's text must follow, or None."""
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            return Constraint("json_object")
        if fmt is not None and fmt.type == "json_schema":
            return Constraint("json_schema", json.dumps(fmt.json_schema.schema_))
        if self.guided_json is not None:
            schema = self.guided_json if isinstance(self.guided_json, str) else json.dumps(self.guided_json)
            return Constraint("json_schema", schema)
        if self.guided_regex is not None:
            return Constraint("regex", self.guided_regex)
        if self.guided_choice is not None:
            return Constraint("choice", json.dumps(self.guided_choice))
        if self.guided_grammar is not None:
            return Constraint("lark", self.guided_grammar)
        return None

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


CONSTRAINT_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Function(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None  # a call forced by tool_choice follows the schema strictly either way


class Tool(_Strict):
    type: Literal["function"]
    function: Function


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class CalledFunction(_Strict):
    name: str
    arguments: str  # JSON text


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None  # None only for an assistant's tool call
    name: str | None = None  # a participant's label: it changes no output
    tool_calls: list[ToolCall] | None = None  # an assistant's
    tool_call_id: str | None = None  # a tool's result: the call it answers

    @model_validator(mode="after")
    def _content_or_calls(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message carries tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message, and only a tool message, has a tool_call_id")
        return self


class ChatRequest(_Request):
    messages: Annotated[list[Message], Field(min_length=1, max_length=256)]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Unimplemented | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # a Llama 3.1 turn makes one call: "may call several" holds

    @model_validator(mode="after")
    def _choice_among_tools(self):
        names = [tool.function.name for tool in self.tools or ()]
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not among the tools")
        if self.tool_choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        if self.tools and self.constraint() is not None and self.calls_tools:
            raise ValueError("a request that may call tools cannot also constrain its text: use tool_choice 'none'")
        return self

    @property
    def calls_tools(self) -> bool:
        """Whether the answer is read for a tool call: tools given and tool_choice not "none"."""
        return bool(self.tools) and self.tool_choice != "none"

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


def call_deltas(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool calls as a stream delta carries them: each with its index."""
    return [{"index": i, **call} for i, call in enumerate(calls)]


def completion_response(
    request_id: str,
    model: str,
    texts: list[str],
    reasons: list[str],
    logprobs: list[dict | None],
    usage: dict[str, int],
    chat: bool,
    calls: list[list[dict] | None] | None = None,
) -> dict[str, Any]:
    """The response body; a chat choice that called tools (`calls[i]`) has them instead of content."""
    if chat:
        calls = calls or [None] * len(texts)
        messages = [
            {"role": "assistant", "content": None, "tool_calls": c} if c else {"role": "assistant", "content": text}
            for text, c in zip(texts, calls)
        ]
        choices = [
            {"index": i, "message": message, "logprobs": lp, "finish_reason": reason}
            for i, (message, reason, lp) in enumerate(zip(messages, reasons, logprobs))
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
