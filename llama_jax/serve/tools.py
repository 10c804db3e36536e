"""Function calling in Llama 3.1's JSON format: OpenAI messages into the chat template's, the grammar of a
call `tool_choice` requires, and a finished answer read back as tool calls.

The model calls a function by answering `{"name": NAME, "parameters": {...}}` (optionally after
`<|python_tag|>`, and several calls separated by ";", as vLLM's `llama3_json` parser reads them). With
`tool_choice` "required" or a named function the answer is held to the JSON schema of such a call — its name one
of the tools' (or the named one), its parameters the function's own schema — so it always parses against them;
with "auto" the model decides, and an answer that does not parse as calls is plain content; with "none" the
tools are shown but the answer is never read as a call (as vLLM does).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from llama_jax.inference.constraints import Constraint
from llama_jax.serve.protocol import ChatRequest, NamedToolChoice

PYTHON_TAG = "<|python_tag|>"


def chat_messages(body: ChatRequest) -> list[dict[str, Any]]:
    """The request's messages as `chat.encode_dialog` takes them: a tool call's arguments parsed from their JSON
    text (ValueError when they are not a JSON object)."""
    messages = []
    for i, message in enumerate(body.messages):
        if message.tool_calls:
            calls = []
            for call in message.tool_calls:
                try:
                    arguments = json.loads(call.function.arguments)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"messages[{i}]: the arguments of tool call {call.id!r} are not JSON: {e}"
                    ) from None
                if not isinstance(arguments, dict):
                    raise ValueError(f"messages[{i}]: the arguments of tool call {call.id!r} are not a JSON object")
                calls.append({"name": call.function.name, "arguments": arguments})
            messages.append({"role": "assistant", "content": message.content or "", "tool_calls": calls})
        else:
            messages.append({"role": message.role, "content": message.content})
    return messages


def tools_for_template(body: ChatRequest) -> list[dict[str, Any]] | None:
    """The function definitions shown to the model (OpenAI's form), or None."""
    return [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None


def call_constraint(body: ChatRequest) -> Constraint | None:
    """The grammar of the answer when `tool_choice` requires a call: one call of the named function, or of any
    of the tools; None when the model may answer in words."""
    if not body.calls_tools or body.tool_choice in (None, "auto"):
        return None
    tools = body.tools
    if isinstance(body.tool_choice, NamedToolChoice):
        tools = [tool for tool in tools if tool.function.name == body.tool_choice.function.name]
    schemas = [_call_schema(tool.function.name, tool.function.parameters) for tool in tools]
    return Constraint("json_schema", json.dumps(schemas[0] if len(schemas) == 1 else {"anyOf": schemas}))


def _call_schema(name: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "parameters": parameters or {"type": "object"}},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }


def may_become_calls(text: str) -> bool:
    """Whether the start of an answer can still turn into tool calls (streaming holds it back until it knows)."""
    start = text.lstrip()
    return PYTHON_TAG.startswith(start) or start.startswith((PYTHON_TAG, "{"))


def parse_calls(text: str, body: ChatRequest) -> list[dict[str, Any]] | None:
    """The tool calls an answer makes, in OpenAI's form (`arguments` as JSON text); None when it makes none —
    it is not calls of the request's tools in Llama 3.1's format."""
    text = text.strip().removeprefix(PYTHON_TAG).strip()
    if not text.startswith("{"):
        return None
    names = {tool.function.name for tool in body.tools or ()}
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(text):
        try:
            call, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or call.get("name") not in names:
            return None
        arguments = call.get("parameters", call.get("arguments"))
        if not isinstance(arguments, dict):
            return None
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
            }
        )
        rest = text[at:].lstrip()
        if rest and not rest.startswith(";"):
            return None
        at = len(text) - len(rest.removeprefix(";").lstrip())
    return calls or None
