"""Export a model directory to the Hugging Face layout `transformers.LlamaForCausalLM` loads:
config.json, model.safetensors (or shards plus model.safetensors.index.json above a size limit), and the
tokenizer and generation files `AutoTokenizer` and `generate` read (hf_tokenizer.py). Our weights already
use the half-split RoPE layout, so only transposes are needed.
The output is assembled in a staging directory and renamed into place, like every model directory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.config import ModelConfig
from llama_jax.convert.common import dtype_name
from llama_jax.convert.hf import INDEX_FILE, SINGLE_FILE
from llama_jax.convert.hf_tokenizer import write_hf_tokenizer
from llama_jax.convert.safetensors_io import TensorSource, shard_plan, write_file
from llama_jax.convert.weights import Weight, hf_name, to_torch_layout, weights_for
from llama_jax.errors import errors_naming
from llama_jax.model import abstract_state
from llama_jax.model_dir import read_model_dir
from llama_jax.param_io import StoredParams
from llama_jax.staging import ensure_new_output_dir, staged_output_dir

DEFAULT_MAX_SHARD_SIZE = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """ "5GB" -> 5e9 bytes (decimal units as transformers uses; KiB/MiB/GiB are binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"bad size {text!r}: expected e.g. 5GB, 500MB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def hf_config(config: ModelConfig, dtype: str, bos_id: int | None, eos_id: int | None) -> dict:
    """transformers LlamaConfig fields for `config` (rope_theta/rope_scaling spelling, which transformers
    4.45+ and 5 both read)."""
    scaling = None
    if config.rope_scaling is not None:
        s = config.rope_scaling
        scaling = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
    }


def export_hf(
    model_dir: str | Path,
    out: str | Path,
    dtype: str | None = None,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    base_hf: str | Path | None = None,
) -> Path:
    """A model directory in the Hugging Face layout; a LoRA run's adapters as a PEFT adapter directory, naming
    as its base `base_hf` (the transformers export of the run's base) or the hub repository the base came from."""
    ensure_new_output_dir(out)  # before any work: refuse early
    max_bytes = parse_size(max_shard_size)
    source = read_model_dir(model_dir)
    if source.config.lora.enabled:  # a LoRA run: its adapters, for PEFT on the base model's export
        from llama_jax.convert.lora_outputs import export_peft

        return export_peft(source, out, base_hf)
    if base_hf is not None:
        raise ValueError(f"--base-hf names the base of a LoRA run's adapters; {model_dir} is not a LoRA run")
    config = source.config
    name = dtype_name(np.dtype(jnp.dtype(config.param_dtype)), dtype)
    np_dtype = np.dtype(jnp.dtype(name))
    tokenizer = source.tokenizer()
    stored = StoredParams(
        source.params_path, nnx.to_pure_dict(abstract_state(config)[1]), source.checksums(source.params_path)
    )

    def tensor(weight: Weight, layer: int | None) -> TensorSource:
        def values() -> np.ndarray:
            value = stored[weight.key]
            return to_torch_layout(weight, value if layer is None else value[layer], config)

        return TensorSource(hf_name(weight, layer), weight.torch_shape(config), np_dtype, values)

    # Weight-major order: consecutive tensors come from the same stored parameter.
    tensors = [
        tensor(w, layer) for w in weights_for(config) for layer in (range(config.n_layers) if w.per_layer else [None])
    ]
    with staged_output_dir(out) as staging, errors_naming(Path(out).absolute()):
        _write_weights(staging, tensors, max_bytes)
        bos, eos = (tokenizer.bos_id, tokenizer.eos_id) if tokenizer else (None, None)
        (staging / "config.json").write_text(json.dumps(hf_config(config, name, bos, eos), indent=2) + "\n")
        if tokenizer is not None:
            write_hf_tokenizer(tokenizer, source.chat_template, staging)
    return Path(out).absolute()


def _write_weights(directory: Path, tensors: list[TensorSource], max_bytes: int) -> None:
    shards = shard_plan(tensors, max_bytes)
    if len(shards) == 1:
        write_file(directory / SINGLE_FILE, shards[0])
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_file(directory / file_name, shard)
        weight_map.update({t.name: file_name for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
