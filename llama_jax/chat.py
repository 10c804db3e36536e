"""Chat prompts built at the token level, as Meta's reference code builds them.

Building ids piece by piece (rather than rendering a string and encoding it) keeps special tokens out of
reach of user text: "<|eot_id|>" typed by a user stays plain text.

  llama2: meta-llama/llama llama/generation.py `chat_completion`
  llama3: meta-llama/llama3 llama/tokenizer.py `ChatFormat.encode_dialog_prompt`
"""

from __future__ import annotations

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


def encode_dialog(tokenizer: Tokenizer, template: str, messages: Sequence[Message]) -> list[int]:
    """Prompt ids for `messages` in chat `template`, ready for the model to write the assistant's turn.

    The ids already start with BOS: do not add another.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; known: {', '.join(TEMPLATES)}")
    _validate(messages)
    return TEMPLATES[template](tokenizer, messages)


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
