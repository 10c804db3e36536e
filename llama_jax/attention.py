"""Scaled dot-product attention: one entry point, several implementations.

* ``xla``   — grouped einsums with a float32 softmax; the reference, and the path on CPU and for decoding.
* ``cudnn`` — cuDNN flash attention through `jax.nn.dot_product_attention` (GPU, bf16/fp16). The
  same call with ``implementation='xla'`` is what the CPU tests run, so the argument plumbing (layout,
  grouped KV heads, mask) is tested everywhere; only the kernel itself needs a GPU.

``auto`` picks cudnn on GPU for half-precision prefill and training, xla otherwise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Large but finite: a fully masked row (a padding query) then gives a uniform softmax instead of NaN.
_MASKED = -1e30


def choose_implementation(requested: str, dtype, platform: str | None = None) -> str:
    if requested != "auto":
        return requested
    platform = platform or jax.default_backend()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if platform == "gpu" and half else "xla"


def causal_mask(q_index: jax.Array, kv_index: jax.Array, q_segments: jax.Array | None = None,
                kv_segments: jax.Array | None = None) -> jax.Array:
    """Boolean (batch, q_len, kv_len): key j is visible to query i when j <= i in the same segment.

    Indices are slots in the key sequence (the KV cache slot when decoding), not RoPE positions, so
    packed documents whose positions restart still mask correctly.
    """
    mask = kv_index[:, None, :] <= q_index[:, :, None]
    if q_segments is not None:
        mask &= q_segments[:, :, None] == kv_segments[:, None, :]
    return mask


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, implementation: str) -> jax.Array:
    """q (batch, q_len, heads, head_dim); k, v (batch, kv_len, kv_heads, head_dim); mask (batch, q_len,
    kv_len) or None for plain causal self-attention (q_len == kv_len). Returns q's shape."""
    if implementation == "xla":
        return _grouped_attention(q, k, v, mask)
    if implementation == "cudnn":
        return _library_attention(q, k, v, mask, "cudnn" if jax.default_backend() == "gpu" else "xla")
    raise ValueError(f"unknown attention implementation {implementation!r}")


def _grouped_attention(q, k, v, mask):
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    # Query heads that share a KV head are grouped instead of repeating K and V in memory.
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim ** -0.5)
    if mask is None:
        mask = jnp.tril(jnp.ones((q_len, k.shape[1]), bool))[None]
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)


def _library_attention(q, k, v, mask, implementation):
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=implementation)
