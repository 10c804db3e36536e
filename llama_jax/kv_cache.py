"""The KV cache: an explicit pytree passed into the model and returned from it.

Keys and values are stacked over layers, (layers, batch, kv_heads, max_len, head_dim), so the cache
is carried through the layer scan and updated in place. KV heads come before the slots so that each
(batch, kv_heads) block is contiguous: attention reads it as is, instead of transposing a copy of the
layer's cache at every decoding step. `lengths[b]` counts the slots of row b that hold real tokens:
the next tokens of row b are written at slots lengths[b], lengths[b] + 1, ... which is what lets a
batch of prompts of different lengths decode exactly as each prompt would alone.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llama_jax.config import ModelConfig

CACHE_AXES = ("layers", "batch", "kv_heads", "length", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array  # (layers, batch, kv_heads, max_len, head_dim)
    v: jax.Array
    lengths: jax.Array  # (batch,) int32

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache (inside a jit, constrain it with `shard(k, *CACHE_AXES)` to place it)."""
        shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
        dtype = dtype or config.dtype
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


def write_slots(cache: jax.Array, new: jax.Array, layer: jax.Array, starts: jax.Array) -> jax.Array:
    """Write new (batch, n, kv_heads, head_dim) into layer `layer` of the stacked cache (layers, batch,
    kv_heads, max_len, head_dim) at each row's own start slot.

    Only the new slots are written, so XLA updates the cache buffer in place; the batch axis is a
    scatter batching dimension, so a batch-sharded cache is written without any communication.
    """
    batch = new.shape[0]
    indices = jnp.stack([jnp.broadcast_to(layer, (batch,)).astype(jnp.int32), starts.astype(jnp.int32)], axis=1)
    numbers = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(1, 2, 3),
        inserted_window_dims=(0,),
        scatter_dims_to_operand_dims=(0, 3),
        operand_batching_dims=(1,),
        scatter_indices_batching_dims=(0,),
    )
    updates = new.transpose(0, 2, 1, 3).astype(cache.dtype)  # (batch, kv_heads, n, head_dim)
    return jax.lax.scatter(
        cache,
        indices,
        updates,
        numbers,
        indices_are_sorted=True,
        unique_indices=True,
        mode=jax.lax.GatherScatterMode.CLIP,
    )
