"""Several LoRA adapters served on one base: read each (a LoRA run of this project, or a Hugging Face PEFT
folder), check it fits the base, and attach them as one adapter bank (lora.py), so that rows of one batch decode
with different adapters, each row naming its own by `adapter_ids`.

    loaded, names = with_adapters(load("models/base"), {"poet": "runs/poet", "coder": "hf/coder-lora"})
    logits, _ = loaded.model(ids, adapter_ids=jnp.array([0, 1, 2, 1]))  # 0: the base, i + 1: names[i]

A PEFT folder is what `convert to-hf RUN --out DIR` writes (adapter_config.json, adapter_model.safetensors):
lora_A (rank × in) and lora_B (out × rank) per layer and projection, read back into this project's layouts
(A (layers, *in, rank), B (layers, rank, *out); lora_outputs.py has the mapping). PEFT options that change
the computation beyond scale · (x·A)·B (DoRA, biases, per-module ranks, ...) are refused by name.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from llama_jax.config import LORA_TARGETS, ModelConfig
from llama_jax.integrity import device_checksums, leaf_key
from llama_jax.loading import LoadedModel, spread_kv_heads
from llama_jax.lora import bank_arrays, remove_bank, set_bank, split_adapters
from llama_jax.model import Llama, abstract_state
from llama_jax.model_dir import CONFIG_FILE, ModelDir, lora_base_dir, read_model_dir

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PEFT_NAMES = {  # transformers' LlamaDecoderLayer modules: ours
    "self_attn.q_proj": "wq",
    "self_attn.k_proj": "wk",
    "self_attn.v_proj": "wv",
    "self_attn.o_proj": "wo",
    "mlp.gate_proj": "w_gate",
    "mlp.up_proj": "w_up",
    "mlp.down_proj": "w_down",
}
_PEFT_KEY = re.compile(r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])\.weight")
# adapter_config.json settings whose non-default values change what an adapter computes: not implemented here.
_PEFT_UNSUPPORTED = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
}
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
log = logging.getLogger("llama_jax")


@dataclasses.dataclass(frozen=True, eq=False)
class Adapter:
    """One LoRA adapter in this project's layouts: per targeted weight ("wq", "w_down", ...) its A (layers, *in,
    rank) and B (layers, rank, *out) as float32 host arrays; the layer adds scale · (x·A)·B."""

    path: Path
    weights: dict[str, tuple[np.ndarray, np.ndarray]]
    scale: float

    @property
    def rank(self) -> int:
        return max(a.shape[-1] for a, _ in self.weights.values())


def read_adapter(path: str | Path, base: LoadedModel | ModelConfig, base_dir: str | Path | None = None) -> Adapter:
    """The adapter at `path`, a LoRA run directory (its newest intact adapters; nothing of its base is read) or a
    PEFT folder, refused with one ValueError naming `path` when it does not fit `base`. A run names the base it
    was trained on: that must be `base_dir` (the same directory, or one holding the same parameters) when given,
    else, for a loaded base, hold the same parameters as the loaded model where their dtypes allow comparing."""
    path = Path(path)
    config = base.config if isinstance(base, LoadedModel) else base
    run = None
    if (path / PEFT_CONFIG).is_file():
        adapter = _read_peft(path, config)
    elif (path / CONFIG_FILE).is_file():
        run = read_model_dir(path)
        if not run.config.lora.enabled:
            raise ValueError(f"{path} is a model directory, not a LoRA run or a PEFT adapter folder")
        adapter = _read_run(run)
    else:
        raise ValueError(f"{path} is neither a LoRA run ({CONFIG_FILE}) nor a PEFT adapter folder ({PEFT_CONFIG})")
    _check_fits(adapter, config, base.mesh if isinstance(base, LoadedModel) else None)
    if run is not None:
        _check_trained_on(run, base, base_dir)
        if run.config.quantize == "int8" and config.quantize != "int8":
            log.warning("%s was trained on an int8 base (QLoRA): on a float base its outputs differ a little", path)
    return adapter


def attach_bank(model: Llama, adapters: Sequence[Adapter]) -> None:
    """Give `model`, in place, a bank of `adapters` (entry i + 1: adapters[i], entry 0: the base) on every weight
    any of them targets, in the model's parameter dtype and placed by the weights' logical axes on their mesh.
    A bank already there is replaced; no adapters leaves the plain model. A model whose key/value heads were
    repeated for a wide tensor axis (`loading.spread_kv_heads`) gets its k and v adapters' heads repeated alike."""
    config, dtype = model.config, jnp.dtype(model.config.param_dtype)
    mesh = getattr(model.layers.attention.wk[...].sharding, "mesh", None)
    for adapter in adapters:
        _check_fits(adapter, config, mesh)
    for module_name in ("attention", "mlp"):
        module = getattr(model.layers, module_name)
        remove_bank(module)
        for module_of, weight, n_in in LORA_TARGETS.values():
            if module_of != module_name or not any(weight in adapter.weights for adapter in adapters):
                continue
            shape = getattr(module, weight).shape
            entries = [_bank_entry(adapter, weight, shape) for adapter in adapters]
            set_bank(module, weight, *bank_arrays(entries, shape, n_in, dtype))


