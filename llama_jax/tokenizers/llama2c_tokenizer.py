"""llama2.c `tokenizer.bin` files, encoded and decoded exactly as karpathy/llama2.c run.c does.

File layout (llama2.c tokenizer.py export): int32 max_token_length, then per token: float32 score,
int32 byte length, the UTF-8 bytes. Ids 0, 1, 2 are <unk>, BOS ("\\n<s>\\n"), EOS ("\\n</s>\\n"); ids 3..258
are the byte tokens "<0x00>".."<0xFF>"; the vocabulary size is not stored (run.c takes it from the model).
"""

from __future__ import annotations

import heapq
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import sentencepiece
from sentencepiece import sentencepiece_model_pb2

from llama_jax.tokenizers.base import Tokenizer

_UNK, _BOS, _EOS = 0, 1, 2
_FIRST_BYTE_ID = 3  # run.c: byte b falls back to id b + 3
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")
# Real files have max_token_length of at most a few dozen. Bounding it keeps protobufs and text out: their
# first four bytes, read as a little-endian int32, are always larger.
_MAX_PLAUSIBLE_TOKEN_LENGTH = 65535
# run.c only merges pairs whose score beats its starting best_score, the float32 nearest -1e10.
_NO_MERGE_SCORE = struct.unpack("<f", struct.pack("<f", -1e10))[0]


def looks_like(data: bytes) -> bool:
    """Whether `data` starts like a llama2.c tokenizer.bin (a small positive int32)."""
    return len(data) >= 4 and 0 < struct.unpack_from("<i", data)[0] <= _MAX_PLAUSIBLE_TOKEN_LENGTH


def _parse(data: bytes, path: Path) -> tuple[list[bytes], list[float]]:
    """Pieces and scores; ValueError naming the file when a record is cut short or malformed."""
    (max_token_length,) = struct.unpack_from("<i", data)
    pieces: list[bytes] = []
    scores: list[float] = []
    offset = 4
    while offset < len(data):
        if offset + 8 > len(data):
            raise ValueError(f"{path}: truncated llama2.c tokenizer (token {len(pieces)} cut short)")
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if not 0 <= length <= max_token_length or offset + length > len(data):
            raise ValueError(f"{path}: truncated or corrupt llama2.c tokenizer (token {len(pieces)})")
        pieces.append(data[offset : offset + length])
        scores.append(score)
        offset += length
    if len(pieces) < _FIRST_BYTE_ID + 256:
        raise ValueError(f"{path}: truncated llama2.c tokenizer ({len(pieces)} tokens, not even the 259 fixed ones)")
    if pieces[_FIRST_BYTE_ID] != b"<0x00>" or pieces[_FIRST_BYTE_ID + 255] != b"<0xFF>":
        raise ValueError(f"{path}: not a llama2.c tokenizer (ids 3..258 must be the byte tokens <0x00>..<0xFF>)")
    return pieces, scores


class Llama2cTokenizer(Tokenizer):
    """The BPE of llama2.c run.c: code points, byte fallback, then greedy best-score pair merges."""

    kind = "llama2c"
    file_name = "tokenizer.bin"

    def __init__(self, data: bytes, path: Path):
        self.path = path
        self._pieces, self._scores = _parse(data, path)
        # run.c looks pieces up by exact string; should a piece repeat, the lowest id answers here.
        self._id_of: dict[bytes, int] = {}
        for token_id, piece in enumerate(self._pieces):
            self._id_of.setdefault(piece, token_id)
        self.vocab_size = len(self._pieces)
        self.bos_id, self.eos_id, self.pad_id = _BOS, _EOS, _UNK
        # These models mark story boundaries with BOS and run.c stops generating when BOS comes.
        self.stop_ids = (_BOS, _EOS)
        self._sentencepiece = _as_sentencepiece(self._pieces, self._scores)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        # SentencePiece reads a "▁" in the text as the space it stands for; run.c as the character it is.
        if self._sentencepiece is not None and "\u2581" not in text:
            return [_BOS] * bos + self._sentencepiece.encode(text) + [_EOS] * eos
        return self.encode_like_run_c(text, bos, eos)

    def encode_like_run_c(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """run.c's encode in Python: what `encode` runs for a vocabulary SentencePiece cannot stand in for,
        and the reference the SentencePiece path is tested against."""
        ids: list[int] = []
        # run.c prepends the dummy-prefix space only to non-empty text.
        for char in (" " + text) if text else "":
            utf8 = char.encode("utf-8")
            token_id = self._id_of.get(utf8)
            if token_id is None:
                ids.extend(byte + _FIRST_BYTE_ID for byte in utf8)
            else:
                ids.append(token_id)
        return [_BOS] * bos + self._merge(ids) + [_EOS] * eos

    def _merge(self, ids: list[int]) -> list[int]:
        """run.c's merge loop, in O(n log n): repeatedly merge the adjacent pair whose merged piece scores
        highest, the leftmost pair among equal scores.

        A heap keyed (-score, position) gives the same order as run.c's left-to-right scan with a strict
        `>`: positions are those of the left token, which keep their relative order as tokens merge.
        Heap entries carry the pair they were made for and are skipped once that pair is gone.
        """
        tokens = list(ids)
        n = len(tokens)
        alive = [True] * n
        right = list(range(1, n + 1))
        left = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int, int]] = []

        def push(i: int) -> None:
            j = right[i]
            if j < n:
                merged = self._id_of.get(self._pieces[tokens[i]] + self._pieces[tokens[j]])
                if merged is not None and self._scores[merged] > _NO_MERGE_SCORE:
                    heapq.heappush(heap, (-self._scores[merged], i, tokens[i], tokens[j], merged))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, left_token, right_token, merged = heapq.heappop(heap)
            j = right[i]
            if not alive[i] or j >= n or tokens[i] != left_token or tokens[j] != right_token:
                continue
            tokens[i] = merged
            alive[j] = False
            right[i] = right[j]
            if right[j] < n:
                left[right[j]] = i
            if left[i] >= 0:
                push(left[i])
            push(i)
        return [token for token, keep in zip(tokens, alive) if keep]

    def decode(self, ids: Sequence[int]) -> str:
        """The text run.c prints for `ids`, with the text treated as starting right after BOS.

        As in run.c, a piece that follows BOS loses its leading space and "<0xNN>" pieces become raw
        bytes. Unlike run.c, which hides every lone byte that is not printable ASCII, bytes are kept and
        the whole is read as UTF-8, so characters that fell back to bytes come back. Decode whole
        sequences, not pieces of one: each call starts as if after BOS.
        """
        ids = self.ids_in_vocabulary(ids)
        out = bytearray()
        previous = _BOS
        for token_id in ids:
            if token_id not in (_BOS, _EOS):
                piece = self._pieces[token_id]
                if previous == _BOS and piece.startswith(b" "):
                    piece = piece[1:]
                byte_token = _BYTE_PIECE.fullmatch(piece)
                out += bytes([int(byte_token[1], 16)]) if byte_token else piece
            previous = token_id
        return out.decode("utf-8", errors="replace")

    def id_to_piece(self, token_id: int) -> str:
        return self._pieces[token_id].decode("utf-8", errors="replace")

    def sentencepiece_model(self) -> bytes:
        """This vocabulary as the serialized SentencePiece model it was exported from."""
        return sentencepiece_model(self._pieces, self._scores)

    def score(self, token_id: int) -> float:
        """The merge score of a piece (the SentencePiece score llama2.c's export copied)."""
        return self._scores[token_id]

    def special_id(self, name: str) -> int:
        specials = {"<unk>": _UNK, "<s>": _BOS, "</s>": _EOS}
        if name not in specials:
            raise KeyError(f"{self.path}: no special token {name!r}")
        return specials[name]


