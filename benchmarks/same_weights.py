"""transformers models with llama_jax's weights, so that both sides of a benchmark compute the same function:
the model is written as a llama_jax model directory and exported with `to-hf` (the exporter users run)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx


def transformers_model(loaded, dtype: str, directory: Path):
    """LlamaForCausalLM (SDPA attention, `dtype`) with `loaded`'s parameters, on the GPU when there is one."""
    from llama_jax.model_dir import write_model_dir

    params = jax.tree.map(lambda a: np.asarray(a, np.float32), nnx.to_pure_dict(nnx.state(loaded.model)))
    config = loaded.config.replace(dtype="float32", param_dtype="float32", quantize="none")
    write_model_dir(directory / "model", config, params)
    return exported_model(directory / "model", directory / "hf", dtype)


def exported_model(model_dir: Path, hf_dir: Path, dtype: str):
    """LlamaForCausalLM (SDPA attention, `dtype`) of a llama_jax model directory, through `to-hf`."""
    from llama_jax.convert.to_hf import export_hf

    export_hf(model_dir, hf_dir)
    return hf_model(hf_dir, dtype)


def hf_model(hf_dir: Path, dtype: str):
    """LlamaForCausalLM (SDPA attention, `dtype`) of an exported directory, on the GPU when there is one."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.LlamaForCausalLM.from_pretrained(
        hf_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa"
    )
    return model.to(device).eval()
