"""Prompt text → prompt ids: BOS + text, or a user message in the checkpoint's chat template; and the check
that a prompt leaves room for the tokens to generate."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from llama_jax.chat import encode_dialog
from llama_jax.tokenizers import Tokenizer


@dataclasses.dataclass(frozen=True)
class PromptEncoder:
    """Text → prompt ids (BOS first, or a chat template's ids), refusing prompts that leave no room for
    max_new_tokens within the model's max_seq_len."""

    tokenizer: Tokenizer
    chat_template: str | None
    max_seq_len: int
    max_new_tokens: int

    def encode(self, prompt: str, index: int = 0) -> list[int]:
        if self.chat_template:
            ids = encode_dialog(self.tokenizer, self.chat_template, [{"role": "user", "content": prompt}])
        else:
            ids = self.tokenizer.encode(prompt, bos=True)
        check_fits(len(ids), self.max_new_tokens, self.max_seq_len, index)
        return ids


def check_fits(n_tokens: int, max_new_tokens: int, max_seq_len: int, index: int = 0) -> None:
    """ValueError unless prompt `index` (0-based) of n_tokens leaves room for max_new_tokens."""
    needed = n_tokens + max_new_tokens
    if needed > max_seq_len:
        raise ValueError(
            f"prompt {index + 1} has {n_tokens} tokens; with max_new_tokens {max_new_tokens} it "
            f"needs {needed} positions, but the model allows {max_seq_len}"
        )


def chat_template_for(checkpoint_template: str | None, chat: bool) -> str | None:
    """The template to apply: the checkpoint's when chat is asked for, an error when it has none."""
    if chat and not checkpoint_template:
        raise ValueError(
            "this checkpoint has no chat template (its config.json chat_template is null); generate without chat"
        )
    return checkpoint_template if chat else None


def completion_text(tokenizer: Tokenizer, prompt_ids: Sequence[int], generated: Sequence[int]) -> str:
    """The text the generated ids add after the prompt. Decoding them together with the prompt keeps the
    spaces that tokenizers drop at the start of a decoded sequence."""
    prompt_text = tokenizer.decode(prompt_ids)
    full = tokenizer.decode(list(prompt_ids) + list(generated))
    return full[len(prompt_text) :] if full.startswith(prompt_text) else tokenizer.decode(generated)
