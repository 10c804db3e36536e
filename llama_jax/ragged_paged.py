"""Attention over the paged KV cache through JAX's ragged paged attention TPU kernel
(`jax.experimental.pallas.ops.tpu.ragged_paged_attention`), and the pool layout it reads: (layers, pages,
page_size, 2 × kv_heads, head_dim), keys and values interleaved (`kv_cache.interleave`).

JAX's own kernel rather than tpu-inference's v3 or tokamax's: it ships with the jax this project pins (no
second package to keep in step with libtpu), takes the ragged layout the engine already has (query counts
per row, page tables, lengths) for decode and for chunks of long prompts alike, and fuses nothing we need
fused (the KV write is a scatter XLA does in place). What it lacks: int8 pages with per-position scales, and
heads narrower than 128 lanes — those keep the XLA reader (`attention.attend_live_cache`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

from llama_jax.sharding import current_platform, logical_to_spec

MASKED = -1e30  # a score no query may see: finite, so a fully masked row gives zeros rather than NaN


def uses_kernel(requested: str, platform: str, kv_cache_dtype: str, head_dim: int) -> bool:
    """Whether the paged KV cache is read by the TPU's ragged paged attention kernel (and laid out for it): on
    TPU, or where the TPU kernels are asked for by name ("splash", as the CPU tests do: off TPU JAX's reference
    of the kernel runs). Not for an int8 cache, whose per-position scales the kernel does not take, nor for
    heads narrower than the TPU's 128 lanes on a TPU (Llama 3.2 1B's 64), which the kernel cannot tile (off TPU
    the reference, which takes any width, runs in its place)."""
    wanted = requested == "splash" or (requested == "auto" and platform == "tpu")
    return wanted and kv_cache_dtype != "int8" and (head_dim % 128 == 0 or platform != "tpu")


# The bytes of one block of keys and values the kernel brings into VMEM (it double-buffers them): a v5e's scoped
# VMEM is 16 MiB, which a block of 2,048 positions of Llama 3 8B's 8 KV heads (16 MiB) overflows.
KV_BLOCK_BYTES = 4 << 20


def kv_pages_per_block(flat: jax.Array, table_width: int) -> int:
    """Pages per KV block: at most 2,048 positions (the kernel's own default, given here because its tuning table
    looks up the devices of this host, which may be a CPU compiling for a TPU) and at most KV_BLOCK_BYTES of
    this device's pages (its share of the heads)."""
    _, page_size, combined, head_dim = flat.shape
    page_bytes = page_size * combined * head_dim * flat.dtype.itemsize
    return max(1, min(table_width, 2048 // page_size, KV_BLOCK_BYTES // page_bytes))


def attend(q: jax.Array, kv_all: jax.Array, layer: jax.Array, page_table: jax.Array, q_index: jax.Array) -> jax.Array:
    """`attention.attend_live_cache` through JAX's ragged paged attention kernel, per device under `shard_map`
    (heads over tensor, rows over the batch axes). The kernel reads pages of one layer; the stacked pool is
    handed to it whole, as (layers × pages) pages with each row's page numbers offset to this layer's, so that
    no layer is copied out of the scan's carry. Each row's queries are the last q_len of its first `q_index[:, -1] + 1`
    positions (the kernel's ragged layout); a row's pages it does not hold point at page 0, which it never
    reads (an idle row holds 0 positions)."""
    batch, q_len, heads, head_dim = q.shape
    layers, pages, page_size, combined, _ = kv_all.shape
    flat = kv_all.reshape(layers * pages, page_size, combined, head_dim)
    tables = jnp.clip(page_table[:batch], 0, pages - 1) + layer * pages
    kv_lens = jnp.maximum(q_index[:, -1] + 1, 0).astype(jnp.int32)
    on_tpu = current_platform() == "tpu"

    def per_device(q, flat, tables, kv_lens):
        kernel = _reference
        if on_tpu:
            kernel = functools.partial(
                ragged_paged_attention,
                num_kv_pages_per_block=kv_pages_per_block(flat, tables.shape[1]),
                num_queries_per_block=min(q.shape[0] * q_len, 32),
            )
        rows = q.shape[0]
        cu_q_lens = jnp.arange(rows + 1, dtype=jnp.int32) * q_len
        packed = q.reshape(rows * q_len, *q.shape[2:])
        out = kernel(packed, flat, kv_lens, tables, cu_q_lens, jnp.asarray([rows], jnp.int32), sm_scale=head_dim**-0.5)
        return out.reshape(q.shape)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return per_device(q, flat, tables, kv_lens)
    q_spec = logical_to_spec(("batch", None, "q_heads", None), q.shape, mesh)
    kv_spec = logical_to_spec((None, None, "kv_heads", None), flat.shape, mesh)
    if q_spec[2] != kv_spec[2]:  # the KV heads cannot split as the queries do: every device keeps all heads
        q_spec, kv_spec = jax.P(q_spec[0], None, None, None), jax.P(None, None, None, None)
    rows_spec = jax.P(q_spec[0])
    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, jax.P(q_spec[0], None), rows_spec),
        out_specs=q_spec,
        check_vma=False,
    )(q, flat, tables, kv_lens)


def _reference(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale):
    """What the kernel computes, in jittable XLA, for rows of equal query counts (the engine's calls): each row's
    queries attend causally to its first kv_lens positions, its last queries being its last positions. Where
    the kernel cannot run (off TPU: JAX 0.10.2's TPU interpret mode stops at the kernel's reshaped refs,
    "'ReshapeTransform' object has no attribute 'indices'"), so the layout, the page numbers and the sharding
    around it are tested on any host."""
    rows = page_indices.shape[0]
    q_len = q.shape[0] // rows
    _, page_size, combined, head_dim = kv_pages.shape
    heads, kv_heads = q.shape[1], combined // 2
    held = kv_pages[page_indices].reshape(rows, -1, kv_heads, 2, head_dim)  # (rows, positions, kv_heads, 2, hd)
    k, v = held[..., 0, :], held[..., 1, :]
    queries = q.reshape(rows, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", queries, k, preferred_element_type=jnp.float32) * sm_scale
    position = kv_lens[:, None] - q_len + jnp.arange(q_len)  # (rows, q_len)
    visible = jnp.arange(k.shape[1])[None, None, :] <= position[:, :, None]
    scores = jnp.where(visible[:, None, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(rows * q_len, heads, head_dim).astype(q.dtype)
