"""SentencePiece `tokenizer.model` files: LLaMA 1 and 2, and models trained by `training.py`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from llama_jax.tokenizers.base import Tokenizer

# A ModelProto starts with its repeated field 1 (`pieces`): tag byte 0x0a.
_PROTO_FIRST_BYTE = 0x0A


def looks_like(data: bytes) -> bool:
    """Whether `data` may be a serialized SentencePiece ModelProto."""
    return data[0] == _PROTO_FIRST_BYTE


class SentencePieceTokenizer(Tokenizer):
    """Wraps `sentencepiece.SentencePieceProcessor`; BOS/EOS are added here, not by the model."""

    kind = "sentencepiece"
    file_name = "tokenizer.model"

    def __init__(self, model_proto: bytes, path: Path):
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:
            raise ValueError(f"{path}: truncated or corrupt SentencePiece model") from e
        self.path = path
        self.vocab_size = self._sp.vocab_size()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path}: SentencePiece model without BOS/EOS pieces, not a LLaMA tokenizer")
        # LLaMA models have no pad piece; 0 (<unk>) is never produced when byte fallback is on.
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0
        # llama2.c-trained models (e.g. stories15M) end a story with BOS instead of EOS; Meta's models
        # never emit BOS, so stopping on it too costs nothing.
        self.stop_ids = (self.eos_id, self.bos_id)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self._sp.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Sequence[int]) -> str:
        ids = self.ids_in_vocabulary(ids)
        # SentencePiece drops control pieces (BOS/EOS) itself and removes the dummy-prefix space.
        return self._sp.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def special_id(self, name: str) -> int:
        token_id = self._sp.piece_to_id(name)
        # piece_to_id answers unk_id for any unknown piece, hence the name check.
        is_special = self._sp.is_control(token_id) or self._sp.is_unknown(token_id)
        if not is_special or self._sp.id_to_piece(token_id) != name:
            raise KeyError(f"{self.path}: no special token {name!r}")
        return token_id
