"""Perplexity of a model on a text file (`python -m llama_jax.evaluate --checkpoint DIR --data FILE`).

The whole file is one document: BOS is prepended to its ids, which are cut into consecutive,
non-overlapping windows of seq-len (default: the model's max_seq_len); each window predicts its own
tokens after the first, seeing only that window. Windows are scored `batch_size` at a time, through the
platform's flash attention (no gradients), the logits a chunk of positions at a time; the last batch is
padded to the same shape and masked, so one function compiles. The last stdout line is JSON with
`perplexity`, `nll_per_token`, `tokens` (the number of predicted tokens) and `tokens_per_second` (scoring
only: loading the model is not counted, its one compile is).
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from llama_jax.loss import token_nll
from llama_jax.sharding import global_array, named_sharding, replicated

_PROGRESS_MIN_BATCHES = 8


def windows(ids: Sequence[int], seq_len: int) -> list[np.ndarray]:
    """Consecutive windows of at most seq_len ids; a last window of one id predicts nothing and is dropped."""
    ids = np.asarray(ids, np.int32)
    return [ids[i : i + seq_len] for i in range(0, len(ids), seq_len) if len(ids[i : i + seq_len]) > 1]


def batches(
    chunks: list[np.ndarray], seq_len: int, batch_size: int, pad_id: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(inputs, targets, mask), each (batch_size, seq_len): targets[t] = inputs[t + 1] where mask is 1.
    Short windows and the missing rows of the last batch are padding with mask 0."""
    for start in range(0, len(chunks), batch_size):
        inputs = np.full((batch_size, seq_len), pad_id, np.int32)
        targets = np.full((batch_size, seq_len), pad_id, np.int32)
        mask = np.zeros((batch_size, seq_len), np.float32)
        for row, chunk in enumerate(chunks[start : start + batch_size]):
            inputs[row, : len(chunk)] = chunk
            targets[row, : len(chunk) - 1] = chunk[1:]
            mask[row, : len(chunk) - 1] = 1.0
        yield inputs, targets, mask


def perplexity(loaded, ids: Sequence[int], seq_len: int, batch_size: int, progress: bool = False) -> dict:
    """Score `ids` (BOS already first) with a loaded model (`llama_jax.load`) on its mesh."""
    graphdef, state = nnx.split(loaded.model)

    # Each window's sum, replicated: every process of a multi-host job reads all of them.
    @functools.partial(jax.jit, out_shardings=replicated(loaded.mesh))
    def window_nll(state, inputs, targets, mask):
        nll, _ = token_nll(nnx.merge(graphdef, state), inputs, targets, differentiable=False)
        return jnp.sum(nll * mask, axis=-1)

    chunks = windows(ids, seq_len)
    n_batches = math.ceil(len(chunks) / batch_size)
    sharding = named_sharding(loaded.mesh, ("batch", "length"), (batch_size, seq_len))
    total_nll, total_tokens = 0.0, 0
    bar = tqdm(
        total=n_batches, unit="batch", file=sys.stderr, disable=not progress or n_batches < _PROGRESS_MIN_BATCHES
    )
    started = time.perf_counter()
    with jax.set_mesh(loaded.mesh), bar:
        for inputs, targets, mask in batches(chunks, seq_len, batch_size, loaded.tokenizer.pad_id):
            placed = [global_array(a, sharding) for a in (inputs, targets, mask)]
            total_nll += float(np.sum(np.asarray(window_nll(state, *placed), np.float64)))
            total_tokens += int(mask.sum())
            bar.update()
    seconds = time.perf_counter() - started
    nll_per_token = total_nll / total_tokens
    return {
        "perplexity": math.exp(nll_per_token),
        "nll_per_token": nll_per_token,
        "tokens": total_tokens,
        "tokens_per_second": round(total_tokens / seconds, 1),
        "windows": len(chunks),
        "seq_len": seq_len,
    }
