"""Model FLOPs per trained token, and the peak they are measured against, for model FLOPs utilisation.

    training FLOPs per token = 6·N + 12·n_layers·seq_len·n_heads·head_dim

N counts every parameter that takes part in a matmul: all but the input embedding table, which is a
lookup (with tied embeddings the shared matrix counts once, as the output projection). 6N is the forward
(2N) plus backward (4N) matmul work; the second term is attention's QKᵀ and AV products, forward and
backward, counted over the full seq_len×seq_len score matrix as PaLM (Chowdhery et al. 2022, appendix B)
counts them, causal masking notwithstanding. Recomputation under remat is not model FLOPs and is not
counted: MFU measures useful work.
"""

from __future__ import annotations

from llama_jax.config import ModelConfig
from llama_jax.hardware import chip_spec


def matmul_params(config: ModelConfig) -> int:
    return config.param_count() - (0 if config.tie_embeddings else config.vocab_size * config.dim)


def attention_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward QKᵀ and AV over the full score matrix: 2 matmuls × 2 FLOPs × seq_len × heads × head_dim."""
    return 4 * config.n_layers * seq_len * config.n_heads * config.head_dim


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    return 2 * matmul_params(config) + attention_flops_per_token(config, seq_len)


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward and backward (twice the forward): 6·N + 12·n_layers·seq_len·n_heads·head_dim."""
    return 3 * forward_flops_per_token(config, seq_len)


def remat_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """What the backward pass recomputes under the remat policy: the whole layer forward ("full"), or
    attention's score matmuls, whose outputs `save_dots` does not keep (they have batch dimensions)."""
    if config.remat == "full":
        return forward_flops_per_token(config, seq_len) - 2 * config.vocab_size * config.dim
    if config.remat == "save_dots":
        return attention_flops_per_token(config, seq_len)
    return 0.0


def peak_flops(device_kind: str, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the override when given, else the data sheet's dense bf16 peak for the
    device kind (`hardware.CHIPS`), else None (unknown: CPUs)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    spec = chip_spec(device_kind)
    return spec.peak_bf16_flops if spec else None
