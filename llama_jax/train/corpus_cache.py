"""A tokenized corpus in this host's cache: one entry per (corpus, tokenizer, options), built once, checked on
every read.

The cache entry of a corpus:

    tokens   [BOS doc0 EOS][BOS doc1 EOS]...   uint16 (uint32 for vocabularies over 65536)
    starts   offset of each document's first token, then the total length
    weights  (SFT only) 1 where a token is a training target: the response, not the prompt

The arrays are raw files (tokens.bin, weights.bin; dtype and sizes in meta.json) read through `np.memmap`:
a batch reads only the rows it needs, the operating system's page cache shares them between the processes
of a host, they are written in one streaming pass, and nothing beyond numpy is needed to inspect them.
(A tensorstore/zarr array would add chunked compression, which token ids barely benefit from, and a chunk
lookup to every random read.)

The cache key hashes the corpus bytes, the tokenizer file and the options that change the tokens, so a
changed file is re-tokenized and an unchanged one never is. Entries are assembled in a temporary directory
and renamed into place: a killed tokenization leaves nothing that looks complete. meta.json keeps a CRC-32 of
every 16 MiB of tokens.bin and weights.bin and of starts.npy; every run checks them before reading (about a
second per GB), and an entry that fails (cut short, bytes changed) is reported and built again, never read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from llama_jax.errors import errors_naming
from llama_jax.staging import staged_output_dir

CACHE_FORMAT = 3  # 3: meta.json holds the files' checksums
CHECKED_BYTES = 16 << 20  # the cache's files are checksummed this many bytes at a time
log = logging.getLogger("llama_jax")

Example = tuple[list[int], list[int] | None]  # token ids (BOS/EOS included), target weights or None

_ENTRY_FILES = ("tokens.bin", "weights.bin", "starts.npy")


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
    """A corpus in this host's cache. `batching.PackedRows` reads it through the methods below, which a
    token store (`token_store.StoreCorpus`) implements too."""

    tokens: np.ndarray  # (n_tokens,) uint16/uint32, memory-mapped
    starts: np.ndarray  # (n_docs + 1,) int64
    weights: np.ndarray | None  # (n_tokens,) uint8, or None: every token is a target
    key: str  # content hash of corpus, tokenizer and options

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def read_rows(self, start: np.ndarray, end: np.ndarray, width: int) -> np.ndarray:
        """(rows, width): tokens [start, start + width) of each row; what lies at or beyond `end` is junk."""
        return self.tokens[np.minimum(start[:, None] + np.arange(width), end[:, None] - 1)]

    def read_weights(self, start: np.ndarray, end: np.ndarray, width: int) -> np.ndarray | None:
        if self.weights is None:
            return None
        return self.weights[np.minimum(start[:, None] + np.arange(width), end[:, None] - 1)]

    def document_starts(self, index: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """True where a document starts, for token positions `index` (their ids `tokens` unused here)."""
        found = np.minimum(np.searchsorted(self.starts, index), len(self.starts) - 1)
        return self.starts[found] == index


def corpus_key(raw_key: str, tokenizer_path: Path, options: dict) -> str:
    """The cache key of a corpus: its files' hash (`sources.corpus_hash`), the tokenizer file and the options
    that change the tokens."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}|{raw_key}|{json.dumps(options, sort_keys=True)}|".encode())
    digest.update(tokenizer_path.read_bytes())
    return digest.hexdigest()


def tokenize_corpus(examples: Iterable[Example], key: str, cache_dir: Path, dtype=np.uint16) -> TokenizedCorpus:
    """The cached corpus for `key`, built from `examples` when it is not cached yet. Documents with no
    text (only BOS and EOS) are dropped; a corpus with none left is an error."""
    entry = cache_dir / f"tokens-{key[:24]}"
    problem = _entry_problem(entry) if (entry / "meta.json").is_file() else None
    if problem is not None:
        log.warning("the tokenized corpus %s is damaged (%s): tokenizing it again", entry, problem)
        shutil.rmtree(entry, ignore_errors=True)
    if not (entry / "meta.json").is_file():
        _build_entry(examples, entry, dtype)
        problem = _entry_problem(entry)
        if problem is not None:  # written and at once unreadable: the disk, not the data
            raise ValueError(f"the tokenized corpus {entry} cannot be read back as written: {problem}")
    meta = json.loads((entry / "meta.json").read_text())
    weights = entry / "weights.bin"
    return TokenizedCorpus(
        tokens=np.memmap(entry / "tokens.bin", dtype=meta["dtype"], mode="r"),
        starts=np.load(entry / "starts.npy"),
        weights=np.memmap(weights, dtype=np.uint8, mode="r") if weights.is_file() else None,
        key=key,
    )


def _build_entry(examples: Iterable[Example], entry: Path, dtype) -> None:
    # A write that fails (a full disk) names the entry it was building, not a staging file gone by then.
    with staged_output_dir(entry, keep_existing=True) as staging, errors_naming(entry):
        starts = [0]
        with open(staging / "tokens.bin", "wb") as tokens, open(staging / "weights.bin", "wb") as weights:
            for ids, target_weights in examples:
                if len(ids) <= 2:
                    continue
                tokens.write(np.asarray(ids, dtype).tobytes())
                if target_weights is not None:
                    weights.write(np.asarray(target_weights, np.uint8).tobytes())
                starts.append(starts[-1] + len(ids))
        if len(starts) == 1:
            raise ValueError("the corpus holds no text: every document is empty")
        if (staging / "weights.bin").stat().st_size == 0:  # pretraining: every token is a target
            os.remove(staging / "weights.bin")
        np.save(staging / "starts.npy", np.asarray(starts, np.int64))
        meta = {
            "format": CACHE_FORMAT,
            "dtype": np.dtype(dtype).name,
            "tokens": starts[-1],
            "documents": len(starts) - 1,
            "checksums": {name: _chunk_crcs(staging / name) for name in _ENTRY_FILES if (staging / name).is_file()},
        }
        (staging / "meta.json").write_text(json.dumps(meta) + "\n")


def _chunk_crcs(path: Path) -> list[int]:
    """CRC-32 of each CHECKED_BYTES of `path` (an empty file: none)."""
    crcs = []
    with open(path, "rb") as f:
        while chunk := f.read(CHECKED_BYTES):
            crcs.append(zlib.crc32(chunk))
    return crcs


def _entry_problem(entry: Path) -> str | None:
    """Why a cache entry cannot be read as the corpus it was built from, or None."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        checksums = meta["checksums"]
        itemsize = np.dtype(meta["dtype"]).itemsize
        expected_sizes = {"tokens.bin": meta["tokens"] * itemsize, "weights.bin": meta["tokens"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"meta.json is unreadable: {e}"
    if meta.get("format") != CACHE_FORMAT:
        return f"it was written in cache format {meta.get('format')}, not {CACHE_FORMAT}"
    for name, crcs in checksums.items():
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if name in expected_sizes and size != expected_sizes[name]:
            return f"{name} holds {size} bytes, not {expected_sizes[name]}"
        if _chunk_crcs(path) != crcs:
            return f"{name} changed since it was written"
    if "starts.npy" not in checksums or "tokens.bin" not in checksums:
        return "its checksums are incomplete"
    return None
