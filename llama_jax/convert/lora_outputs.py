"""What a LoRA run (train.py with lora.rank > 0) exports: its adapters in PEFT's format, or a merged model.

    python -m llama_jax.convert to-hf RUN_DIR --out ADAPTER_DIR    # adapter_config.json + adapter_model.safetensors
    python -m llama_jax.convert merge-lora RUN_DIR --out MODEL_DIR  # base + adapters, a plain model directory

PEFT's LoRA keeps, per adapted nn.Linear, lora_A (rank × in) and lora_B (out × rank) with the update
scaling · B·A on a weight stored (out × in); ours keeps A (in… × rank) and B (rank × out…) on a weight
stored (in… × out…), so lora_A = Aᵀ and lora_B = Bᵀ with the head axes flattened. `PeftModel.from_pretrained`
loads the directory onto the transformers model that `to-hf` exports from the run's base directory.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx

from llama_jax.checkpoint import ModelDir, load, write_model_dir
from llama_jax.config import LORA_TARGETS
from llama_jax.convert.safetensors_io import TensorSource, write_file
from llama_jax.convert.weights import WEIGHTS
from llama_jax.lora import split_adapters
from llama_jax.model import abstract_state
from llama_jax.staging import ensure_new_output_dir, staged_output_dir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_HF_MODULE = {w.key.split("/")[-1]: w.hf for w in WEIGHTS if w.per_layer}  # "wq" -> "self_attn.q_proj"


def export_peft(source: ModelDir, out: str | Path) -> Path:
    """The run's newest intact adapters as a PEFT LoRA directory (float32)."""
    ensure_new_output_dir(out)
    config, lora = source.config, source.config.lora
    _, abstract = abstract_state(config)
    adapters = source.restore_params(split_adapters(nnx.to_pure_dict(abstract))[0])
    tensors = []
    for target in lora.targets:
        module, weight, _ = LORA_TARGETS[target]
        a = np.asarray(adapters["layers"][module][weight + "_lora_a"], np.float32)
        b = np.asarray(adapters["layers"][module][weight + "_lora_b"], np.float32)
        prefix = "base_model.model.model.layers.{}." + _HF_MODULE[weight]
        for layer in range(config.n_layers):
            lora_a = np.ascontiguousarray(a[layer].reshape(-1, lora.rank).T)
            lora_b = np.ascontiguousarray(b[layer].reshape(lora.rank, -1).T)
            for name, value in ((".lora_A.weight", lora_a), (".lora_B.weight", lora_b)):
                tensors.append(TensorSource(prefix.format(layer) + name, value.shape, value.dtype,
                                            lambda value=value: value))
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "target_modules": sorted(_HF_MODULE[LORA_TARGETS[t][1]].split(".")[-1] for t in lora.targets),
        "base_model_name_or_path": str(source.lora_base), "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None,
    }
    with staged_output_dir(out) as staging:
        write_file(staging / ADAPTER_WEIGHTS, tensors)
        (staging / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")
    return Path(out).absolute()


def merge_lora(run_dir: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    """A plain model directory: the run's base weights with its newest intact adapters merged in."""
    ensure_new_output_dir(out)
    loaded = load(run_dir, dtype=dtype)
    source_tokenizer = loaded.tokenizer.path if loaded.tokenizer is not None else None
    params = nnx.to_pure_dict(nnx.state(loaded.model))
    return write_model_dir(out, loaded.config, params, source_tokenizer, loaded.chat_template)
