"""Tokenizers: the `Tokenizer` interface, one module per file format, and `load_tokenizer`, which recognises a
tokenizer file by its content.

  - SentencePiece `tokenizer.model` (LLaMA 1 and 2, and models trained with `training.py`),
  - llama2.c `tokenizer.bin` (the small TinyStories models),
  - tiktoken BPE ranks `tokenizer.model` (Llama 3, 3.1, 3.2).
"""

from __future__ import annotations

from pathlib import Path

from llama_jax.tokenizers import llama2c_tokenizer, sentencepiece_tokenizer, tiktoken_tokenizer
from llama_jax.tokenizers.base import Tokenizer

__all__ = ["Tokenizer", "load_tokenizer"]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer file of any supported format, recognised by its content rather than its name.

    Raises FileNotFoundError when the file is missing and ValueError, naming the file, when it is empty,
    truncated or of no supported format.
    """
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
