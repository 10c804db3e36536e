"""LoRA fine-tuning (`lora.rank` > 0): only the adapters train, the run (with adapter dropout) resumes exactly,
the merged model is the base plus the adapters, and the exported adapters load in Hugging Face PEFT with the
same logits."""

import ast
import hashlib
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama_jax
from llama_jax.config import LoraConfig
from llama_jax.convert import export_hf, merge_lora
from llama_jax.lora import join, project, split_adapters
from llama_jax.model import abstract_state
from llama_jax.model_dir import read_model_dir
from llama_jax.train import run
from llama_jax.train.config import load_train_config

pytestmark = pytest.mark.slow  # the fast suite (-m 'not slow') leaves this module out

STEPS = 16
IDS = np.array([[1, 403, 407, 261, 378, 270, 288, 45, 99, 310, 12, 77]], np.int32)


def lora_config(stories_model: Path, run_dir: Path, *extra: str):
    return load_train_config(
        None,
        [
            f"init_from={stories_model}",
            "sft=true",
            "chat_template=llama2",
            "data=sft_example.jsonl",
            "seq_len=128",
            "batch_size=8",
            f"steps={STEPS}",
            "lr=5e-3",
            "warmup=2",
            "eval_every=8",
            "checkpoint_every=8",
            "samples=0",
            "lora.rank=4",
            "lora.alpha=8",
            "lora.targets=q,v,o,down",
            "lora.dropout=0.1",
            f"run_dir={run_dir}",
            *extra,
        ],
    )


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def trained(stories_model, tmp_path_factory):
    base_digest = tree_digest(stories_model)
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    result = run(lora_config(stories_model, run_dir))
    assert tree_digest(stories_model) == base_digest  # the base directory is only read
    return run_dir, result


def test_only_the_adapters_train_and_the_loss_falls(trained):
    run_dir, result = trained
    # orbax's own index of the saved tree: the adapters, nothing else
    saved = json.loads((run_dir / "checkpoints" / str(STEPS) / "params" / "_METADATA").read_text())["tree_metadata"]
    names = {"/".join(ast.literal_eval(key)) for key in saved}
    assert names == {
        f"layers/{module}/{weight}_lora_{ab}"
        for module, weight in (("attention", "wq"), ("attention", "wv"), ("attention", "wo"), ("mlp", "w_down"))
        for ab in "ab"
    }, names
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["split"] == "train"]
    evals = [r["loss"] for r in records if r["split"] == "eval"]
    assert train[-1] < train[0] - 1.0 and evals[1] < evals[0], (train, evals)
    assert json.loads((run_dir / "config.json").read_text())["lora_base"]


def test_the_merged_model_is_the_base_plus_the_adapters(trained, stories_model, tmp_path):
    run_dir, _ = trained
    run_model = read_model_dir(run_dir)
    graphdef, abstract = abstract_state(run_model.config)
    adapters_target, base_target = split_adapters(nnx.to_pure_dict(abstract))
    adapted = nnx.merge(
        graphdef,
        join(read_model_dir(stories_model).restore_params(base_target), run_model.restore_params(adapters_target)),
    )
    expected = np.asarray(adapted(jnp.asarray(IDS))[0])
    merged = np.asarray(llama_jax.load(run_dir).model(jnp.asarray(IDS))[0])
    assert np.abs(merged - expected).max() / np.abs(expected).max() < 1e-5  # float32 rounding of W + A·B
    base = np.asarray(llama_jax.load(stories_model).model(jnp.asarray(IDS))[0])
    assert np.abs(base - merged).max() > 1e-2  # the adapters did change the model
    # merge-lora writes it as a plain model directory
    out = merge_lora(run_dir, tmp_path / "merged")
    assert not read_model_dir(out).config.lora.enabled
    assert np.array_equal(np.asarray(llama_jax.load(out).model(jnp.asarray(IDS))[0]), merged)


def test_a_run_that_lost_its_last_checkpoint_resumes_to_the_same_losses(trained, stories_model, tmp_path):
    run_dir, result = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / str(STEPS))  # killed between the step-8 and step-16 checkpoints
    resumed = run(lora_config(stories_model, copy))
    assert (resumed["train_loss"], resumed["eval_loss"]) == (result["train_loss"], result["eval_loss"])


