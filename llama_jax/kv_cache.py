"""The KV cache: pages of keys and values, an explicit pytree passed into the model and returned from it.

    kv           (layers, pages, 2, kv_heads, page_size, head_dim): each page holds `page_size` positions of one
                 sequence, every layer's keys (half 0) and values (half 1), heads before positions so that a
                 page of one head is contiguous: attention reads a page as it is (a block of 128 positions from
                 one page of 128 is the very slice a contiguous cache gave; pages of 16 cost a decode step
                 twice that at batch 1 on a CPU, for the copy that joins eight of them)
    scales       int8 caches: (layers, pages, 2, kv_heads, page_size) float32, one per position and head
    page_table   (batch, pages_per_seq) int32: row b's position p is in page page_table[b, p // page_size]
    lengths      (batch,) int32: the positions of row b that hold tokens; its next tokens go at lengths[b], ...

The pool is stacked over layers, so it is carried through the layer scan and written in place. A sequence
takes pages as it grows and gives them back when it ends (the engine's `inference/pages.py`); rows sharing a
prompt prefix point at the same pages. `KVCache.zeros` gives each row pages of its own, in order: a cache for
a plain batch (tests, notebooks). A position whose page is out of the pool (the engine's idle rows decode at
position -1; a padded prompt's tail) is dropped when written.

On TPU the pool is laid out for the ragged paged attention kernel instead (`KERNEL_CACHE_AXES`): (layers,
pages, page_size, 2 × kv_heads, head_dim), keys at the even heads and values at the odd ones, which the kernel
reads as it is. Writing handles both layouts; the kernel reads the second, `read` the first.

With `kv_dtype` int8 each position's key and value vectors are stored as int8 with a float32 scale per head
(their absolute maximum / 127): half of bf16's bytes for head_dim 128, and a position's quantization never
changes once written.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llama_jax.config import ModelConfig

# The pool's axes: the page axis is not split (a page may hold any sequence's positions); heads follow the
# model's tensor-parallel split.
CACHE_AXES = ("layers", None, None, "kv_heads", None, "head_dim")
SCALE_AXES = ("layers", None, None, "kv_heads", None)
KERNEL_CACHE_AXES = ("layers", None, None, "kv_heads", "head_dim")  # the TPU kernel's layout
CONTIGUOUS_PAGE = 128  # `KVCache.zeros`' page size: its rows' positions in pages of 128 (or fewer)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    kv: jax.Array  # (layers, pages, 2, kv_heads, page_size, head_dim)
    page_table: jax.Array  # (batch, pages_per_seq) int32
    lengths: jax.Array  # (batch,) int32
    scales: jax.Array | None = None  # int8 pools: (layers, pages, 2, kv_heads, page_size) float32

    @property
    def page_size(self) -> int:
        return page_size(self.kv)

    @property
    def max_len(self) -> int:
        """Positions one row can hold."""
        return self.page_table.shape[1] * self.page_size

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache of `batch` rows of `max_len` positions, each row in pages of its own, in order; int8
        (`dtype` "int8") with its scales."""
        page_size = next(p for p in (CONTIGUOUS_PAGE, 64, 32, 16, 8, 4, 2, 1) if max_len % p == 0)
        pages_per_seq = max_len // page_size
        shape = (config.n_layers, batch * pages_per_seq, 2, config.n_kv_heads, page_size, config.head_dim)
        table = jnp.arange(batch * pages_per_seq, dtype=jnp.int32).reshape(batch, pages_per_seq)
        dtype = jnp.dtype(dtype or config.dtype)
        scales = jnp.zeros(shape[:-1], jnp.float32) if dtype == jnp.int8 else None
        return cls(jnp.zeros(shape, dtype), table, jnp.zeros((batch,), jnp.int32), scales)


def page_size(kv_all: jax.Array) -> int:
    """Positions per page of a pool in either layout."""
    return kv_all.shape[2] if kv_all.ndim == 5 else kv_all.shape[4]


def interleave(k: jax.Array, v: jax.Array) -> jax.Array:
    """(..., kv_heads, head_dim) keys and values as the kernel's (..., 2 × kv_heads, head_dim): K at even heads."""
    return jnp.stack([k, v], axis=-2).reshape(*k.shape[:-2], 2 * k.shape[-2], k.shape[-1])


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int8 values and a float32 scale per vector of x (..., head_dim): x ≈ values · scale."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / 127.0
    values = jnp.round(x32 / jnp.where(scale == 0, 1.0, scale)[..., None])
    return jnp.clip(values, -127, 127).astype(jnp.int8), scale


