"""Context parallelism: the tokens of each training sequence split over the mesh's `context` axis, for sequences
whose activations do not fit one chip (Llama 3.1's 128K context).

Every layer but attention works on each token alone, so a chip holding L/C of a sequence's tokens computes their
activations alone; the weights are sharded over the context axis like FSDP's (`sharding.LOGICAL_AXIS_RULES`).
Attention needs every earlier token. The strategy is **all-gather of K/V**: before attention each chip gathers the
keys and values of the whole sequence over the context axis and attends its own queries to them with the
platform's kernel (splash per shard on TPU, `attention.py`); the backward pass reduce-scatters their gradients.
A ring (passing K/V blocks from chip to chip while attending) would overlap the transfer with the compute, at the
price of a kernel call per block and an online-softmax merge of their outputs; with grouped-query attention the
gathered K/V are n_kv_heads / n_heads of the queries' size (a quarter for Llama 3 8B): at 128K tokens over 4 chips
a chip receives ~0.4 GB of one layer's K/V (bf16), a few milliseconds of ICI, against ~75 ms of that layer's
attention FLOPs on a v5p (an estimate from the data sheets, not a measurement), so the simpler gather wins on
clarity (MaxText's default on TPU is the same all-gather).

**Load balance.** Under a causal mask the last tokens of a sequence attend to the most keys: split into C
contiguous pieces, the last chip does 2C - 1 times the first one's attention work, and every chip waits for it.
So a sequence is laid out in `2 × C` chunks and chip c holds chunks c and 2C - 1 - c (`balanced_order`): each
chip attends the same number of (query, key) pairs. The train step puts every micro-batch into this order before
the model and its per-token losses back after (`train/step.py`); attention masks by each slot's place in the
original sequence (`balanced_order` itself). Nothing else depends on the order: RoPE reads each token's position,
packing its segment id.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

AXIS = "context"


def context_shards() -> int:
    """How many chips the set mesh (`jax.set_mesh`) splits a training sequence over: 1 without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AXIS not in mesh.axis_names:
        return 1
    return mesh.shape[AXIS]


def check_sequence_splits(seq_len: int, shards: int) -> None:
    """ValueError unless `seq_len` divides into 2 × `shards` equal chunks."""
    if shards > 1 and seq_len % (2 * shards):
        raise ValueError(
            f"seq_len {seq_len} must be a multiple of 2 × mesh.context = {2 * shards}: "
            f"context parallelism splits each sequence into 2 × {shards} equal chunks"
        )


@functools.cache
def balanced_order(length: int, shards: int) -> np.ndarray:
    """Slot i of the balanced layout holds token `balanced_order(...)[i]` of the sequence (its index there, what a
    causal mask compares): chunks 0 and 2C-1, then 1 and 2C-2, ... (C = shards), so contiguous slices of L/C
    slots are the chips' shares. The identity for one shard."""
    if shards == 1:
        return np.arange(length, dtype=np.int32)
    chunks = np.arange(length, dtype=np.int32).reshape(2 * shards, length // (2 * shards))
    pairs = [chunks[c] for shard in range(shards) for c in (shard, 2 * shards - 1 - shard)]
    return np.concatenate(pairs)


def to_balanced(fields: dict[str, jax.Array], shards: int) -> dict[str, jax.Array]:
    """Every (rows, seq_len) field in the balanced order (unchanged when `shards` is 1)."""
    if shards == 1:
        return fields
    return {name: _interleave(value, shards) for name, value in fields.items()}


def from_balanced(values: jax.Array, shards: int) -> jax.Array:
    """(rows, seq_len) values of the balanced order back in the sequence's own order."""
    if shards == 1:
        return values
    return _deinterleave(values, shards)


# Both orders are written with reshapes, a reversal and a concatenation rather than a gather of `balanced_order`:
# inside the train step's shard_map over data groups the TPU compiler of jax 0.10 aborts on a gather of an array
# split over two mesh axes (rows over fsdp, tokens over context).


def _interleave(x: jax.Array, shards: int) -> jax.Array:
    """(..., L) -> chunks 0, 2C-1, 1, 2C-2, ...: the first half's chunks beside the second half's, reversed."""
    *rows, length = x.shape
    halves = x.reshape(*rows, 2, shards, length // (2 * shards))
    first, second = halves[..., 0, :, :], jnp.flip(halves[..., 1, :, :], axis=-2)
    return jnp.stack([first, second], axis=-2).reshape(*rows, length)


def _deinterleave(x: jax.Array, shards: int) -> jax.Array:
    """The inverse of `_interleave`."""
    *rows, length = x.shape
    pairs = x.reshape(*rows, shards, 2, length // (2 * shards))
    first, second = pairs[..., 0, :], jnp.flip(pairs[..., 1, :], axis=-2)
    return jnp.concatenate([first, second], axis=-2).reshape(*rows, length)
