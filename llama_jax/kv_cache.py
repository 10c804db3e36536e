"""The KV cache: an explicit pytree passed into the model and returned from it.

Keys and values are stacked over layers, (layers, batch, max_len, kv_heads, head_dim), so the cache
is carried through the layer scan and updated in place. `lengths[b]` counts the slots of row b that
hold real tokens: the next tokens of row b are written at slots lengths[b], lengths[b] + 1, ... which
is what lets a batch of prompts of different lengths decode exactly as each prompt would alone.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llama_jax.config import ModelConfig
from llama_jax.sharding import named_sharding

CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array  # (layers, batch, max_len, kv_heads, head_dim)
    v: jax.Array
    lengths: jax.Array  # (batch,) int32

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, max_len: int, dtype=None, mesh=None) -> KVCache:
        """An empty cache; with a mesh, placed with batch over data and KV heads over tensor."""
        shape = (config.n_layers, batch, max_len, config.n_kv_heads, config.head_dim)
        dtype = dtype or config.dtype
        if mesh is None:
            return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))
        kv_sharding = named_sharding(mesh, CACHE_AXES, shape)
        length_sharding = named_sharding(mesh, ("batch",), (batch,))
        make = jax.jit(lambda: cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32)),
                       out_shardings=cls(kv_sharding, kv_sharding, length_sharding))
        return make()

    def shardings(self, mesh) -> KVCache:
        kv = named_sharding(mesh, CACHE_AXES, self.k.shape)
        return KVCache(kv, kv, named_sharding(mesh, ("batch",), self.lengths.shape))


def write_layer(cache_layer: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Write new (batch, n, kv_heads, head_dim) into one layer's cache (batch, max_len, ...) at each
    row's own start slot."""
    def write_row(row, new_row, start):
        return jax.lax.dynamic_update_slice(row, new_row.astype(row.dtype), (start, 0, 0))

    return jax.vmap(write_row)(cache_layer, new, starts)
