"""The interface every tokenizer implements; `llama_jax.tokenizers.load_tokenizer` picks the implementation."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path


class Tokenizer(abc.ABC):
    """Text <-> token ids for one vocabulary.

    Attributes every implementation sets:
      kind: "sentencepiece" | "llama2c" | "tiktoken".
      path: the file it was loaded from (converters copy it into checkpoint directories).
      file_name: the name that file gets inside a checkpoint directory.
      vocab_size, bos_id, eos_id, pad_id: pad_id is a real id even where the format has none, so
        padded batches index the embedding safely; padding is always masked.
      stop_ids: ids that end generation.
    """

    kind: str
    path: Path
    file_name: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    stop_ids: tuple[int, ...]

    @abc.abstractmethod
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`. Special-token names inside `text` are encoded as plain text."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; BOS, EOS and other special ids produce no text."""

    @abc.abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of one id, as text (for debugging and display)."""

    @abc.abstractmethod
    def special_id(self, name: str) -> int:
        """Id of a special token by name, e.g. "<|eot_id|>" or "</s>"; KeyError if there is none."""
