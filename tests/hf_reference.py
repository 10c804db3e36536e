"""Reference models for the converter and evaluate tests: tiny random-weight `transformers.LlamaForCausalLM`s
in float32, one per LLaMA generation, and our logits for a converted model directory.

Models are cached per process so several test files share them, and our forward is one jitted function
with the graphdef static, so models with equal configs share one compilation.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 515  # odd, and above the 512 ids of tok512.bin, the tokenizer these models are paired with
SEQ_LEN = 32
_LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0)
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=120,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    initializer_range=0.2,
)
VARIANTS = {
    "llama1": dict(num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=10000.0),
    "llama2": dict(num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0),
    # original_max_position_embeddings=16 makes the scaling change every position of a 32-token test.
    "llama3.1": dict(
        num_key_value_heads=1,
        head_dim=24,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=dict(_LLAMA3_ROPE, factor=8.0, original_max_position_embeddings=16),
    ),
    # As Llama 3.2 1B/3B ship: tied embeddings, factor 32 over Meta's 8192 positions.
    "llama3.2": dict(
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rope_scaling=dict(_LLAMA3_ROPE, factor=32.0, original_max_position_embeddings=8192),
    ),
}


def hf_config(variant: str, **changes):
    return transformers.LlamaConfig(**{**COMMON, **VARIANTS[variant], **changes})


@functools.cache
def hf_model(variant: str):
    """Random weights large enough to matter (std 0.2) and random RMSNorm scales, so that swapped or
    transposed tensors cannot go unnoticed."""
    torch.manual_seed(list(VARIANTS).index(variant))
    model = transformers.LlamaForCausalLM(hf_config(variant)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
    return model


def sample_ids(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (2, SEQ_LEN), dtype=np.int64)


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)[0]


def our_logits(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    from llama_jax.loading import load

    loaded = load(model_dir)
    graphdef, state = nnx.split(loaded.model)
    with jax.set_mesh(loaded.mesh):
        return np.asarray(_logits(graphdef, state, jnp.asarray(ids, jnp.int32)))


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))
