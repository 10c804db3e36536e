"""Converters refuse bad input with one clear message: corrupt or truncated files, shapes that do not fit
the config, missing files, unsupported settings, an output directory that is not new. Through the command
line: exit code ≠ 0, one `error:` line, no traceback, nothing overwritten."""

import json
import shutil
import struct

import numpy as np
import pytest
from module_runner import assert_one_error_line, run_module
from safetensors.numpy import save_file

from llama_jax.convert import convert_hf, load_hf, load_llama2c, load_meta

HF_CONFIG = {
    "model_type": "llama",
    "vocab_size": 515,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 32,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}


def hf_tensors():
    rng = np.random.default_rng(0)
    shapes = {
        "model.embed_tokens.weight": (515, 16),
        "model.norm.weight": (16,),
        "lm_head.weight": (515, 16),
        "model.layers.0.input_layernorm.weight": (16,),
        "model.layers.0.post_attention_layernorm.weight": (16,),
        "model.layers.0.self_attn.q_proj.weight": (16, 16),
        "model.layers.0.self_attn.k_proj.weight": (8, 16),
        "model.layers.0.self_attn.v_proj.weight": (8, 16),
        "model.layers.0.self_attn.o_proj.weight": (16, 16),
        "model.layers.0.mlp.gate_proj.weight": (24, 16),
        "model.layers.0.mlp.up_proj.weight": (24, 16),
        "model.layers.0.mlp.down_proj.weight": (16, 24),
    }
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def write_hf(directory, config_changes=None, tensors=None):
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({**HF_CONFIG, **(config_changes or {})}))
    save_file(hf_tensors() if tensors is None else tensors, str(directory / "model.safetensors"))
    return directory


@pytest.fixture
def stories_copy(assets, tmp_path):
    path = tmp_path / "stories.bin"
    shutil.copyfile(assets / "stories260K.bin", path)
    return path


# --- through the command line ---------------------------------------------------------------------------


def test_cli_truncated_safetensors(tmp_path, assets):
    hf = write_hf(tmp_path / "hf")
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[:-100])
    result = run_module("llama_jax.convert", "hf", hf, "--tokenizer", assets / "tok512.bin", "--out", tmp_path / "out")
    assert "truncated" in assert_one_error_line(result)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"], "no staging directory is left behind"


def test_cli_never_writes_into_a_non_empty_out(tmp_path, assets):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run_module(
        "llama_jax.convert", "llama2c", assets / "stories260K.bin", "--tokenizer", assets / "tok512.bin", "--out", out
    )
    assert "not empty" in assert_one_error_line(result)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_cli_out_under_a_file_is_one_line(tmp_path, assets):
    (tmp_path / "file").write_text("mine")
    result = run_module(
        "llama_jax.convert",
        "llama2c",
        assets / "stories260K.bin",
        "--tokenizer",
        assets / "tok512.bin",
        "--out",
        tmp_path / "file" / "sub",
    )
    assert "Not a directory" in assert_one_error_line(result)
    assert (tmp_path / "file").read_text() == "mine"


def test_cli_unknown_argument(tmp_path, assets):
    result = run_module(
        "llama_jax.convert",
        "llama2c",
        assets / "stories260K.bin",
        "--tokenizer",
        assets / "tok512.bin",
        "--out",
        tmp_path / "out",
        "--bogus",
    )
    assert "unrecognized arguments: --bogus" in assert_one_error_line(result)
    assert not (tmp_path / "out").exists()


# --- llama2.c files -------------------------------------------------------------------------------------


def test_llama2c_truncated(stories_copy):
    stories_copy.write_bytes(stories_copy.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="truncated"):
        load_llama2c(stories_copy)


def test_llama2c_trailing_bytes(stories_copy):
    stories_copy.write_bytes(stories_copy.read_bytes() + b"\0" * 8)
    with pytest.raises(ValueError, match="corrupt or not a llama2.c file"):
        load_llama2c(stories_copy)


def test_llama2c_nonsense_header(tmp_path):
    (tmp_path / "x.bin").write_bytes(struct.pack("<7i", 64, 172, -5, 8, 4, 512, 512) + b"\0" * 64)
    with pytest.raises(ValueError, match="not a llama2.c model file"):
        load_llama2c(tmp_path / "x.bin")
    (tmp_path / "short.bin").write_bytes(b"\1\2\3")
    with pytest.raises(ValueError, match="too short"):
        load_llama2c(tmp_path / "short.bin")


def test_llama2c_unsupported_version(tmp_path):
    head = struct.pack("<Ii7iB", 0x616B3432, 3, 64, 172, 5, 8, 4, 512, 512, 1)
    (tmp_path / "v3.bin").write_bytes(head + b"\0" * (256 - len(head)))
    with pytest.raises(ValueError, match="unsupported llama2.c file version 3"):
        load_llama2c(tmp_path / "v3.bin")


