"""Next-token negative log-likelihood without ever holding the full logits.

The float32 logits of a whole batch are (tokens × vocab): 4 GiB for one 8192-token sequence of Llama 3's
128256-token vocabulary, and as much again for their gradient. Here the hidden states are projected to
logits `chunk` positions at a time, in a scan whose body is rematerialised: the forward keeps only each
chunk's per-token NLL and log Z, and the backward recomputes one chunk's logits at a time. Sequences of at
most `chunk` positions take the plain path (one projection), which computes the same values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.config import LOSS_CHUNK
from llama_jax.context_parallel import context_shards
from llama_jax.sharding import in_manual_region, shard


def token_nll(
    model,
    ids: jax.Array,
    targets: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk: int = LOSS_CHUNK,
    dropout_key: jax.Array | None = None,
    differentiable: bool = True,
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood of `targets` and the log-partition log Z, float32, (batch, length).
    `chunk`: positions per logits chunk; 0 projects the whole sequence at once. `dropout_key`: training's
    (LoRA dropout). `differentiable=False` (evaluation): the platform's flash attention. `temperature`: the
    logits are divided by it first — the distribution GRPO's completions were sampled from."""
    hidden, _ = model.hidden_states(
        ids, positions, segment_ids=segment_ids, dropout_key=dropout_key, differentiable=differentiable
    )
    return _by_chunks(lambda h, t: _chunk_nll(model, h, t, temperature), hidden, targets, chunk)


def token_logprobs(model, ids: jax.Array, targets: jax.Array, chunk: int = LOSS_CHUNK) -> tuple[jax.Array, jax.Array]:
    """Per-token log-probability of `targets` (float32) and whether each is the argmax token, (batch, length):
    what a continuation's score and an evaluation harness's `is_greedy` are made of."""
    hidden, _ = model.hidden_states(ids, None, differentiable=False)
    return _by_chunks(lambda h, t: _chunk_logprobs(model, h, t), hidden, targets, chunk)


def _by_chunks(score, hidden: jax.Array, targets: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """`score(hidden, targets)` -> two (batch, positions) arrays, applied `chunk` positions at a time.

    Under context parallelism each of the C chips holds a contiguous 1/C of the positions: a step of the scan
    takes `chunk` positions from each chip's share, so every chip scores its own tokens and none moves."""
    batch, length = hidden.shape[:2]
    if chunk == 0 or length <= chunk:
        return score(hidden, targets)
    groups = context_shards()
    steps = -(-length // (chunk * groups))
    pad = steps * chunk * groups - length
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    # (steps, batch, groups · chunk, ...): the scan runs over the leading axis
    hidden = (
        hidden.reshape(batch, groups, steps, chunk, -1)
        .transpose(2, 0, 1, 3, 4)
        .reshape(steps, batch, -1, hidden.shape[-1])
    )
    targets = targets.reshape(batch, groups, steps, chunk).transpose(2, 0, 1, 3).reshape(steps, batch, -1)

    @jax.checkpoint
    def one_chunk(pair):
        hidden_chunk, target_chunk = pair
        return score(shard(hidden_chunk, "batch", "length", None), target_chunk)

    first, second = jax.lax.map(one_chunk, (hidden, targets))

    def unchunk(a):  # (steps, batch, groups · chunk) -> (batch, length)
        a = a.reshape(steps, batch, groups, chunk).transpose(1, 2, 0, 3)
        return a.reshape(batch, -1)[:, :length]

    return unchunk(first), unchunk(second)


def _chunk_nll(model, hidden: jax.Array, targets: jax.Array, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    logits = model.logits(hidden).astype(jnp.float32)
    if temperature != 1.0:
        logits = logits / temperature
    log_z = jax.nn.logsumexp(logits, axis=-1)
    return log_z - _target_logits(logits, targets), log_z


def _target_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """`logits[..., targets]`. Inside the train step's `shard_map` over data groups, with the vocabulary split over
    tensor, the gather XLA makes of `take_along_axis` aborts the TPU compiler of jax 0.10: there it is a masked sum
    over the vocabulary (exact: one term is not zero), each chip summing its own share."""
    if not in_manual_region():
        return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)


def _chunk_logprobs(model, hidden: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = model.logits(hidden).astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logits - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == targets


def continuation_logprobs(
    model, inputs: jax.Array, rows: jax.Array, positions: jax.Array, targets: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Log-probabilities of continuations, and whether each token is the argmax, (requests, n) float32 / bool:
    request r reads row `rows[r]` of `inputs` (rows, length) and scores `targets[r, j]` from the hidden state
    at `positions[r, j]`. The model runs once per distinct input row (requests that share a context share its
    row) and the output projection only at the scored positions: a loglikelihood request needs its
    continuation's few positions, not the whole vocabulary at every position."""
    hidden, _ = model.hidden_states(inputs, differentiable=False)
    picked = hidden[rows[:, None], positions]  # (requests, n, dim)
    logits = model.logits(picked).astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logits - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == targets