def write(
    kv_all: jax.Array,
    scales: jax.Array | None,
    k: jax.Array,
    v: jax.Array,
    layer: jax.Array,
    page_table: jax.Array,
    starts: jax.Array,
) -> tuple[jax.Array, jax.Array | None]:
    """Write k, v (batch, n, kv_heads, head_dim) into layer `layer` of the pool at each row's positions
    starts[b], starts[b] + 1, ...: token j of row b lands in page page_table[b, (starts[b] + j) // page_size].
    Only those positions are written (in place); a position before 0 or past the row's pages is dropped."""
    batch, n = k.shape[:2]
    positions = starts.astype(jnp.int32)[:, None] + jnp.arange(n, dtype=jnp.int32)
    pages, offsets = _pages_of(page_table, positions, page_size(kv_all), kv_all.shape[1])
    layers = jnp.broadcast_to(layer, (batch, n)).astype(jnp.int32)
    return _put(kv_all, scales, (layers, pages), offsets, k, v)


def write_layers(
    kv_all: jax.Array, scales: jax.Array | None, k: jax.Array, v: jax.Array, tables: jax.Array, lengths: jax.Array
) -> tuple[jax.Array, jax.Array | None]:
    """Write every layer's keys and values of prompts at positions 0.. of their rows — k, v (layers, rows,
    length, kv_heads, head_dim), row r through page table tables[r] — keeping each row's first lengths[r]
    positions (a padded prompt's tail, and a padding row of length 0, are dropped)."""
    layers, rows, length = k.shape[:3]
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length))
    positions = jnp.where(positions < lengths[:, None], positions, -1)
    pages, offsets = _pages_of(tables, positions, page_size(kv_all), kv_all.shape[1])
    shape = (layers, rows, length)
    layer_index = jnp.broadcast_to(jnp.arange(layers, dtype=jnp.int32)[:, None, None], shape)
    return _put(kv_all, scales, (layer_index, jnp.broadcast_to(pages, shape)), jnp.broadcast_to(offsets, shape), k, v)


def _put(kv_all, scales, at: tuple, offsets, k, v):
    """k, v (..., kv_heads, head_dim) into the pool at (layer, page) `at` and position `offsets` in the page,
    each index of shape (...); a page out of the pool is dropped."""
    if kv_all.ndim == 5:  # the kernel's layout (never int8: the kernel takes one scale for the whole pool)
        return kv_all.at[(*at, offsets)].set(interleave(k, v).astype(kv_all.dtype), mode="drop"), None
    for half, new in enumerate((k, v)):
        index = (*at, half, slice(None), offsets)  # the new values' (..., kv_heads, head_dim) land in place
        if scales is None:
            kv_all = kv_all.at[index].set(new.astype(kv_all.dtype), mode="drop")
        else:
            values, scale = quantize(new)
            kv_all = kv_all.at[index].set(values, mode="drop")
            scales = scales.at[index].set(scale, mode="drop")
    return kv_all, scales


def _pages_of(page_table: jax.Array, positions: jax.Array, page_size: int, num_pages: int):
    """The page and the row within it of each of `positions` (batch, n); positions outside the row's pages get
    page `num_pages`, out of the pool (a write there is dropped)."""
    max_len = page_table.shape[1] * page_size
    inside = (positions >= 0) & (positions < max_len)
    clipped = jnp.clip(positions, 0, max_len - 1)
    pages = jnp.take_along_axis(page_table, clipped // page_size, axis=1)
    return jnp.where(inside, pages, num_pages), clipped % page_size


def read(
    kv_all: jax.Array, scales: jax.Array | None, layer: jax.Array, rows_table: jax.Array, start, length: int
) -> tuple[jax.Array, jax.Array]:
    """Keys and values (rows, kv_heads, length, head_dim) at positions start .. start + length of the rows whose
    page tables are `rows_table` (rows, pages_per_seq); int8 pools dequantized to float32. `length` and the page
    size divide one another; only those positions are read."""
    _, _, _, kv_heads, page_size, head_dim = kv_all.shape
    pages_read, piece = max(1, length // page_size), min(page_size, length)

    def one_row(table, half):
        pages = jax.lax.dynamic_slice_in_dim(table, start // page_size, pages_read)
        offset = start % page_size if page_size > length else 0

        def one_page(page):
            at = (layer, page, half, 0, offset)
            block = jax.lax.dynamic_slice(kv_all, (*at, 0), (1, 1, 1, kv_heads, piece, head_dim))[0, 0, 0]
            if scales is None:
                return block
            scale = jax.lax.dynamic_slice(scales, at, (1, 1, 1, kv_heads, piece))[0, 0, 0]
            return block.astype(jnp.float32) * scale[..., None]

        blocks = jax.vmap(one_page)(pages)  # (pages, kv_heads, piece, head_dim)
        if pages_read == 1:
            return blocks[0]
        return blocks.transpose(1, 0, 2, 3).reshape(kv_heads, length, head_dim)

    # Keys and values read apart: slicing them out of one read of both would copy them again.
    return tuple(jax.vmap(one_row, in_axes=(0, None))(rows_table, half) for half in (0, 1))
