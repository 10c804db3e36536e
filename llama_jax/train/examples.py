"""SFT and preference records encoded as training examples: token ids and, per token, whether it is a target.

Without a chat template an SFT example is BOS + prompt + response + EOS, the text simply continued. With one
("llama2", "llama3") the prompt is the user's message in that template, exactly as `infer.py --chat`
builds it, and the response ends with the template's end-of-turn token, which the model must learn to
emit. Prompt tokens get weight 0, response tokens (and the end token) weight 1.

A preference record becomes two consecutive examples, prompt + chosen then prompt + rejected, each encoded as
an SFT example is.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from llama_jax.chat import encode_dialog, end_of_turn
from llama_jax.tokenizers import Tokenizer
from llama_jax.train.sources import dpo_records, sft_records


def encode_example(
    tokenizer: Tokenizer, prompt: str, response: str, chat_template: str | None
) -> tuple[list[int], list[int]]:
    """(ids, weights): weights are 1 on the tokens the model learns to produce."""
    prompt_ids = encode_prompt(tokenizer, prompt, chat_template)
    if chat_template is None:
        response_ids = tokenizer.encode(response, bos=False, eos=True)
    else:
        end = end_of_turn(tokenizer, chat_template)
        response_ids = tokenizer.encode(response.strip(), bos=False, eos=False) + [end]
    return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)


def encode_prompt(tokenizer: Tokenizer, prompt: str, chat_template: str | None) -> list[int]:
    """A prompt's ids as the model sees them before its response: BOS + the text, or the user's message in the
    chat template (BOS included), ready for the assistant's turn."""
    if chat_template is None:
        return tokenizer.encode(prompt, bos=True, eos=False)
    return encode_dialog(tokenizer, chat_template, [{"role": "user", "content": prompt}])


def response_end(tokenizer: Tokenizer, chat_template: str | None) -> int:
    """The id that ends a response: the template's end of turn, or EOS without a template."""
    return tokenizer.eos_id if chat_template is None else end_of_turn(tokenizer, chat_template)


def sft_examples(
    tokenizer: Tokenizer, files: list[Path], chat_template: str | None
) -> Iterator[tuple[list[int], list[int]]]:
    for where, prompt, response in sft_records(files):
        if not response.strip():
            raise ValueError(f"{where}: the response is empty, nothing to learn from")
        yield encode_example(tokenizer, prompt, response, chat_template)


def dpo_examples(
    tokenizer: Tokenizer, files: list[Path], chat_template: str | None
) -> Iterator[tuple[list[int], list[int]]]:
    """Two examples per record, the chosen one first: consecutive documents of the corpus, one row each."""
    for _, prompt, chosen, rejected in dpo_records(files):
        yield encode_example(tokenizer, prompt, chosen, chat_template)
        yield encode_example(tokenizer, prompt, rejected, chat_template)