def test_the_adapters_load_in_peft_on_the_exported_base(trained, stories_model, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    run_dir, _ = trained
    base_hf = export_hf(stories_model, tmp_path / "base-hf")
    adapter_dir = export_hf(run_dir, tmp_path / "adapter", base_hf=base_hf)
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    # adapter_config.json names the base as transformers can load it: AutoPeftModel finds it on its own.
    adapted = peft.AutoPeftModelForCausalLM.from_pretrained(adapter_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = adapted(torch.from_numpy(IDS).long()).logits.numpy()
    ours = np.asarray(llama_jax.load(run_dir).model(jnp.asarray(IDS))[0])
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-4
    # Without --base-hf, a base converted from llama2.c has no name transformers could resolve: none is
    # written (never the llama_jax directory's path); a base converted from the hub is named by its repo id.
    unnamed = json.loads((export_hf(run_dir, tmp_path / "unnamed") / "adapter_config.json").read_text())
    assert unnamed["base_model_name_or_path"] is None
    config = json.loads((stories_model / "config.json").read_text())
    assert read_model_dir(stories_model).hf_repo is None and "hf_repo" not in config
    # and the merged model, exported, loads in plain transformers with the same logits
    merged_hf = export_hf(merge_lora(run_dir, tmp_path / "merged"), tmp_path / "merged-hf")
    with torch.no_grad():
        plain = transformers.LlamaForCausalLM.from_pretrained(merged_hf, dtype=torch.float32)(
            torch.from_numpy(IDS).long()
        ).logits.numpy()
    assert np.abs(ours - plain).max() / np.abs(plain).max() < 1e-4


def test_qlora_trains_adapters_on_an_int8_base(stories_model, tmp_path):
    from llama_jax.quantize import quantize_params

    config = lora_config(stories_model, tmp_path / "qlora", "steps=8", "log_every=1", "lora.int8_base=true")
    run(config)
    run_dir = Path(config.run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["split"] == "train"]
    assert train[-1] < train[0] - 0.5, train
    run_model = read_model_dir(run_dir)
    assert run_model.config.quantize == "int8"
    # What it trained: the int8 base (weights q with per-channel scales) under float32 adapters.
    graphdef, abstract = abstract_state(run_model.config)
    adapters_target, _ = split_adapters(nnx.to_pure_dict(abstract))
    _, float_abstract = abstract_state(run_model.config.replace(quantize="none"))
    base = read_model_dir(stories_model).restore_params(split_adapters(nnx.to_pure_dict(float_abstract))[1])
    trained = nnx.merge(graphdef, join(quantize_params(base), run_model.restore_params(adapters_target)))
    expected = np.asarray(trained(jnp.asarray(IDS))[0])
    merged = np.asarray(llama_jax.load(run_dir).model(jnp.asarray(IDS))[0])  # dequantized base + A·B, merged
    assert np.abs(merged - expected).max() / np.abs(expected).max() < 1e-5
    # merge-lora merges into the same dequantized base
    out = merge_lora(run_dir, tmp_path / "merged")
    assert np.array_equal(np.asarray(llama_jax.load(out).model(jnp.asarray(IDS))[0]), merged)


def test_adapter_dropout_is_peft_s_and_acts_only_in_training():
    """PEFT's lora_dropout: y = x·W + scale·(dropout(x)·A)·B, inverted (kept inputs scaled by 1/(1-p)), on the
    adapter's input only, a mask of its own per weight, and nothing without a training key."""
    p, rank = 0.5, 4
    lora = LoraConfig(rank, 8.0, ("q", "v"), p)
    keys = iter(jax.random.split(jax.random.key(0), 4))
    x = jax.random.normal(next(keys), (2, 64, 16))
    a = jax.random.normal(next(keys), (16, rank))
    b = jax.random.normal(next(keys), (rank, 16))
    w = jax.random.normal(next(keys), (16, 16))
    module = type("Layer", (), dict(wq=w, wq_lora_a=a, wq_lora_b=b, wv=w, wv_lora_a=a, wv_lora_b=b))
    plain = x @ w + lora.scale * (x @ a) @ b
    assert np.allclose(project(module, "wq", "btd,df->btf", x, lora), plain, atol=1e-4)  # no key: no dropout
    key = jax.random.key(1)
    dropped = project(module, "wq", "btd,df->btf", x, lora, key)
    assert not np.allclose(dropped, plain, atol=1e-2)
    assert np.array_equal(dropped, project(module, "wq", "btd,df->btf", x, lora, key))  # a key is one mask
    assert not np.allclose(dropped, project(module, "wv", "btd,df->btf", x, lora, key), atol=1e-2)  # per weight
    # The base path is untouched and the adapter path unbiased: averaged over masks it is the plain output.
    unbiased = jnp.mean(
        jax.vmap(lambda k: project(module, "wq", "btd,df->btf", x, lora, k))(jax.random.split(key, 400)), axis=0
    )
    adapter_only = lora.scale * (x @ a) @ b
    assert np.abs(unbiased - plain).max() < 0.15 * np.abs(adapter_only).max(), (
        np.abs(unbiased - plain).max(),
        np.abs(adapter_only).max(),
    )
