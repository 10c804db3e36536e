"""Import Hugging Face Llama checkpoints: config.json plus model.safetensors, or shards listed in
model.safetensors.index.json. Weights are already in the half-split RoPE layout; each tensor is read on
its own from its byte range (see `safetensors_io`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llama_jax.chat import detect_chat_template
from llama_jax.config import ModelConfig, RopeScaling
from llama_jax.convert.common import (
    chat_template_choice,
    dtype_name,
    find_tokenizer,
    read_json,
    source_description,
    with_dtype,
    write_converted,
)
from llama_jax.convert.safetensors_io import TensorEntry, read_header, read_tensor
from llama_jax.convert.weights import Weight, build_params, hf_name, weights_for
from llama_jax.staging import ensure_new_output_dir

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some exports carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# "owner/name" or "owner/name@revision", as on the Hugging Face Hub.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
_CACHED_SNAPSHOT = re.compile(r"/models--([\w.-]+?)--([\w.-]+)/snapshots/[^/]+/?$")


def config_from_hf(values: dict[str, Any], source: Path) -> ModelConfig:
    """Our ModelConfig from a transformers LlamaConfig dict (transformers 4 and 5 spellings)."""
    model_type = values.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"{source}: model_type {model_type!r} is not a Llama model")
    if values.get("hidden_act", "silu") != "silu" or values.get("attention_bias") or values.get("mlp_bias"):
        raise ValueError(f"{source}: only the plain Llama architecture is supported (silu MLP, no biases)")
    try:
        n_heads = int(values["num_attention_heads"])
        dim = int(values["hidden_size"])
        rope = values.get("rope_scaling") or values.get("rope_parameters") or {}
        theta = values.get("rope_theta") or rope.get("rope_theta") or 10000.0
        return ModelConfig(
            vocab_size=int(values["vocab_size"]),
            dim=dim,
            n_layers=int(values["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(values.get("num_key_value_heads") or n_heads),
            ffn_dim=int(values["intermediate_size"]),
            max_seq_len=int(values.get("max_position_embeddings", 2048)),
            head_dim=int(values.get("head_dim") or dim // n_heads),
            norm_eps=float(values.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=_rope_scaling(rope, source),
            tie_embeddings=bool(values.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise ValueError(f"{source}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def _rope_scaling(rope: dict[str, Any], source: Path) -> RopeScaling | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(f"{source}: unsupported rope scaling type {kind!r} (supported: llama3, or none)")
    return RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position=int(rope["original_max_position_embeddings"]),
    )


def tensor_index(hf_dir: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint, by name, located in its file."""
    index_path = hf_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif (hf_dir / SINGLE_FILE).is_file():
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise ValueError(
            f"{hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors checkpoints are supported)"
        )
    entries: dict[str, TensorEntry] = {}
    for file in files:
        path = hf_dir / file
        if not path.is_file():
            raise ValueError(f"{path} is listed in {INDEX_FILE} but missing")
        entries.update(read_header(path))
    if weight_map is not None:
        for name, file in weight_map.items():
            if name not in entries or entries[name].path.name != Path(file).name:
                raise ValueError(f"{hf_dir / file}: tensor {name} listed in {INDEX_FILE} is not in the file")
    return entries


def load_hf(hf_dir: str | Path, dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """The model config and parameter tree (numpy) of a Hugging Face Llama directory."""
    hf_dir = Path(hf_dir)
    config_path, values = source_description(hf_dir, "config.json", "Hugging Face model")
    config = config_from_hf(values, config_path)
    entries = tensor_index(hf_dir)
    expected = {
        hf_name(w, layer) for w in weights_for(config) for layer in (range(config.n_layers) if w.per_layer else [None])
    }
    tied_copy = {"lm_head.weight"} if config.tie_embeddings else set()  # some exports keep the tied copy
    unexpected = sorted(n for n in entries if n not in expected | tied_copy and not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise ValueError(f"{hf_dir}: tensors {unexpected[:5]} are not part of a Llama model with this config.json")
    missing = sorted(expected - set(entries))
    if missing:
        raise ValueError(f"{hf_dir}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    config = with_dtype(config, dtype_name(entries["model.embed_tokens.weight"].dtype, dtype))

    def read(weight: Weight, layer: int | None):
        name = hf_name(weight, layer)
        return name, read_tensor(entries[name])

    return config, build_params(config, read, interleaved_rope=False)


def hf_chat_template(hf_dir: Path) -> str | None:
    """The chat template text a Hugging Face directory ships, if any."""
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config_path = hf_dir / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    template = read_json(config_path).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def hf_repo_of(source: str | Path) -> str | None:
    """The Hugging Face repository id behind `source`: the id itself ("owner/name"), or a snapshot directory
    of the Hugging Face cache (.../models--owner--name/snapshots/REVISION); None for any other directory."""
    path = Path(source)
    if not path.exists() and _REPO_ID.fullmatch(str(source)):
        return str(source).partition("@")[0]
    cached = _CACHED_SNAPSHOT.search(str(path.absolute()))
    return f"{cached.group(1)}/{cached.group(2)}" if cached else None


def resolve_hf_source(source: str | Path) -> Path:
    """A local directory as is; otherwise a Hugging Face repo id ("owner/name", optionally "@revision")
    looked up in the local Hugging Face cache, never downloaded (`hf download` fetches it)."""
    path = Path(source)
    if path.exists() or not _REPO_ID.fullmatch(str(source)):
        return path
    repo_id, _, revision = str(source).partition("@")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision or None, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ValueError(
            f"{source} is neither a directory nor a model in the Hugging Face cache; "
            f"download it first: hf download {repo_id}"
        ) from None


def convert_hf(
    hf_dir: str | Path,
    out: str | Path,
    tokenizer: str | Path | None = None,
    chat_template: str = "auto",
    dtype: str | None = None,
) -> Path:
    ensure_new_output_dir(out)
    repo = hf_repo_of(hf_dir)
    hf_dir = resolve_hf_source(hf_dir)
    tok = find_tokenizer(tokenizer, [hf_dir / "tokenizer.model", hf_dir / "original" / "tokenizer.model"], hf_dir)
    template = chat_template_choice(chat_template, detect_chat_template(tok, hf_chat_template(hf_dir)))
    config, params = load_hf(hf_dir, dtype)
    return write_converted(out, config, params, tok, template, hf_repo=repo)
