"""A tokenized corpus as a tensorstore store, for pods: zarr arrays at a URL that every host reads its own rows
from, over the network, without reading or hashing the rest.

    python -m llama_jax.train.token_store --out gs://BUCKET/corpus data='/data/*.jsonl' tokenizer=tokenizer.model
    python train.py --config configs/llama3_8b_v5p.yaml data=gs://BUCKET/corpus

    URL/llama_jax_tokens.json    what the store holds (written last: a store without it is unfinished)
    URL/tokens/                  zarr, (n_tokens,) uint16 or uint32: [BOS doc EOS][BOS doc EOS]...
    URL/starts/                  zarr, (n_docs + 1,) int64: where each document starts (SFT packing)
    URL/weights/                 zarr, (n_tokens,) uint8, SFT only: 1 on the tokens the model learns
    URL/tokenizer/FILE           the tokenizer the ids come from

URLs are tensorstore's: gs://bucket/path/ (Google Cloud Storage, with the host's application default
credentials: on a TPU VM its service account, elsewhere `gcloud auth application-default login` or
GOOGLE_APPLICATION_CREDENTIALS), file:///abs/path/, or a local directory; memory:// serves the tests.

A store is built once from a local corpus (the same tokenization as `data=` files, through the cache); its
content key is written into it, so a run's fingerprint costs one small read. Document boundaries inside a
pretraining row are read from the rows themselves: every document starts with BOS and nowhere else (checked
when the store is built), so no host needs the table of document starts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from llama_jax.tokenizers import Tokenizer

META_FILE = "llama_jax_tokens.json"
STORE_FORMAT = 1
_ARRAYS = ("tokens", "starts", "weights")
_CHUNK = 1 << 16  # elements per zarr chunk: 128 KiB of uint16 tokens, a few per 8192-token row
_WRITE_BLOCK = 1 << 24  # elements copied into the store per write
# One context for every store this process opens: tensorstore's memory:// stores live in their context,
# and its chunk cache is shared.
_CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 256 << 20}})


def store_url(data: str) -> str | None:
    """The kvstore URL of `data` when it names a token store (a URL, or a directory holding one); None for
    text and JSONL files."""
    if "://" in data:
        return data.rstrip("/") + "/"
    path = Path(data).expanduser()
    return path.absolute().as_uri() + "/" if (path / META_FILE).is_file() else None


def _kvstore(url: str) -> ts.KvStore:
    try:
        return ts.KvStore.open(url, context=_CONTEXT).result()
    except ValueError as e:
        raise ValueError(f"cannot open token store {url}: {e}") from None


def write_store(
    url: str,
    tokens: np.ndarray,
    starts: np.ndarray,
    weights: np.ndarray | None,
    tokenizer: Tokenizer,
    key: str,
    options: dict[str, Any],
) -> None:
    """Copy a tokenized corpus (memory-mapped arrays) into a new store at `url`. Refused when `url` already
    holds a store or anything but the arrays of an unfinished one."""
    url = url.rstrip("/") + "/"
    kv = _kvstore(url)
    existing = [k.decode() for k in kv.list().result()]
    foreign = [k for k in existing if k.split("/")[0] not in (*_ARRAYS, "tokenizer")]
    if META_FILE in existing or foreign:
        raise ValueError(
            f"{url} already holds {'a token store' if META_FILE in existing else foreign[0]}; choose a new location"
        )
    _check_documents_start_with_bos(tokens, starts, tokenizer.bos_id)
    for name, values in (("tokens", tokens), ("starts", starts), ("weights", weights)):
        if values is not None:
            _write_array(url + name + "/", values)
    kv.write(f"tokenizer/{tokenizer.file_name}", Path(tokenizer.path).read_bytes()).result()
    meta = {
        "format": STORE_FORMAT,
        "key": key,
        "dtype": tokens.dtype.name,
        "tokens": int(len(tokens)),
        "documents": int(len(starts) - 1),
        "bos_id": tokenizer.bos_id,
        "tokenizer": tokenizer.file_name,
        "weights": weights is not None,
        "options": options,
    }
    kv.write(META_FILE, json.dumps(meta, indent=2).encode()).result()


def _check_documents_start_with_bos(tokens: np.ndarray, starts: np.ndarray, bos_id: int) -> None:
    for begin in range(0, len(tokens), _WRITE_BLOCK):
        block = np.asarray(tokens[begin : begin + _WRITE_BLOCK])
        where = begin + np.flatnonzero(block == bos_id)
        expected = starts[(starts >= begin) & (starts < begin + len(block))]
        if len(where) != len(expected) or not np.array_equal(where, expected):
            raise ValueError(
                "a document holds the BOS id inside its text: this tokenizer cannot build a token "
                "store, whose rows mark documents by BOS"
            )


def _write_array(url: str, values: np.ndarray) -> None:
    array = ts.open(
        {"driver": "zarr", "kvstore": url},
        create=True,
        delete_existing=True,
        dtype=values.dtype,
        shape=[len(values)],
        chunk_layout=ts.ChunkLayout(chunk_shape=[_CHUNK]),
        context=_CONTEXT,
    ).result()
    for begin in range(0, len(values), _WRITE_BLOCK):
        end = min(begin + _WRITE_BLOCK, len(values))  # tensorstore does not clip slices as numpy does
        array[begin:end].write(np.asarray(values[begin:end])).result()


@dataclasses.dataclass
class StoreCorpus:
    """The corpus interface `batching.PackedRows` reads (as `data.TokenizedCorpus`), over a token store."""

    url: str
    meta: dict[str, Any]

    def __post_init__(self):
        self._tokens = self._open("tokens")
        self._weights = self._open("weights") if self.meta["weights"] else None
        self._starts: np.ndarray | None = None

    @classmethod
    def open(cls, url: str) -> StoreCorpus:
        url = url.rstrip("/") + "/"
        found = _kvstore(url).read(META_FILE).result()
        if found.state != "value":
            raise ValueError(
                f"{url} holds no finished token store (no {META_FILE}); build one with "
                "python train.py ... --write-token-store URL"
            )
        meta = json.loads(found.value)
        if meta.get("format") != STORE_FORMAT:
            raise ValueError(f"{url}: token store format {meta.get('format')!r}, this version reads {STORE_FORMAT}")
        return cls(url, meta)

    def _open(self, name: str) -> ts.TensorStore:
        return ts.open(
            {"driver": "zarr", "kvstore": self.url + name + "/"}, open=True, read=True, context=_CONTEXT
        ).result()

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def n_tokens(self) -> int:
        return self.meta["tokens"]

    @property
    def starts(self) -> np.ndarray:
        """Every document's start: read whole, and only for SFT packing, whose corpora are small."""
        if self._starts is None:
            self._starts = self._open("starts").read().result()
        return self._starts

    def read_rows(self, start: np.ndarray, end: np.ndarray, width: int) -> np.ndarray:
        return _read_rows(self._tokens, start, end, width)

    def read_weights(self, start: np.ndarray, end: np.ndarray, width: int) -> np.ndarray | None:
        return None if self._weights is None else _read_rows(self._weights, start, end, width)

    def document_starts(self, index: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        return tokens == self.meta["bos_id"]

    def tokenizer_bytes(self) -> bytes:
        return _kvstore(self.url).read(f"tokenizer/{self.meta['tokenizer']}").result().value


def _read_rows(array: ts.TensorStore, start: np.ndarray, end: np.ndarray, width: int) -> np.ndarray:
    """(rows, width) of the contiguous ranges [start, min(end, start + width)), zero beyond; all reads in
    flight at once."""
    stops = np.minimum(end, start + width)
    reads = [array[int(a) : int(b)].read() for a, b in zip(start, stops)]
    out = np.zeros((len(start), width), array.dtype.numpy_dtype)
    for row, read in enumerate(reads):
        values = read.result()
        out[row, : len(values)] = values
    return out
