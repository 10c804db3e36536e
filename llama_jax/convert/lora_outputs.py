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
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.config import LORA_TARGETS
from llama_jax.convert.safetensors_io import TensorSource, write_file
from llama_jax.convert.weights import WEIGHTS
from llama_jax.errors import errors_naming
from llama_jax.lora import merged_weight, split_adapters
from llama_jax.model import abstract_state
from llama_jax.model_dir import ModelDir, lora_base_dir, read_model_dir, write_model_dir
from llama_jax.param_io import StoredParams
from llama_jax.quantize import WEIGHTS as QUANTIZED_WEIGHTS
from llama_jax.quantize import round_trip
from llama_jax.staging import ensure_new_output_dir, staged_output_dir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_HF_MODULE = {w.key.split("/")[-1]: w.hf for w in WEIGHTS if w.per_layer}  # "wq" -> "self_attn.q_proj"


def export_peft(source: ModelDir, out: str | Path, base_hf: str | Path | None = None) -> Path:
    """The run's newest intact adapters as a PEFT LoRA directory (float32), naming the base as transformers can
    find it (`peft_base_name`)."""
    ensure_new_output_dir(out)
    base_name = peft_base_name(source, base_hf)
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
                tensors.append(
                    TensorSource(prefix.format(layer) + name, value.shape, value.dtype, lambda value=value: value)
                )
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "target_modules": sorted(_HF_MODULE[LORA_TARGETS[t][1]].split(".")[-1] for t in lora.targets),
        "base_model_name_or_path": base_name,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
    }
    with staged_output_dir(out) as staging, errors_naming(Path(out).absolute()):
        write_file(staging / ADAPTER_WEIGHTS, tensors)
        (staging / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")
    return Path(out).absolute()


def peft_base_name(run: ModelDir, base_hf: str | Path | None) -> str | None:
    """What adapter_config.json names as the base model, for `AutoPeftModelForCausalLM` to load: `base_hf`, a
    transformers export of the run's base (`to-hf BASE --out HF_DIR`), else the Hugging Face repository the
    base was converted from. Never the base's llama_jax directory, which transformers cannot read; None, with
    a warning, when neither is known (`PeftModel.from_pretrained(base_model, ADAPTER_DIR)` still works)."""
    if base_hf is not None:
        path = Path(base_hf)
        if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
            raise ValueError(
                f"{path} is not a Hugging Face model directory: export the base first "
                f"(python -m llama_jax.convert to-hf {run.lora_base} --out {path})"
            )
        return str(path.absolute())
    repo = lora_base_dir(run).hf_repo
    if repo is None:
        logging.getLogger("llama_jax").warning(
            "adapter_config.json names no base model: %s was not converted from a Hugging Face repository. "
            "Export it with `python -m llama_jax.convert to-hf %s --out HF_DIR` and pass --base-hf HF_DIR, "
            "or load the adapters with PeftModel.from_pretrained(<that model>, ADAPTER_DIR)",
            run.lora_base,
            run.lora_base,
        )
    return repo


def merge_lora(run_dir: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    """A plain model directory: the run's base weights with its newest intact adapters merged in.

    Streamed: the base is read one parameter at a time (`StoredParams`) and each adapted weight merged one
    layer at a time, on the host, so memory holds the output model once plus one stored parameter, never the
    base and the merged model together (peft #1514 runs out of memory that way) and no accelerator memory.
    Each weight is merged into what training saw: the base in the run's compute dtype (int8-rounded for
    QLoRA), plus alpha/rank · A·B in float32; `dtype` sets the output's dtype (default: that compute dtype)."""
    ensure_new_output_dir(out)
    run = read_model_dir(run_dir)
    base_dir = lora_base_dir(run)
    lora = run.config.lora
    plain = run.config.without_adapters()
    seen_dtype = np.dtype(jnp.dtype(plain.param_dtype))
    if dtype is not None:
        plain = plain.replace(dtype=dtype, param_dtype=dtype)
    out_dtype = np.dtype(jnp.dtype(plain.param_dtype))
    _, run_abstract = abstract_state(run.config.replace(quantize="none"))
    adapters_target, base_target = split_adapters(nnx.to_pure_dict(run_abstract))
    adapters = jax.tree.map(np.asarray, run.restore_params(adapters_target))
    stored = StoredParams(
        base_dir.params_path,
        nnx.to_pure_dict(abstract_state(base_dir.config)[1]),
        base_dir.checksums(base_dir.params_path),
    )
    targeted = {f"layers/{module}/{weight}" for module, weight, _ in (LORA_TARGETS[t] for t in lora.targets)}
    projections = {
        f"layers/{module}/{weight}": (module, weight, n_in) for weight, (module, n_in) in QUANTIZED_WEIGHTS.items()
    }
    int8_base = run.config.quantize == "int8"

    def merged_param(key: str) -> np.ndarray:
        value = stored.take(key).astype(seen_dtype, copy=False)
        if key not in targeted and not (int8_base and key in projections):
            return value.astype(out_dtype, copy=False)
        module, weight, n_in = projections[key]
        # In place where the dtypes allow: no second copy of the largest stacked weight either.
        in_place = value.dtype == out_dtype and value.flags.writeable
        result = value if in_place else np.empty(value.shape, out_dtype)
        for layer in range(value.shape[0]):
            w = value[layer]
            if int8_base:  # QLoRA trained on every projection int8-rounded, adapted or not
                w = np.asarray(round_trip(w, tuple(range(n_in)))).astype(seen_dtype)
            if key in targeted:
                adapters_of = adapters["layers"][module]
                w = np.asarray(
                    merged_weight(
                        w.astype(np.float32),
                        adapters_of[weight + "_lora_a"][layer],
                        adapters_of[weight + "_lora_b"][layer],
                        lora.scale,
                    )
                )
            result[layer] = w
        return result

    params = jax.tree_util.tree_map_with_path(
        lambda path, _: merged_param("/".join(str(k.key) for k in path)), base_target
    )
    return write_model_dir(out, plain, params, run.tokenizer_path, run.chat_template)
