"""Model FLOPs per trained token, and the bf16 peak of the chips we know, for model FLOPs utilisation.

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

# Dense bf16 peak FLOP/s per JAX device, from the vendors' data sheets (no sparsity).
PEAK_BF16_FLOPS = {
    "H100": 989e12,  # SXM; the PCIe card is listed separately below
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v6 lite": 918e12,  # v6e (Trillium)
}


def matmul_params(config: ModelConfig) -> int:
    return config.param_count() - (0 if config.tie_embeddings else config.vocab_size * config.dim)


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    attention = 12 * config.n_layers * seq_len * config.n_heads * config.head_dim
    return 6 * matmul_params(config) + attention


def peak_flops(device_kind: str, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the override when given, else the table's entry for the device kind
    (the longest matching name, so "H100 PCIe" is not read as "H100"), else None (unknown: CPUs)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    matches = [name for name in PEAK_BF16_FLOPS if name.lower() in device_kind.lower()]
    return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None