# --- Hugging Face directories ---------------------------------------------------------------------------


def test_hf_valid_directory_loads(tmp_path):
    """The fixture itself is a valid checkpoint, so the failures below come from what each case breaks."""
    config, params = load_hf(write_hf(tmp_path / "hf"))
    assert config.head_dim == 8 and params["lm_head"].shape == (16, 515)


def test_hf_corrupt_header(tmp_path):
    hf = write_hf(tmp_path / "hf")
    (hf / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        load_hf(hf)
    (hf / "model.safetensors").write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(ValueError, match="not JSON"):
        load_hf(hf)


def test_hf_offsets_that_disagree_with_the_shape(tmp_path):
    hf = write_hf(tmp_path / "hf")
    header = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [16], "data_offsets": [0, 60]}}).encode()
    (hf / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(ValueError, match="offsets do not match its shape"):
        load_hf(hf)


def test_hf_tensor_of_the_wrong_shape(tmp_path):
    tensors = hf_tensors()
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 16), np.float32)
    with pytest.raises(ValueError, match=r"k_proj.weight has shape \(16, 16\), but the model config needs \(8, 16\)"):
        load_hf(write_hf(tmp_path / "hf", tensors=tensors))


def test_hf_missing_and_unexpected_tensors(tmp_path):
    tensors = hf_tensors()
    del tensors["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="up_proj.weight is missing"):
        load_hf(write_hf(tmp_path / "missing", tensors=tensors))
    tensors = hf_tensors()
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(16, np.float32)
    with pytest.raises(ValueError, match="q_proj.bias"):
        load_hf(write_hf(tmp_path / "extra", tensors=tensors))


def test_hf_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_hf(tmp_path / "nowhere")
    hf = write_hf(tmp_path / "hf")
    (hf / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        load_hf(hf)
    hf = write_hf(tmp_path / "hf2")
    (hf / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="neither model.safetensors nor"):
        load_hf(hf)
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="listed in model.safetensors.index.json but missing"):
        load_hf(hf)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope scaling type 'yarn'"),
        ({"model_type": "mistral"}, "not a Llama model"),
        ({"attention_bias": True}, "no biases"),
        ({"num_key_value_heads": 3}, r"multiple of n_kv_heads \(3\)"),
    ],
)
def test_hf_unsupported_configs(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        load_hf(write_hf(tmp_path / "hf", changes))


def test_tokenizer_larger_than_the_vocabulary(tmp_path, assets):
    tensors = hf_tensors()
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:300]
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:300]
    hf = write_hf(tmp_path / "hf", {"vocab_size": 300}, tensors)
    with pytest.raises(ValueError, match="512 tokens, more than the model's 300"):
        convert_hf(hf, tmp_path / "out", tokenizer=assets / "tok512.bin")
    assert not (tmp_path / "out").exists()


def test_hf_without_a_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer found"):
        convert_hf(write_hf(tmp_path / "hf"), tmp_path / "out")


# --- Meta checkpoints -----------------------------------------------------------------------------------


def write_meta(directory, params=None):
    torch = pytest.importorskip("torch")
    directory.mkdir()
    (directory / "params.json").write_text(
        json.dumps(params or {"dim": 16, "n_layers": 1, "n_heads": 2, "vocab_size": -1, "multiple_of": 8})
    )
    return torch


def test_meta_corrupt_checkpoint(tmp_path):
    write_meta(tmp_path / "meta")
    (tmp_path / "meta" / "consolidated.00.pth").write_bytes(b"PK\3\4 this is not a checkpoint")
    with pytest.raises(ValueError, match="cannot read this PyTorch checkpoint"):
        load_meta(tmp_path / "meta")


def test_meta_missing_pieces(tmp_path):
    torch = write_meta(tmp_path / "meta")
    with pytest.raises(ValueError, match="no consolidated.NN.pth"):
        load_meta(tmp_path / "meta")
    torch.save({"tok_embeddings.weight": torch.zeros(515, 16)}, tmp_path / "meta" / "consolidated.00.pth")
    with pytest.raises(ValueError, match="layers.0.attention_norm.weight is missing"):
        load_meta(tmp_path / "meta")
    (tmp_path / "meta" / "params.json").unlink()
    with pytest.raises(ValueError, match="no params.json"):
        load_meta(tmp_path / "meta")


def test_meta_shards_that_do_not_fit(tmp_path):
    torch = write_meta(tmp_path / "meta")
    for shard in range(2):
        torch.save({"tok_embeddings.weight": torch.zeros(515, 7)}, tmp_path / "meta" / f"consolidated.0{shard}.pth")
    with pytest.raises(ValueError, match=r"shard shapes \[\(515, 7\), \(515, 7\)\] do not fit dim 16"):
        load_meta(tmp_path / "meta")
