"""The tokenizer interface, and `load_tokenizer`, which recognises a tokenizer file by its content.

Three formats are supported, one implementation each under `llama_jax/tokenizers/`:
  - SentencePiece `tokenizer.model` (LLaMA 1 and 2, and models trained with `tokenizer_training.py`),
  - llama2.c `tokenizer.bin` (the small TinyStories models),
  - tiktoken BPE ranks `tokenizer.model` (Llama 3, 3.1, 3.2).
"""
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


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer file of any supported format, recognised by its content rather than its name.

    Raises FileNotFoundError when the file is missing and ValueError, naming the file, when it is empty,
    truncated or of no supported format.
    """
    # Imported here: the implementations import `Tokenizer` from this module.
    from llama_jax.tokenizers import llama2c_tokenizer, sentencepiece_tokenizer, tiktoken_tokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    data = path.read_bytes()
    if not data:
        raise ValueError(f"{path}: empty file, not a tokenizer")
    # Order matters: tiktoken files are ASCII text, whose first 4 bytes never read as a small int32, and
    # SentencePiece protobufs never start with one either (see llama2c_tokenizer.looks_like).
    if tiktoken_tokenizer.looks_like(data):
        return tiktoken_tokenizer.TiktokenTokenizer(data, path)
    if llama2c_tokenizer.looks_like(data):
        return llama2c_tokenizer.Llama2cTokenizer(data, path)
    if sentencepiece_tokenizer.looks_like(data):
        return sentencepiece_tokenizer.SentencePieceTokenizer(data, path)
    raise ValueError(
        f"{path}: not a tokenizer file (expected a SentencePiece model, a llama2.c tokenizer.bin "
        "or Llama 3 tiktoken ranks)"
    )
