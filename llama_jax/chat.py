"""Chat prompts: the Llama 2 and Llama 3 templates built at the token level, as Meta's reference code builds
them, or a Jinja template as Hugging Face tokenizers carry one (`tokenizer_config.json`'s `chat_template`).

Building ids piece by piece (rather than rendering a string and encoding it) keeps special tokens out of
reach of user text: "<|eot_id|>" typed by a user stays plain text.

  llama2: meta-llama/llama llama/generation.py `chat_completion`
  llama3: meta-llama/llama3 llama/tokenizer.py `ChatFormat.encode_dialog_prompt`

A Jinja template is rendered as transformers renders it (a sandboxed environment with `trim_blocks` and
`lstrip_blocks`; `messages`, `tools`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`), and
the text encoded with the tokenizer's special tokens (`<s>`, `<|eot_id|>`, ...) read as their ids — so there, as
in transformers, a special token's name typed by a user becomes that token.

Tool calls (a chat given `tools`, OpenAI's function definitions) take Llama 3.1's JSON format in the llama3
template, as Meta's prompt format and Hugging Face's Llama 3.1 template write it: the system turn opens with
"Environment: ipython" and the knowledge-cutoff lines, the function definitions and the instruction to answer
with `{"name": ..., "parameters": ...}` open the first user turn, an assistant's tool call is that JSON, and a
tool's result is an `ipython` turn. (The date is fixed, 26 Jul 2024, so a prompt's tokens do not change from
day to day.) A Jinja template gets the tools and renders them itself; the llama2 template has no tool format.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from llama_jax.tokenizers import Tokenizer

# {"role": "system" | "user" | "assistant" | "tool", "content": str}; an assistant's tool call instead has
# "tool_calls": [{"name": str, "arguments": dict}] (and "content" None or "").
Message = Mapping[str, Any]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def _validate(messages: Sequence[Message]) -> None:
    """An optional system message, then user and assistant alternating, ending with user; an assistant's tool
    call is answered by one or more tool messages, after which the assistant speaks again (or the chat ends,
    for the assistant to answer)."""
    if not messages:
        raise ValueError("a chat needs at least one user message")
    for i, message in enumerate(messages):
        calls = message.get("tool_calls") if message.get("role") == "assistant" else None
        if calls:
            if not all(isinstance(c.get("name"), str) and isinstance(c.get("arguments"), dict) for c in calls):
                raise ValueError(f"message {i}: each tool call needs a name and a dict of arguments")
        elif not {"role", "content"} <= set(message) or not isinstance(message["content"], str):
            raise ValueError(f"message {i} must be {{'role': ..., 'content': str}}, got {dict(message)!r}")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    roles = ["call" if m["role"] == "assistant" and m.get("tool_calls") else m["role"] for m in turns]
    # What may follow each role: a tool call is answered by tools; tools by more tools or the assistant.
    follows = {None: {"user"}, "user": {"assistant", "call"}, "assistant": {"user"}, "call": {"tool"}}
    follows["tool"] = {"tool", "assistant", "call"}
    ok = all(role in follows[before] for before, role in zip([None, *roles], roles)) and roles[-1:] in (
        ["user"],
        ["tool"],
    )
    if not ok:
        raise ValueError(
            "chat roles must be an optional 'system' first, then 'user' and 'assistant' alternating, "
            "an assistant's tool call followed by 'tool' results, ending with 'user' or 'tool'; "
            f"got {[message['role'] for message in messages]}"
        )


def _llama2(tokenizer: Tokenizer, messages: Sequence[Message], tools: Sequence[Mapping] | None) -> list[int]:
    if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        raise ValueError("the llama2 chat template has no tool calls: use llama3 or a Jinja template with tools")
    if messages[0]["role"] == "system":
        first = {"role": "user", "content": B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"]}
        messages = [first, *messages[2:]]
    ids: list[int] = []
    for user, answer in zip(messages[::2], messages[1::2]):
        text = f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "
        ids += tokenizer.encode(text, bos=True, eos=True)
    return ids + tokenizer.encode(f"{B_INST} {messages[-1]['content'].strip()} {E_INST}", bos=True, eos=False)


def _llama3(tokenizer: Tokenizer, messages: Sequence[Message], tools: Sequence[Mapping] | None) -> list[int]:
    try:
        begin, start_header, end_header, eot = (
            tokenizer.special_id(name)
            for name in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
        )
    except KeyError as e:
        raise ValueError(f"the llama3 chat template needs the Llama 3 tokenizer: {e}") from e

    def header(role: str) -> list[int]:
        role_ids = tokenizer.encode(role, bos=False)
        return [start_header, *role_ids, end_header, *tokenizer.encode("\n\n", bos=False)]

    ids = [begin]
    for role, text in _llama31_turns(messages, tools) if tools else [(m["role"], m["content"]) for m in messages]:
        ids += header(role) + tokenizer.encode(text.strip(), bos=False) + [eot]
    return ids + header("assistant")


TOOLS_INSTRUCTION = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments "
    'that best answers the given prompt.\n\nRespond in the format {"name": function name, "parameters": '
    "dictionary of argument name and its value}. Do not use variables.\n\n"
)


def _llama31_turns(messages: Sequence[Message], tools: Sequence[Mapping]) -> list[tuple[str, str]]:
    """(role, text) turns of a chat with tools in Llama 3.1's JSON tool format (the module's docstring)."""
    system = messages[0]["content"].strip() if messages[0]["role"] == "system" else ""
    rest = list(messages[1:] if messages[0]["role"] == "system" else messages)
    preamble = "Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    definitions = "".join(json.dumps(tool, indent=4) + "\n\n" for tool in tools)
    turns = [("system", preamble + system), ("user", TOOLS_INSTRUCTION + definitions + rest[0]["content"].strip())]
    for message in rest[1:]:
        if message.get("tool_calls"):
            if len(message["tool_calls"]) > 1:
                raise ValueError("Llama 3.1's tool format has one tool call per assistant turn")
            call = message["tool_calls"][0]
            turns.append(("assistant", json.dumps({"name": call["name"], "parameters": call["arguments"]})))
        else:
            turns.append(("ipython" if message["role"] == "tool" else message["role"], message["content"]))
    return turns


TEMPLATES: dict[str, Callable[[Tokenizer, Sequence[Message], Sequence[Mapping] | None], list[int]]] = {
    "llama2": _llama2,
    "llama3": _llama3,
}
# What an importer may record: "auto" detects it from the tokenizer and its Hugging Face config; "none", a
# base model without chat.
CHAT_TEMPLATE_CHOICES = ("auto", *TEMPLATES, "none")


def is_jinja(template: str) -> bool:
    return "{{" in template or "{%" in template


def check_template(template: str) -> None:
    """ValueError unless `template` is a known name or Jinja text that parses."""
    if template in TEMPLATES:
        return
    if not is_jinja(template):
        raise ValueError(f"unknown chat template {template!r}: use {' or '.join(TEMPLATES)}, or a Jinja template file")
    import jinja2

    try:
        _jinja_environment().from_string(template)
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template is not valid Jinja: {e}") from None


def encode_dialog(
    tokenizer: Tokenizer, template: str, messages: Sequence[Message], tools: Sequence[Mapping] | None = None
) -> list[int]:
    """Prompt ids for `messages` in chat `template` (a name in TEMPLATES, or Jinja text), ready for the model to
    write the assistant's turn; `tools`: OpenAI's function definitions the model may call. The ids already
    start with BOS: do not add another."""
    check_template(template)
    _validate(messages)
    if template in TEMPLATES:
        return TEMPLATES[template](tokenizer, messages, tools or None)
    return _jinja(tokenizer, template, messages, tools or None)


def _jinja_environment():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)


def _jinja(tokenizer: Tokenizer, template: str, messages: Sequence[Message], tools) -> list[int]:
    import jinja2

    def raise_exception(message: str):
        raise ValueError(f"the chat template refused the conversation: {message}")

    try:
        text = (
            _jinja_environment()
            .from_string(template)
            .render(
                messages=[_as_hugging_face(m) for m in messages],
                tools=[dict(t) for t in tools] if tools else None,
                add_generation_prompt=True,
                bos_token=_special_name(tokenizer, tokenizer.bos_id),
                eos_token=_special_name(tokenizer, tokenizer.eos_id),
                raise_exception=raise_exception,
            )
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template failed: {e}") from None
    ids: list[int] = []
    for part in _SPECIAL.split(text):
        if not part:
            continue
        try:
            ids.append(tokenizer.special_id(part))
        except KeyError:
            ids += tokenizer.encode(part, bos=False)
    return ids


def _as_hugging_face(message: Message) -> dict:
    """A message as transformers hands it to a template: a tool call as {"type": "function", "function":
    {"name", "arguments"}}."""
    message = dict(message)
    if message.get("tool_calls"):
        message["tool_calls"] = [{"type": "function", "function": dict(call)} for call in message["tool_calls"]]
    return message


_SPECIAL = re.compile(r"(<\|[^|<>]+\|>|</?s>)")  # what special tokens' names look like in rendered text


def _special_name(tokenizer: Tokenizer, token_id: int) -> str:
    """The name a template writes for BOS or EOS: `<s>` / `</s>`, or Llama 3's `<|begin_of_text|>` ..."""
    for name in ("<s>", "</s>", "<|begin_of_text|>", "<|end_of_text|>"):
        try:
            if tokenizer.special_id(name) == token_id:
                return name
        except KeyError:
            continue
    return tokenizer.id_to_piece(token_id)


def end_of_turn(tokenizer: Tokenizer, template: str) -> int:
    """The id that ends an assistant's turn in `template`: what a fine-tuned model learns to emit."""
    return tokenizer.special_id("<|eot_id|>") if template == "llama3" else tokenizer.eos_id


def detect_chat_template(tokenizer: Tokenizer, hf_chat_template: str | None = None) -> str | None:
    """The chat template a model uses: from the `chat_template` of its Hugging Face
    tokenizer_config.json when given, else llama3 for the Llama 3 tokenizer. None when neither tells:
    the LLaMA SentencePiece tokenizer serves LLaMA 1 and base models as well as Llama 2 chat.
    """
    if hf_chat_template is not None:
        if "<|start_header_id|>" in hf_chat_template:
            return "llama3"
        if B_INST in hf_chat_template:
            return "llama2"
    return "llama3" if tokenizer.kind == "tiktoken" else None
