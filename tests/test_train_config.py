"""Training configuration: YAML + key=value overrides (OmegaConf), type checks, clear errors, the model it resolves
to."""

import dataclasses
from pathlib import Path

import pytest

from llama_jax.config import PRESETS
from llama_jax.hardware import compile_target
from llama_jax.sharding import MeshConfig
from llama_jax.train.config import TrainConfig, load_train_config
from llama_jax.train.init_from import build_model_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
README = (CONFIGS.parent / "README.md").read_text()


def test_default_yaml_is_the_default_job():
    assert load_train_config(CONFIGS / "default.yaml") == dataclasses.replace(TrainConfig(), hardware="cpu")


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_bundled_config_loads_and_names_its_hardware(name):
    config = load_train_config(CONFIGS / name)
    if config.model.preset is not None:
        build_model_config(config, "gpu", vocab_size=None)  # the recipes' models resolve
    assert config.hardware == "cpu" or compile_target(config.hardware).chips >= 1
    if config.hardware != "cpu":  # benchmarks/compile_recipes.py compiles them for their hardware (README)
        assert f"`{name}`" in README


def test_overrides_are_typed_and_nested():
    config = load_train_config(
        None,
        [
            "steps=7",
            "lr=1e-4",
            "sft=true",
            "mesh.fsdp=2",
            "mesh.data=1",
            "model=tiny",
            "model.remat=full",
            "model.dim=64",
            "init_from=null",
            'sample_prompts=["a: b", "c"]',
            "distributed.process_id=1",
            "tokenizer=train:1000",
        ],
    )
    assert (config.steps, config.lr, config.sft, config.init_from) == (7, 1e-4, True, None)
    assert config.mesh == MeshConfig(data=1, fsdp=2, tensor=1)
    assert config.model.preset == "tiny" and config.model.overrides() == {"remat": "full", "dim": 64}
    assert config.sample_prompts == ("a: b", "c")
    assert config.distributed.process_id == 1
    assert config.trained_vocab_size == 1000
    assert load_train_config(None, ["sample_prompts=ROMEO:"]).sample_prompts == ("ROMEO:",)


def test_yaml_nesting_and_command_line_precedence(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model: {preset: tiny, remat: save_dots}\nmesh: {tensor: 2}\nsteps: 5\nlr: 1\n")
    config = load_train_config(path, ["steps=9"])
    assert config.model.preset == "tiny" and config.model.overrides() == {"remat": "save_dots"}
    assert config.mesh.tensor == 2 and config.steps == 9 and config.lr == 1.0


@pytest.mark.parametrize(
    "argument, message",
    [
        ("stpes=5", "unknown config key 'stpes'; did you mean 'steps'"),
        ("model.dimm=5", "unknown config key 'model.dimm'"),
        ("mesh.pipeline=2", "unknown config key 'mesh.pipeline'"),
        ("steps=five", "bad value for steps: expected an integer, got 'five'"),
        ("steps=1.5", "bad value for steps"),
        ("lr=fast", "bad value for lr: expected a number"),
        ("sft=maybe", "bad value for sft: expected true or false"),
        ("steps=0", "steps must be at least 1"),
        ("batch_size=6", "batch_size (6) must be a multiple of grad_accum (4)"),
        ("tokenizer=train:abc", "VOCAB must be an integer"),
        ("dtype=float8", "dtype must be one of"),
        ("chat_template=llama3", "chat_template applies to SFT, DPO and GRPO data"),
        ("mesh.fsdp=0", "mesh sizes must be positive"),
        ("steps", "expected key=value"),
        ("model.dim=wide", "bad value for model.dim: expected an integer, got 'wide'"),
        ("steps=null", "bad value for steps: it cannot be null"),
    ],
)
def test_bad_overrides_are_one_clear_error(argument, message):
    with pytest.raises(ValueError) as error:
        load_train_config(None, ["grad_accum=4", "batch_size=8", argument])
    assert message in str(error.value)


def test_bad_yaml_values_are_type_checked(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: twelve\n")
    with pytest.raises(ValueError, match="bad value for steps: expected an integer, got 'twelve'"):
        load_train_config(path)
    path.write_text("mesh: {fsdp: 2, pipeline: 4}\n")
    with pytest.raises(ValueError, match="unknown config key 'mesh.pipeline'"):
        load_train_config(path)
    path.write_text("model: tiny\nsteps: 3\n")  # a preset name alone is `model.preset`
    assert load_train_config(path).model.preset == "tiny"
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        load_train_config(path)
    with pytest.raises(FileNotFoundError):
        load_train_config(tmp_path / "missing.yaml")


def test_model_from_scratch_adopts_the_tokenizer_vocabulary():
    config = load_train_config(None, ["model=tiny", "seq_len=32"])
    model = build_model_config(config, "cpu", vocab_size=300)
    assert model.vocab_size == 300 and model.dim == PRESETS["tiny"].dim
    assert (model.dtype, model.param_dtype) == ("float32", "float32")
    assert build_model_config(config, "gpu", vocab_size=300).dtype == "bfloat16"  # mixed precision on accelerators
    with pytest.raises(ValueError, match="seq_len 128 exceeds the model's max_seq_len 64"):
        build_model_config(load_train_config(None, ["model=tiny", "seq_len=128"]), "cpu")


def test_init_from_keeps_its_shape_and_refuses_another():
    base = PRESETS["stories260k"]
    config = load_train_config(None, ["init_from=somewhere", "model.remat=full", "seq_len=64"])
    model = build_model_config(config, "cpu", base=base, vocab_size=512)
    assert model.replace(remat="none") == base and model.remat == "full"
    with pytest.raises(ValueError, match="init_from somewhere holds a different model: dim=64 there but 96 here"):
        build_model_config(
            load_train_config(None, ["init_from=somewhere", "model.dim=96", "seq_len=64"]), "cpu", base=base
        )
    with pytest.raises(ValueError, match="holds a different model"):
        build_model_config(
            load_train_config(None, ["init_from=somewhere", "model=small", "seq_len=64"]), "cpu", base=base
        )
    with pytest.raises(ValueError, match="the tokenizer has 1000 tokens but the model only 512"):
        build_model_config(config, "cpu", base=base, vocab_size=1000)
