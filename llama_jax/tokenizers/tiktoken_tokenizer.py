"""Llama 3 tiktoken `tokenizer.model` files (Llama 3, 3.1, 3.2), built as Meta's reference tokenizer does.

The file holds one `base64(token bytes) rank` line per mergeable token; 256 special tokens follow the
ranks. The encoding is assembled locally with `tiktoken.Encoding`: nothing is downloaded.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import tiktoken

from llama_jax.tokenizers.base import Tokenizer

# From meta-llama/llama3 and llama-models llama/tokenizer.py.
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3.1 names (meta-llama/llama-models models/llama3/api/tokenizer.py). Llama 3.0 called the ids
# that 3.1 gave new names <|reserved_special_token_N|>; the ids chat uses are the same in both.
_NAMED_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
_NUM_SPECIALS = 256
# Meta's reference cuts inputs as below; the cut points change the tokens, so they are kept exactly.
# tiktoken panics beyond ~400k characters per call,
_MAX_ENCODE_CHARS = 400_000
# and is quadratic in the length of a run of whitespace or of non-whitespace (openai/tiktoken#195).
_MAX_RUN_CHARS = 25_000
_RUN = re.compile(r"\s+|\S+")
_RANK_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+")


def looks_like(data: bytes) -> bool:
    """Whether `data` starts with a `base64 rank` line."""
    return _RANK_LINE.fullmatch(data.split(b"\n", 1)[0].rstrip(b"\r")) is not None


def _parse_ranks(data: bytes, path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line_number, line in enumerate(data.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split(b" ")
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise ValueError(f"{path}: malformed tiktoken BPE ranks at line {line_number}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: tiktoken ranks are not 0..{len(ranks) - 1}, each once")
    return ranks


def _split_for_tiktoken(text: str) -> Iterator[str]:
    """`text` in the pieces Meta's reference encodes separately: chunks of at most 400k characters, each cut
    inside every run of whitespace or non-whitespace longer than 25k, every 25k characters of the run."""
    for start in range(0, len(text), _MAX_ENCODE_CHARS):
        chunk = text[start : start + _MAX_ENCODE_CHARS]
        if len(chunk) <= _MAX_RUN_CHARS:
            yield chunk
            continue
        cuts = [
            run.start() + offset
            for run in _RUN.finditer(chunk)
            for offset in range(_MAX_RUN_CHARS, run.end() - run.start(), _MAX_RUN_CHARS)
        ]
        bounds = [0, *cuts, len(chunk)]
        yield from (chunk[a:b] for a, b in zip(bounds, bounds[1:]))


class TiktokenTokenizer(Tokenizer):
    """The Llama 3 tokenizer: tiktoken BPE over Meta's ranks, 256 special tokens after them."""

    kind = "tiktoken"
    file_name = "tokenizer.model"

    def __init__(self, data: bytes, path: Path):
        self.path = path
        ranks = _parse_ranks(data, path)
        self._num_ranks = len(ranks)
        names = _NAMED_SPECIALS + tuple(
            f"<|reserved_special_token_{i}|>" for i in range(2, 2 + _NUM_SPECIALS - len(_NAMED_SPECIALS))
        )
        self._specials = {name: self._num_ranks + i for i, name in enumerate(names)}
        self._special_names = {token_id: name for name, token_id in self._specials.items()}
        self.ranks = ranks  # token bytes -> rank (exports rebuild the BPE merges from them)
        self._encoding = tiktoken.Encoding(
            name=path.name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self._specials
        )
        self.vocab_size = self._num_ranks + _NUM_SPECIALS
        self.bos_id = self._specials["<|begin_of_text|>"]
        self.eos_id = self._specials["<|end_of_text|>"]
        self.pad_id = self._specials["<|finetune_right_pad_id|>"]
        # Base models end with <|end_of_text|>, chat turns with <|eot_id|>, tool calls with <|eom_id|>.
        self.stop_ids = (self.eos_id, self._specials["<|eom_id|>"], self._specials["<|eot_id|>"])

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = [self.bos_id] * bos
        for piece in _split_for_tiktoken(text):
            # encode_ordinary: text such as "<|eot_id|>" in user input stays text (Meta's disallowed_special=()).
            ids += self._encoding.encode_ordinary(piece)
        return ids + [self.eos_id] * eos

    def decode(self, ids: Sequence[int]) -> str:
        ids = self.ids_in_vocabulary(ids)
        return self._encoding.decode([token_id for token_id in ids if token_id < self._num_ranks])

    def id_to_piece(self, token_id: int) -> str:
        if token_id in self._special_names:
            return self._special_names[token_id]
        return self._encoding.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")

    def piece_bytes(self, token_id: int) -> bytes:
        """The bytes of an ordinary token (part of a character, for some): what grammar masks match."""
        return self._encoding.decode_single_token_bytes(token_id)

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self._specials)

    def special_id(self, name: str) -> int:
        if name not in self._specials:
            raise KeyError(f"{self.path}: no special token {name!r}")
        return self._specials[name]
