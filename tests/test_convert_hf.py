"""`convert hf` and `to-hf` against transformers: LLaMA 1 (MHA), LLaMA 2 (GQA, sharded safetensors),
Llama 3.1 (rope scaling, one KV head, head_dim ≠ dim/heads) and Llama 3.2 (tied embeddings)."""

import copy
import json
import shutil

import huggingface_hub
import numpy as np
import pytest
from hf_reference import (
    VARIANTS,
    hf_config,
    hf_logits,
    hf_model,
    our_logits,
    relative_error,
    sample_ids,
    torch,
    transformers,
)
from module_runner import assert_one_error_line, run_module

from llama_jax.convert import convert_hf, export_hf, load_hf
from llama_jax.convert.hf import INDEX_FILE
from llama_jax.model_dir import read_model_dir
from llama_jax.tokenizers import load_tokenizer

# The shape of Llama 2 chat's template (its tokenizer here is tok512, which a Llama 3 template would not fit).
LLAMA2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
    "message['content'] | trim + ' [/INST]' }}{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, assets):
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for variant in VARIANTS:
        dirs[variant] = root / variant
        sharding = {"max_shard_size": "100KB"} if variant == "llama2" else {}
        hf_model(variant).save_pretrained(dirs[variant], safe_serialization=True, **sharding)
    # The LLaMA 2 directory also carries what `convert hf` discovers by itself.
    shutil.copyfile(assets / "tok512.bin", dirs["llama2"] / "tokenizer.model")
    (dirs["llama2"] / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA2_CHAT_TEMPLATE}))
    return dirs


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory, assets):
    root = tmp_path_factory.mktemp("converted")
    result = run_module("llama_jax.convert", "hf", hf_dirs["llama2"], "--out", root / "llama2")
    assert result.returncode == 0, result.stderr
    for variant in VARIANTS:
        if variant != "llama2":
            convert_hf(hf_dirs[variant], root / variant, tokenizer=assets / "tok512.bin")
    return {variant: root / variant for variant in VARIANTS}


def test_the_sharded_reference_has_an_index(hf_dirs):
    assert (hf_dirs["llama2"] / INDEX_FILE).is_file()
    assert len(list(hf_dirs["llama2"].glob("model-*.safetensors"))) > 1


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant, converted):
    ids = sample_ids()
    assert relative_error(our_logits(converted[variant], ids), hf_logits(hf_model(variant), ids)) <= 1e-5


def test_llama3_rope_scaling_changes_the_reference_logits():
    """Guards the Llama 3.1 parity test: at its length the scaling must matter."""
    scaled = hf_model("llama3.1")
    unscaled = transformers.LlamaForCausalLM(hf_config("llama3.1", rope_scaling=None)).eval()
    unscaled.load_state_dict(scaled.state_dict())
    ids = sample_ids()
    assert relative_error(hf_logits(unscaled, ids), hf_logits(scaled, ids)) > 1e-2


def test_config_records_discovered_tokenizer_and_chat_template(converted):
    written = json.loads((converted["llama2"] / "config.json").read_text())
    assert written["tokenizer"] == "tokenizer.bin"
    assert written["chat_template"] == "llama2"
    assert written["model"]["tie_embeddings"] is False
    assert json.loads((converted["llama3.2"] / "config.json").read_text())["model"]["tie_embeddings"] is True


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_to_hf_round_trip_loads_in_transformers(variant, converted, tmp_path):
    out = tmp_path / "hf"
    if variant == "llama3.2":
        result = run_module("llama_jax.convert", "to-hf", converted[variant], "--out", out)
        assert result.returncode == 0, result.stderr
    else:
        export_hf(converted[variant], out, max_shard_size="100KB" if variant == "llama3.1" else "5GB")
    assert (out / INDEX_FILE).is_file() == (variant == "llama3.1")
    model, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    original = hf_model(variant).state_dict()
    exported = model.state_dict()
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    ids = sample_ids()
    assert relative_error(hf_logits(model, ids), hf_logits(hf_model(variant), ids)) <= 1e-5
    # The tokenizer comes along: transformers encodes as we do (BOS included), and the export imports
    # again without naming a tokenizer.
    text = "Once upon a time, a  girl named Lily"
    assert transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"] == load_tokenizer(
        converted[variant] / "tokenizer.bin"
    ).encode(text)
    if variant == "llama3.2":
        convert_hf(out, tmp_path / "again")
        assert json.loads((tmp_path / "again" / "config.json").read_text())["tokenizer"] == "tokenizer.model"
        assert relative_error(our_logits(tmp_path / "again", ids), our_logits(converted[variant], ids)) == 0


def test_convert_hf_takes_a_repo_id_from_the_local_cache(hf_dirs, converted, tmp_path, monkeypatch, assets):
    """A repo id resolves in the Hugging Face cache layout (models--OWNER--NAME/snapshots/REV, refs/main),
    offline; one that is not cached gets one line saying how to get it."""
    repo = tmp_path / "cache" / "models--someone--tiny-llama"
    shutil.copytree(hf_dirs["llama3.2"], repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))  # read at call time
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    convert_hf("someone/tiny-llama", tmp_path / "ours", tokenizer=assets / "tok512.bin")
    # The repository is recorded (a PEFT export of adapters trained on this model names it as the base), also
    # when the source is given as the cache's snapshot directory; a plain directory records none.
    assert read_model_dir(tmp_path / "ours").hf_repo == "someone/tiny-llama"
    convert_hf(repo / "snapshots" / "0123abc", tmp_path / "by-path", tokenizer=assets / "tok512.bin")
    assert read_model_dir(tmp_path / "by-path").hf_repo == "someone/tiny-llama"
    assert read_model_dir(converted["llama3.2"]).hf_repo is None
    assert (
        relative_error(our_logits(tmp_path / "ours", sample_ids()), hf_logits(hf_model("llama3.2"), sample_ids()))
        <= 1e-5
    )
    result = run_module(
        "llama_jax.convert",
        "hf",
        "someone/not-downloaded",
        "--out",
        tmp_path / "x",
        env={"HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"},
    )
    assert_one_error_line(
        result,
        "someone/not-downloaded is neither a directory nor a model in the Hugging Face "
        "cache; download it first: hf download someone/not-downloaded",
    )
    assert not (tmp_path / "x").exists()


def test_bf16_checkpoint_stays_bf16_unless_asked(tmp_path, assets):
    reference = copy.deepcopy(hf_model("llama2")).to(torch.bfloat16)
    reference.save_pretrained(tmp_path / "hf", safe_serialization=True)
    embedding = reference.state_dict()["model.embed_tokens.weight"]

    config, params = load_hf(tmp_path / "hf")
    assert (config.param_dtype, config.dtype) == ("bfloat16", "bfloat16")
    assert params["embed"].dtype.name == "bfloat16"
    assert np.array_equal(params["embed"].view(np.int16), embedding.view(torch.int16).numpy())

    config, params = load_hf(tmp_path / "hf", dtype="float32")
    assert config.param_dtype == "float32"
    assert np.array_equal(params["embed"], embedding.float().numpy())

    convert_hf(tmp_path / "hf", tmp_path / "ours", tokenizer=assets / "tok512.bin")
    export_hf(tmp_path / "ours", tmp_path / "back")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back")
    assert back.dtype == torch.bfloat16
    for name, tensor in reference.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
