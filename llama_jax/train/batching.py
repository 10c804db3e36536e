"""Packed rows over a tokenized corpus, the train/validation split, and the batch of any step.

A row is seq_len + 1 consecutive tokens of the corpus stream (inputs are its first seq_len, targets its last
seq_len). Pretraining cuts the stream into back-to-back windows, so documents are packed densely and a long
one continues in the next row. SFT packs whole examples (in order, as many as fit; an example longer than a
row is truncated) and pads the rest, so a response is never separated from its prompt.

DPO (`pairs`) puts one example in a row: rows 2i and 2i + 1 are pair i's chosen and rejected examples, and
batches hold whole pairs, the chosen row first.

Segment ids number the documents inside a row; the model attends only within a segment, positions restart
at every document start (and at the row start), and the loss mask drops the targets that cross into the
next document, padding, and SFT prompt tokens.

Batch k is a pure function of (seed, k): sample j = k·batch_size + i of the run is row
permutation_e(j mod n) of epoch e = j div n, the permutation a keyed Feistel bijection. So a resumed run
reads exactly what an uninterrupted one would, on any number of hosts, and each host builds only the rows
of its own devices.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from llama_jax.context_parallel import check_sequence_splits
from llama_jax.sharding import logical_to_spec
from llama_jax.train.config import TrainConfig
from llama_jax.train.corpus_cache import TokenizedCorpus
from llama_jax.train.preference import valid_pairs
from llama_jax.train.token_store import StoreCorpus

# (micro-batch index, rows, tokens): every chip of a context-parallel group holds its rows whole, to take its
# share of the load-balanced order from them without moving tokens between chips (`context_parallel.py`).
BATCH_AXES = (None, "batch", None)
# A batch's fields and their dtypes (`PackedRows.arrays`), each (micro-batches, rows, seq_len).
FIELDS = {"inputs": np.int32, "targets": np.int32, "positions": np.int32, "segments": np.int32, "loss_mask": np.float32}


class PackedRows:
    def __init__(
        self,
        corpus: TokenizedCorpus | StoreCorpus,
        seq_len: int,
        pad_id: int,
        whole_documents: bool,
        val_fraction: float,
        pairs: bool = False,
    ):
        self.corpus, self.seq_len, self.pad_id, self.pairs = corpus, seq_len, pad_id, pairs
        n_tokens = corpus.n_tokens
        whole_documents = whole_documents or pairs
        if pairs:
            self._doc_spans = _one_document_per_row(corpus.starts, seq_len + 1)
            if len(self._doc_spans) % 2:
                raise ValueError(f"a preference corpus holds pairs of examples, not {len(self._doc_spans)}")
        else:
            self._doc_spans = _pack_documents(corpus.starts, seq_len + 1) if whole_documents else None
        self.n_rows = len(self._doc_spans) if whole_documents else (n_tokens - 1) // seq_len
        unit = 2 if pairs else 1  # the validation rows hold whole pairs
        self.n_val = unit * max(1, round(self.n_rows // unit * val_fraction))
        self.n_train = self.n_rows - self.n_val
        if self.n_train < 1:
            raise ValueError(
                f"the corpus ({n_tokens} tokens) is too small for seq_len {seq_len}: it makes "
                f"{self.n_rows} row(s), but training and validation need one each"
            )
        weights = getattr(corpus, "weights", None) if whole_documents else None
        # SFT: targets per position (the response tokens); the prefix sums count any span's targets at once.
        self._targets = None if weights is None else np.concatenate([[0], np.cumsum(weights, dtype=np.int64)])
        self.supervision = None if self._targets is None else self._supervision(corpus.starts)
        if self.supervision is not None and self.supervision["train_targets"] == 0:
            raise ValueError(
                f"no training row holds a response token to learn: {self._truncation_line()}; "
                "raise seq_len or shorten the examples"
            )

    def supervised_tokens(self, row_ids: np.ndarray) -> int | None:
        """How many targets the loss counts in these rows (SFT; None for pretraining, where every position is
        one). A row's first token is never a target."""
        if self._targets is None:
            return None
        rows = np.asarray(row_ids).reshape(-1)
        return int(np.sum(self._targets_per_row(rows[rows >= 0])))

    def _targets_per_row(self, row_ids: np.ndarray) -> np.ndarray:
        """Each row's count of targets (response tokens after its first token)."""
        start, end = self.spans(row_ids)
        return self._targets[end] - self._targets[np.minimum(start + 1, end)]

    def _supervision(self, starts: np.ndarray) -> dict[str, int]:
        lengths = np.diff(starts)
        return {
            "examples": len(lengths),
            "longer_than_a_row": int(np.sum(lengths > self.seq_len + 1)),
            "targets": int(self._targets[-1]),
            "train_targets": self.supervised_tokens(np.arange(self.n_train)),
            "validation_targets": self.supervised_tokens(np.arange(self.n_train, self.n_rows)),
        }

    def _truncation_line(self) -> str:
        s = self.supervision
        kept = s["train_targets"] + s["validation_targets"]
        return (
            f"{s['longer_than_a_row']} of {s['examples']} examples are longer than a row of {self.seq_len + 1} "
            f"tokens and cut short, {s['targets'] - kept:,} of their {s['targets']:,} response tokens dropped"
        )

    def pairs_without_response(self) -> int:
        """Preference pairs one of whose responses lies wholly beyond seq_len: the loss leaves them out."""
        targets = self._targets_per_row(np.arange(self.n_rows))
        return int(np.sum(~valid_pairs(targets)))

    def describe_supervision(self) -> str | None:
        """What packing did to an SFT or DPO corpus, for the run's first line (None for pretraining)."""
        if self.supervision is None:
            return None
        s = self.supervision
        if self.pairs:
            return (
                f"{self.n_rows // 2:,} preference pairs ({self.n_train // 2:,} training, {self.n_val // 2:,} "
                f"validation), one example a row; {self.pairs_without_response()} pairs have a response wholly "
                f"beyond seq_len {self.seq_len} and are left out of the loss ({self._truncation_line()})"
            )
        return (
            f"{s['train_targets']:,} response tokens to learn in the training rows, "
            f"{s['validation_targets']:,} in the validation rows ({self._truncation_line()})"
        )

    def spans(self, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[start, end) of each row in the token stream; row -1 is empty (all padding)."""
        if self._doc_spans is None:
            start = row_ids.astype(np.int64) * self.seq_len
            end = start + self.seq_len + 1
        else:
            start, end = self._doc_spans[np.maximum(row_ids, 0)].T
        empty = row_ids < 0
        return np.where(empty, 0, start), np.where(empty, 0, end)

    def arrays(self, row_ids: np.ndarray) -> dict[str, np.ndarray]:
        """The model's inputs for rows of any shape (..., ): each field (..., seq_len)."""
        shape = row_ids.shape
        start, end = self.spans(row_ids.reshape(-1))
        width = self.seq_len + 1
        index = start[:, None] + np.arange(width)
        valid = index < end[:, None]
        raw = self.corpus.read_rows(start, end, width)
        tokens = np.where(valid, raw, self.pad_id).astype(np.int32)
        # Documents are numbered from 1 in each row: 1 + the documents that start after the row's first token.
        first = self.corpus.document_starts(index, raw)
        segments = np.where(valid, np.cumsum(first, axis=1) - first[:, :1] + 1, 0).astype(np.int32)
        target_weights = self.corpus.read_weights(start, end, width)
        weights = valid if target_weights is None else valid & (target_weights > 0)
        inputs_segments = segments[:, :-1]
        # Positions count from each document's first token in the row, as if the document were alone.
        steps = np.arange(self.seq_len)
        is_start = np.concatenate(
            [np.ones_like(inputs_segments[:, :1], bool), inputs_segments[:, 1:] != inputs_segments[:, :-1]], axis=1
        )
        positions = steps - np.maximum.accumulate(np.where(is_start, steps, 0), axis=1)
        loss_mask = (segments[:, 1:] == inputs_segments) & (inputs_segments > 0) & weights[:, 1:]
        fields = {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "positions": positions.astype(np.int32),
            "segments": inputs_segments,
            "loss_mask": loss_mask.astype(np.float32),
        }
        return {name: value.reshape(*shape, self.seq_len) for name, value in fields.items()}

    def train_rows(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        """Row ids of step `step`'s batch (batch_size,): a pure function of (seed, step). Pairs are drawn whole
        (batch_size / 2 of them), each as its chosen row then its rejected row."""
        if self.pairs:
            pair_rows = 2 * permuted_indices(step, batch_size // 2, self.n_train // 2, seed)
            return np.stack([pair_rows, pair_rows + 1], axis=1).reshape(-1)
        return permuted_indices(step, batch_size, self.n_train, seed)

    def val_rows(self, batch_size: int, n_batches: int) -> list[np.ndarray]:
        """The validation rows, in order, as at most n_batches batches; the last is padded with empty rows."""
        n_batches = min(n_batches, math.ceil(self.n_val / batch_size))
        ids = np.full(n_batches * batch_size, -1, np.int64)
        count = min(self.n_val, len(ids))
        ids[:count] = self.n_train + np.arange(count)
        return list(ids.reshape(n_batches, batch_size))


def permuted_indices(step: int, batch_size: int, n: int, seed: int) -> np.ndarray:
    """The indices into [0, n) of step `step`'s batch_size samples: sample j = step·batch_size + i is
    permutation_e(j mod n) of epoch e = j div n, so each epoch visits every index once."""
    sample = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epoch, index = np.divmod(sample, n)
    rows = np.empty_like(index)
    for e in np.unique(epoch):
        rows[epoch == e] = feistel_permutation(index[epoch == e], n, (seed << 32) + int(e))
    return rows


def _one_document_per_row(starts: np.ndarray, row_len: int) -> np.ndarray:
    """Each document alone in a row (cut at row_len tokens): (n_docs, 2) spans."""
    return np.stack([starts[:-1], np.minimum(starts[1:], starts[:-1] + row_len)], axis=1).astype(np.int64)


def _pack_documents(starts: np.ndarray, row_len: int) -> np.ndarray:
    """Greedy in-order packing of whole documents into rows of row_len tokens: (n_rows, 2) spans."""
    spans, row_start = [], None
    for doc_start, doc_end in zip(starts[:-1].tolist(), starts[1:].tolist()):
        if row_start is not None and doc_end - row_start > row_len:
            spans.append((row_start, min(doc_start, row_start + row_len)))
            row_start = None
        if row_start is None:
            row_start = doc_start
    if row_start is not None:
        spans.append((row_start, min(int(starts[-1]), row_start + row_len)))
    return np.asarray(spans, np.int64).reshape(-1, 2)


def feistel_permutation(index: np.ndarray, n: int, key: int) -> np.ndarray:
    """A keyed pseudo-random bijection of [0, n), applied elementwise: O(1) memory for any n, unlike
    materialising a permutation of hundreds of millions of rows. A 4-round Feistel network permutes
    [0, 4^k) ⊇ [0, n); values that land outside [0, n) are mapped again until they fall inside."""
    half_bits = max(1, math.ceil(math.log2(max(n, 2)) / 2))
    mask = np.uint64((1 << half_bits) - 1)
    keys = [_mix(np.uint64((key * 4 + r) & 0xFFFFFFFFFFFFFFFF)) for r in range(4)]
    out = np.asarray(index, np.uint64).copy()
    todo = np.ones(out.shape, bool)
    while todo.any():
        left, right = out[todo] >> np.uint64(half_bits), out[todo] & mask
        for round_key in keys:
            left, right = right, left ^ (_mix(right ^ round_key) & mask)
        out[todo] = (left << np.uint64(half_bits)) | right
        todo = out >= np.uint64(n)
    return out.astype(np.int64)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-mixed 64-bit hash."""
    with np.errstate(over="ignore"):
        x = np.asarray(x, np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def check_batch_fits_mesh(config: TrainConfig, mesh: Mesh) -> None:
    """ValueError unless every device of the batch axes gets the same number of rows, each data-parallel group
    whole DPO pairs (it sums its own rows' losses: `step._reduced_once_over_data`), and the sequences divide
    into context parallelism's chunks."""
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.micro_batch % batch_shards:
        raise ValueError(
            f"the micro-batch (batch_size / grad_accum = {config.micro_batch}) must be a multiple of "
            f"the data-parallel size (mesh data × fsdp = {batch_shards})"
        )
    if config.objective == "dpo" and (config.micro_batch // mesh.shape["data"]) % 2:
        raise ValueError(
            f"DPO rows come in pairs: the micro-batch's rows per data-parallel group (batch_size / grad_accum / "
            f"data = {config.micro_batch // mesh.shape['data']}) must be even"
        )
    context = mesh.shape["context"]
    if context > 1 and config.objective == "grpo":
        raise ValueError(
            f"mesh.context = {context}: GRPO's rollouts run the inference engine, which does not split "
            "sequences; context parallelism is for the lm and dpo objectives"
        )
    check_sequence_splits(config.seq_len, context)


def batch_sharding(mesh: Mesh, shape: tuple[int, int, int]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(BATCH_AXES, shape, mesh))


def global_batch(rows: PackedRows, row_ids: np.ndarray, mesh: Mesh) -> dict[str, jax.Array]:
    """The global batch for row_ids (grad_accum, micro_batch), sharded over the mesh's batch axes. This
    process builds only the rows its own devices hold."""
    shape = (*row_ids.shape, rows.seq_len)
    local_ids = np.concatenate([row_ids[:, start:stop] for start, stop in _local_rows(shape, mesh)], axis=1)
    return _sharded(rows.arrays(local_ids), shape, mesh)


def host_batch(fields: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """A batch every process holds whole, (grad_accum, micro_batch, seq_len) per field (GRPO's rollouts, which
    every process of a job generates alike), sharded over the mesh's batch axes like `global_batch`'s."""
    shape = next(iter(fields.values())).shape
    local = _local_rows(shape, mesh)
    mine = {name: np.concatenate([value[:, a:b] for a, b in local], axis=1) for name, value in fields.items()}
    return _sharded(mine, shape, mesh)


def _local_rows(shape: tuple[int, int, int], mesh: Mesh) -> list[tuple[int, int]]:
    """The [start, stop) ranges of the micro-batch rows this process's devices hold, in order."""
    indices = batch_sharding(mesh, shape).addressable_devices_indices_map(shape).values()
    return sorted({(index[1].start or 0, index[1].stop or shape[1]) for index in indices})


def _sharded(local: dict[str, np.ndarray], shape: tuple[int, int, int], mesh: Mesh) -> dict[str, jax.Array]:
    sharding = batch_sharding(mesh, shape)
    return {name: jax.make_array_from_process_local_data(sharding, value, shape) for name, value in local.items()}
