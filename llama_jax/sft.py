"""Supervised fine-tuning data: JSONL prompt/response records → token ids with the loss on the response.

    {"prompt": "What is the capital of France?", "response": "Paris."}

Without a chat template an example is BOS + prompt + response + EOS, the text simply continued. With one
("llama2", "llama3") the prompt is the user's message in that template, exactly as `infer.py --chat`
builds it, and the response ends with the template's end-of-turn token, which the model must learn to
emit. Prompt tokens get weight 0, response tokens (and the end token) weight 1.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from llama_jax.chat import encode_dialog
from llama_jax.data import is_jsonl, jsonl_records
from llama_jax.tokenizer import Tokenizer


def sft_records(files: list[Path]) -> Iterator[tuple[str, str, str]]:
    """(where, prompt, response) for every record; one clear error for a file or record of another shape."""
    for path in files:
        if not is_jsonl(path):
            raise ValueError(f"SFT data must be JSONL files of {{\"prompt\": ..., \"response\": ...}} records; "
                             f"got {path}")
        for where, record in jsonl_records(path):
            prompt, response = record.get("prompt"), record.get("response")
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise ValueError(f"{where}: an SFT record needs string \"prompt\" and \"response\" fields")
            yield where, prompt, response


def sft_texts(files: list[Path]) -> Iterator[str]:
    """The texts of all records (to train a tokenizer on)."""
    for _, prompt, response in sft_records(files):
        yield prompt
        yield response


def encode_example(tokenizer: Tokenizer, prompt: str, response: str,
                   chat_template: str | None) -> tuple[list[int], list[int]]:
    """(ids, weights): weights are 1 on the tokens the model learns to produce."""
    if chat_template is None:
        prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
        response_ids = tokenizer.encode(response, bos=False, eos=True)
    else:
        prompt_ids = encode_dialog(tokenizer, chat_template, [{"role": "user", "content": prompt}])
        end = tokenizer.special_id("<|eot_id|>") if chat_template == "llama3" else tokenizer.eos_id
        response_ids = tokenizer.encode(response.strip(), bos=False, eos=False) + [end]
    return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)


def sft_examples(tokenizer: Tokenizer, files: list[Path],
                 chat_template: str | None) -> Iterator[tuple[list[int], list[int]]]:
    for where, prompt, response in sft_records(files):
        if not response.strip():
            raise ValueError(f"{where}: the response is empty, nothing to learn from")
        yield encode_example(tokenizer, prompt, response, chat_template)
