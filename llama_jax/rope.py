"""Rotary position embedding in the half-split layout (Hugging Face's), with Llama 3.1 frequency scaling.

Dimension i of a head is rotated together with dimension i + head_dim/2. Meta's and llama2.c's
checkpoints rotate interleaved pairs (2i, 2i+1) instead; their importers permute the rows of wq and wk
so that both layouts compute the same attention scores.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """theta^(-2i/head_dim) for i < head_dim/2, as float64 numpy (computed once, at trace time)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv_freq
    # Llama 3.1: wavelengths longer than original_max/low_freq_factor are divided by `factor`, those
    # shorter than original_max/high_freq_factor are kept, and the band between is interpolated.
    low_freq_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    return np.where(
        wavelen > low_freq_wavelen,
        inv_freq / scaling.factor,
        np.where(wavelen < high_freq_wavelen, inv_freq, interpolated),
    )


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate x (batch, length, heads, head_dim) by angles positions (batch, length) · inv_freq.

    Angles, sines and cosines are float32 whatever the compute dtype: at position 100k a bf16 angle
    would be off by hundreds of radians.
    """
    angles = positions.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq, jnp.float32)
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
