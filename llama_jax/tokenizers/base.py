"""The interface every tokenizer implements; `llama_jax.tokenizers.load_tokenizer` picks the implementation."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
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
        """Text of `ids`; BOS, EOS and other special ids produce no text. An id outside the vocabulary is a
        ValueError that names it (`ids_in_vocabulary`)."""

    def ids_in_vocabulary(self, ids: Iterable[int]) -> list[int]:
        """`ids` as a list; ValueError naming the first outside 0..vocab_size-1. A checkpoint may have embedding
        rows past its tokenizer's last id (a vocabulary padded to a round size, `model_dir.PADDING_ROWS`): those
        rows have no text and a generator must not sample them; decoding one is refused, not dropped or misread."""
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            outside = next(token_id for token_id in ids if not 0 <= token_id < self.vocab_size)
            raise ValueError(
                f"token id {outside} is outside the {self.vocab_size} ids of tokenizer {self.path} "
                "(an embedding row past the tokenizer's last id has no text)"
            )
        return ids

    @abc.abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of one id, as text (for debugging and display)."""

    @abc.abstractmethod
    def special_id(self, name: str) -> int:
        """Id of a special token by name, e.g. "<|eot_id|>" or "</s>"; KeyError if there is none."""