def sentencepiece_model(pieces: list[bytes], scores: list[float]) -> bytes:
    """The serialized SentencePiece BPE model these pieces were exported from (llama2.c's files are exports
    of SentencePiece models): LLaMA's normalizer (no rewriting, a dummy-prefix space, runs of spaces kept),
    byte fallback, the scores as merge priorities. transformers' export reads it too."""
    Piece = sentencepiece_model_pb2.ModelProto.SentencePiece
    model = sentencepiece_model_pb2.ModelProto()
    model.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    model.trainer_spec.vocab_size = len(pieces)
    model.trainer_spec.byte_fallback = True
    model.trainer_spec.unk_id, model.trainer_spec.bos_id, model.trainer_spec.eos_id = _UNK, _BOS, _EOS
    model.trainer_spec.pad_id = -1
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.remove_extra_whitespaces = False
    for name, kind in (("<unk>", Piece.UNKNOWN), ("<s>", Piece.CONTROL), ("</s>", Piece.CONTROL)):
        model.pieces.add(piece=name, type=kind, score=0.0)
    for byte in range(256):
        model.pieces.add(piece=f"<0x{byte:02X}>", type=Piece.BYTE, score=0.0)
    for piece, score in zip(pieces[_FIRST_BYTE_ID + 256 :], scores[_FIRST_BYTE_ID + 256 :]):
        # llama2.c's export wrote SentencePiece's "▁" as a plain space; put it back.
        name = piece.decode("utf-8", errors="replace").replace(" ", "\u2581")
        model.pieces.add(piece=name, type=Piece.NORMAL, score=score)
    return model.SerializeToString()


def _as_sentencepiece(pieces: list[bytes], scores: list[float]) -> sentencepiece.SentencePieceProcessor | None:
    """The same encoder in SentencePiece's C++, or None where the vocabulary has something SentencePiece
    would encode differently from run.c.

    run.c's encode is SentencePiece's BPE: code points (the dummy-prefix space first), byte fallback for
    those that are not pieces, then the highest-scoring merge first, the leftmost among equal scores.
    Running it in C++ is what makes encoding fast (the Python loop was a third of an lm-eval run's time on
    stories260K). The two differ only where a vocabulary is not one SentencePiece could have trained: a piece
    repeated, empty, not UTF-8, holding "▁", or with a character that is no piece of its own (run.c can never
    build it, SentencePiece could), or a score at or below run.c's no-merge floor."""
    first = _FIRST_BYTE_ID + 256
    if not all(_utf8(piece) for piece in pieces[first:]):
        return None
    normal = [piece.decode("utf-8") for piece in pieces[first:]]
    singles = {name for name in normal if len(name) == 1}
    if (
        any(name == "" or "\u2581" in name for name in normal)
        or len(set(normal)) != len(normal)
        or any(char not in singles for name in normal for char in name)
        or any(score <= _NO_MERGE_SCORE for score in scores[first:])
    ):
        return None
    return sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model(pieces, scores))


def _utf8(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
