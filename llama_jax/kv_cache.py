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
    """Write new (batch, n, kv_heads, head_dim) into layer `layer` of the stacked cache (layers, rows,
    kv_heads, max_len, head_dim) at each row's own start slot: token j of row b goes to slot starts[b] + j of
    cache row b. The batch may be the cache's first rows only (a decode step of the first few slots).

    Only the new slots are written, so XLA updates the cache buffer in place; when the batch is all the rows,
    the batch axis is a scatter batching dimension, so a batch-sharded cache is written without any
    communication. A token whose slot is outside the cache is dropped, token by token: one decoded at slot -1
    writes nothing (the engine's idle and half-prefilled slots during a decode step), and a padded chunk's tail
    past the end is dropped while its real tokens land.
    """
    batch, n = new.shape[:2]
    slots = starts.astype(jnp.int32)[:, None] + jnp.arange(n, dtype=jnp.int32)
    layers = jnp.broadcast_to(layer, (batch, n)).astype(jnp.int32)
    if batch == cache.shape[1]:
        indices = jnp.stack([layers, slots], axis=-1)
        numbers = jax.lax.ScatterDimensionNumbers(
            update_window_dims=(2, 3),
            inserted_window_dims=(0, 3),
            scatter_dims_to_operand_dims=(0, 3),
            operand_batching_dims=(1,),
            scatter_indices_batching_dims=(0,),
        )
    else:
        rows = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.int32)[:, None], (batch, n))
        indices = jnp.stack([layers, rows, slots], axis=-1)
        numbers = jax.lax.ScatterDimensionNumbers(
            update_window_dims=(2, 3), inserted_window_dims=(0, 1, 3), scatter_dims_to_operand_dims=(0, 1, 3)
        )
    return jax.lax.scatter(
        cache,
        indices,
        new.astype(cache.dtype),
        numbers,
        indices_are_sorted=True,
        unique_indices=True,
        mode=jax.lax.GatherScatterMode.FILL_OR_DROP,
    )
