"""Chat prompts: the Llama 2 and Llama 3 templates built at the token level, as Meta's reference code builds
them, or a Jinja template as Hugging Face tokenizers carry one (`tokenizer_config.json`'s `chat_template`).

Building ids piece by piece (rather than rendering a string and encoding it) keeps special tokens out of
reach of user text: "<|eot_id|>" typed by a user stays plain text.

  llama2: meta-llama/llama llama/generation.py `chat_completion`
  llama3: meta-llama/llama3 llama/tokenizer.py `ChatFormat.encode_dialog_prompt`

A Jinja template is rendered as transformers renders it (a sandboxed environment with `trim_blocks` and
`lstrip_blocks`; `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`), and the text
encoded with the tokenizer's special tokens (`<s>`, `<|eot_id|>`, ...) read as their ids — so there, as in
transformers, a special token's name typed by a user becomes that token.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from llama_jax.tokenizers import Tokenizer

Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": str}

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def _validate(messages: Sequence[Message]) -> None:
    """An optional system message, then user and assistant alternating, ending with user."""
    if not messages:
        raise ValueError("a chat needs at least one user message")
    for i, message in enumerate(messages):
        if not {"role", "content"} <= set(message) or not isinstance(message["content"], str):
            raise ValueError(f"message {i} must be {{'role': ..., 'content': str}}, got {dict(message)!r}")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    roles = [message["role"] for message in turns]
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(roles))]
    if roles != expected or roles[-1:] != ["user"]:
        raise ValueError(
            "chat roles must be an optional 'system' first, then 'user' and 'assistant' alternating, "
            f"ending with 'user'; got {[message['role'] for message in messages]}"
        )


def _llama2(tokenizer: Tokenizer, messages: Sequence[Message]) -> list[int]:
    if messages[0]["role"] == "system":
        first = {"role": "user", "content": B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"]}
        messages = [first, *messages[2:]]
    ids: list[int] = []
    for user, answer in zip(messages[::2], messages[1::2]):
        text = f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "
        ids += tokenizer.encode(text, bos=True, eos=True)
    return ids + tokenizer.encode(f"{B_INST} {messages[-1]['content'].strip()} {E_INST}", bos=True, eos=False)


def _llama3(tokenizer: Tokenizer, messages: Sequence[Message]) -> list[int]:
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
    for message in messages:
        ids += header(message["role"]) + tokenizer.encode(message["content"].strip(), bos=False) + [eot]
    return ids + header("assistant")


TEMPLATES: dict[str, Callable[[Tokenizer, Sequence[Message]], list[int]]] = {
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


def encode_dialog(tokenizer: Tokenizer, template: str, messages: Sequence[Message]) -> list[int]:
    """Prompt ids for `messages` in chat `template` (a name in TEMPLATES, or Jinja text), ready for the model to
    write the assistant's turn. The ids already start with BOS: do not add another."""
    check_template(template)
    _validate(messages)
    if template in TEMPLATES:
        return TEMPLATES[template](tokenizer, messages)
    return _jinja(tokenizer, template, messages)


def _jinja_environment():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)


def _jinja(tokenizer: Tokenizer, template: str, messages: Sequence[Message]) -> list[int]:
    import jinja2

    def raise_exception(message: str):
        raise ValueError(f"the chat template refused the conversation: {message}")

    try:
        text = (
            _jinja_environment()
            .from_string(template)
            .render(
                messages=[dict(m) for m in messages],
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