def with_adapters(
    loaded: LoadedModel, paths: Mapping[str, str | Path], base_dir: str | Path | None = None
) -> tuple[LoadedModel, tuple[str, ...]]:
    """`loaded` with a bank of the adapters at `paths` (name -> path; `read_adapter`, `base_dir` as there) and their
    names in bank order: `adapter_ids` i + 1 selects names[i], 0 the base. `loaded` itself is left as it was;
    the new model shares its weights (no copy)."""
    adapters = [read_adapter(path, loaded, base_dir) for path in paths.values()]
    model = nnx.merge(*nnx.split(loaded.model))  # new modules over the same arrays: `loaded` keeps no bank
    attach_bank(model, adapters)
    return dataclasses.replace(loaded, model=model), tuple(paths)


def _bank_entry(adapter: Adapter, weight: str, weight_shape: tuple[int, ...]):
    if weight not in adapter.weights:
        return None
    a, b = adapter.weights[weight]
    if weight in ("wk", "wv") and b.shape[2] != weight_shape[-2]:  # heads repeated in place: (kv0, kv0, kv1, ...)
        b = np.repeat(b, weight_shape[-2] // b.shape[2], axis=2)
    return a, b, adapter.scale


def _read_run(run: ModelDir) -> Adapter:
    """A LoRA run's newest intact adapters (the checkpoint's adapter arrays only)."""
    lora = run.config.lora
    _, abstract = abstract_state(run.config.replace(quantize="none"))
    # Read whole onto this process's first device, whatever devices the run was saved from (a target without
    # shardings asks orbax for the saved topology, which another device count does not have).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), split_adapters(nnx.to_pure_dict(abstract))[0]
    )
    restored = run.restore_params(target)["layers"]
    weights = {}
    for target in lora.targets:
        module, weight, _ = LORA_TARGETS[target]
        a, b = (np.asarray(restored[module][weight + suffix], np.float32) for suffix in ("_lora_a", "_lora_b"))
        weights[weight] = (a, b)
    return Adapter(run.path, weights, lora.scale)


