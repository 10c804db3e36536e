"""Presets build the published models: parameter counts, FFN widths, YAML loading, validation."""

import math

import jax
import pytest

from llama_jax.config import PRESETS, ModelConfig, ffn_dim_for, load_model_config, preset
from llama_jax.model import abstract_state

# Published parameter counts: the LLaMA paper (Touvron et al. 2023) and the Hugging Face safetensors
# metadata ("total") of the meta-llama model repositories; TinyLlama from its model card.
PUBLISHED_PARAMS = {
    "llama1-7b": 6_738_415_616,
    "llama1-13b": 13_015_864_320,
    "llama1-33b": 32_528_943_616,
    "llama1-65b": 65_285_660_672,
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.1-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
    "llama3.1-405b": 405_853_388_800,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
    "tinyllama-1.1b": 1_100_048_384,
    "stories260k": 260_032,  # llama2.c doc/stories260K.md: "260K"; exact from the file size below
}

# FFN widths from the published params.json / config.json intermediate_size.
PUBLISHED_FFN = {
    "llama1-7b": 11008,
    "llama1-13b": 13824,
    "llama1-33b": 17920,
    "llama1-65b": 22016,
    "llama2-70b": 28672,
    "llama3-8b": 14336,
    "llama3.1-405b": 53248,
    "llama3.2-1b": 8192,
    "llama3.2-3b": 8192,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_count_matches_published(name):
    _, state = abstract_state(PRESETS[name])  # shapes only: a 405B model costs nothing
    counted = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))
    assert counted == PUBLISHED_PARAMS[name]
    assert PRESETS[name].param_count() == counted


def test_stories260k_count_matches_the_weight_file(assets):
    # legacy llama2.c file: 7 int32 header, float32 weights, then the unused RoPE tables
    size = (assets / "stories260K.bin").stat().st_size
    rope_tables = 512 * (64 // 8 // 2) * 2
    assert (size - 7 * 4) // 4 - rope_tables == PUBLISHED_PARAMS["stories260k"]


@pytest.mark.parametrize("name", sorted(PUBLISHED_FFN))
def test_ffn_width_follows_metas_rule(name):
    assert PRESETS[name].ffn_dim == PUBLISHED_FFN[name]


def test_ffn_rule_examples():
    assert ffn_dim_for(4096, 256) == 11008
    assert ffn_dim_for(8192, 4096, 1.3) == 28672


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model preset 'llama9-1t'"):
        preset("llama9-1t")
    with pytest.raises(ValueError, match="unknown model preset or missing config file"):
        load_model_config("llama9-1t")


def test_yaml_preset_with_overrides(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("preset: llama3.1-8b\nn_layers: 2\nrope_scaling: {factor: 4.0}\n")
    config = load_model_config(path)
    assert config.n_layers == 2 and config.dim == 4096 and config.rope_scaling.factor == 4.0
    assert config.rope_scaling.original_max_position == 8192


def test_yaml_full_config_and_unknown_keys(tmp_path):
    full = tmp_path / "full.yaml"
    full.write_text("vocab_size: 10\ndim: 8\nn_layers: 1\nn_heads: 2\nn_kv_heads: 1\nffn_dim: 16\nmax_seq_len: 4\n")
    assert load_model_config(full).head_dim == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: tiny\nn_layer: 3\n")
    with pytest.raises(ValueError, match="unknown keys \\['n_layer'\\]"):
        load_model_config(bad)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(n_kv_heads=4), "multiple of n_kv_heads"),
        (dict(remat="some"), "remat must be one of"),
        (dict(dim=0), "dim must be a positive integer"),
        (dict(dtype="float8"), "dtype must be one of"),
    ],
)
def test_invalid_configs_are_rejected(changes, message):
    with pytest.raises(ValueError, match=message):
        preset("tiny").replace(**changes)


def test_config_round_trips_through_a_dict():
    config = PRESETS["llama3.2-1b"]
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert hash(config) == hash(ModelConfig.from_dict(config.to_dict()))