def _read_peft(path: Path, config: ModelConfig) -> Adapter:
    """A PEFT LoRA folder, its matrices laid out as ours for `config`'s shapes (the head axes unflattened)."""
    settings = _peft_settings(path)
    rank = settings["r"]
    found: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    for key, value in _read_safetensors(path / PEFT_WEIGHTS).items():
        match = _PEFT_KEY.fullmatch(key)
        if match is None or match[2] not in _PEFT_NAMES:
            raise ValueError(f"{path}: {key} is not a LoRA matrix of a Llama projection; only those are supported")
        found.setdefault(_PEFT_NAMES[match[2]], {"A": {}, "B": {}})[match[3]][int(match[1])] = value
    shapes = _weight_shapes(config)
    weights = {}
    for weight, halves in found.items():
        layers = sorted(halves["A"])
        if layers != list(range(config.n_layers)) or sorted(halves["B"]) != layers:
            covered = sorted(set(layers) | set(halves["B"]))
            raise ValueError(
                f"{path} does not fit the base model: its {weight} adapter covers layers {covered} (lora_A of "
                f"{len(layers)}, lora_B of {len(halves['B'])}), the base's layers are 0 to {config.n_layers - 1}"
            )
        a = np.stack([halves["A"][i] for i in layers])  # (layers, rank, in)
        b = np.stack([halves["B"][i] for i in layers])  # (layers, out, rank)
        in_shape, out_shape = shapes[weight]
        if weight in ("wk", "wv") and b.shape[1] % config.head_dim == 0:  # its own KV heads (`_check_fits`)
            out_shape = (b.shape[1] // config.head_dim, config.head_dim)
        if (a.shape[1], b.shape[2], a.shape[2], b.shape[1]) != (rank, rank, math.prod(in_shape), math.prod(out_shape)):
            raise _misfit(path, weight, f"lora_A {a.shape[1:]}, lora_B {b.shape[1:]} (r={rank})", in_shape, out_shape)
        a = np.swapaxes(a, 1, 2).reshape(config.n_layers, *in_shape, rank)
        b = np.swapaxes(b, 1, 2).reshape(config.n_layers, rank, *out_shape)
        weights[weight] = (a.astype(np.float32), b.astype(np.float32))
    if not weights:
        raise ValueError(f"{path}: {PEFT_WEIGHTS} holds no LoRA matrices")
    alpha = settings["lora_alpha"]
    return Adapter(path, weights, alpha / (math.sqrt(rank) if settings.get("use_rslora") else rank))


def _peft_settings(path: Path) -> dict:
    """adapter_config.json, refused when it asks for what `project` does not compute."""
    file = path / PEFT_CONFIG
    try:
        settings = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is corrupt: {e}") from None
    if settings.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path} is a {settings['peft_type']} adapter; only LoRA adapters are supported")
    if settings.get("bias", "none") != "none":
        raise ValueError(f"{path} trains biases (bias={settings['bias']!r}), which is not supported")
    for name, default in _PEFT_UNSUPPORTED.items():
        if settings.get(name, default) not in (default, None, {}, [], False):
            raise ValueError(f"{path} uses {name}={settings[name]!r}, which is not supported")
    if not isinstance(settings.get("r"), int) or settings["r"] <= 0 or not settings.get("lora_alpha"):
        raise ValueError(f"{file} is corrupt: it needs a positive integer r and lora_alpha")
    return settings


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    """Every tensor of a (small: an adapter's) safetensors file, float32. Written out rather than taken from
    `convert.safetensors_io`, which sits in a layer above this one."""
    if not file.is_file():
        raise ValueError(f"{file.parent} has no {file.name}")
    data = file.read_bytes()
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + size])
        header.pop("__metadata__", None)
        tensors = {}
        for name, entry in header.items():
            dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
            begin, end = (8 + size + offset for offset in entry["data_offsets"])
            if begin < 8 + size or end > len(data) or end - begin != math.prod(entry["shape"]) * dtype.itemsize:
                raise ValueError(f"{name}'s bytes lie outside the file")
            tensors[name] = np.frombuffer(data[begin:end], dtype).reshape(entry["shape"]).astype(np.float32)
    except (struct.error, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{file} is corrupt: {type(e).__name__}: {e}") from None
    return tensors


def _weight_shapes(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """weight -> (its input axes' sizes, its output axes' sizes) in one layer of `config`'s model."""
    layers = nnx.to_pure_dict(abstract_state(config.without_adapters())[1])["layers"]
    return {
        weight: (layers[module][weight].shape[1 : 1 + n_in], layers[module][weight].shape[1 + n_in :])
        for module, weight, n_in in LORA_TARGETS.values()
    }


def _check_fits(adapter: Adapter, config: ModelConfig, mesh) -> None:
    """ValueError unless each of the adapter's A and B has the shape the base's weight needs. Its k and v may have
    the base's key/value heads before `spread_kv_heads` repeated them for `mesh`."""
    shapes = _weight_shapes(config)
    for weight, (a, b) in adapter.weights.items():
        in_shape, out_shape = shapes[weight]
        rank = a.shape[-1]
        if weight in ("wk", "wv") and b.ndim == 4 and _kv_heads_spread_to(b.shape[2], config, mesh):
            out_shape = (b.shape[2], *out_shape[1:])
        if a.shape != (config.n_layers, *in_shape, rank) or b.shape != (config.n_layers, rank, *out_shape):
            raise _misfit(adapter.path, weight, f"A {a.shape}, B {b.shape}", in_shape, out_shape, config.n_layers)


def _kv_heads_spread_to(kv_heads: int, config: ModelConfig, mesh) -> bool:
    """Whether `kv_heads` key/value heads are what `spread_kv_heads` repeated into the base's on `mesh`."""
    if mesh is None or not 0 < kv_heads < config.n_kv_heads:
        return False
    try:
        return spread_kv_heads(config.replace(n_kv_heads=kv_heads), mesh) == config
    except ValueError:  # not a head count of this model at all
        return False


def _misfit(path, weight, found: str, in_shape, out_shape, layers: int | None = None) -> ValueError:
    stacked = f"{layers} layers of " if layers else ""
    return ValueError(
        f"{path} does not fit the base model: its {weight} adapter is {found}, the base's {weight} is "
        f"{stacked}{tuple(in_shape)} -> {tuple(out_shape)}"
    )


def _check_trained_on(run: ModelDir, base: LoadedModel | ModelConfig, base_dir: str | Path | None) -> None:
    """ValueError unless the run's adapters were trained on this base (see `read_adapter`)."""
    if base_dir is not None:
        base_dir = Path(base_dir)
        if run.lora_base.resolve() == base_dir.resolve():
            return
        recorded, given = lora_base_dir(run), read_model_dir(base_dir)
        stored = recorded.checksums(recorded.params_path)
        if stored is None or stored != given.checksums(given.params_path):
            raise ValueError(f"{run.path} holds adapters trained on {run.lora_base}, not on {base_dir}")
        return
    if not isinstance(base, LoadedModel):
        return  # a config alone has no weights to compare: the shapes are all that is checked
    recorded = lora_base_dir(run)
    stored = recorded.checksums(recorded.params_path) or {}
    expected = nnx.to_pure_dict(abstract_state(recorded.config.without_adapters())[1])
    expected = {leaf_key(key): leaf for key, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]}
    loaded = nnx.to_pure_dict(nnx.state(base.model, nnx.Param))
    # Weights loaded in another dtype, repeated for a tensor axis or quantized hold other bytes: not comparable.
    comparable = {
        key: leaf
        for key, leaf in ((leaf_key(k), v) for k, v in jax.tree_util.tree_flatten_with_path(loaded)[0])
        if key in stored
        and key in expected
        and leaf.shape == expected[key].shape
        and str(leaf.dtype) == recorded.config.param_dtype
    }
    if not comparable:
        log.warning(
            "%s: cannot tell whether the loaded base is %s, which its adapters were trained on", run.path, run.lora_base
        )
        return
    differ = sorted(key for key, sums in device_checksums(comparable).items() if sums != stored[key])
    if differ:
        raise ValueError(
            f"{run.path} holds adapters trained on {run.lora_base}, whose {differ[0]} differs from the loaded base's"
        )
