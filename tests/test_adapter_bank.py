"""Several LoRA adapters on one base in one batch (`adapters.py`, the bank in `lora.py`): each row's logits are
those of the model merged with its own adapter — without a cache, through prefill and through the KV cache —
and an adapter is read alike from a LoRA run and from its PEFT export, and refused on a base it does not fit."""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama_jax
from llama_jax.adapters import Adapter, attach_bank, read_adapter, with_adapters
from llama_jax.config import MeshConfig, preset
from llama_jax.convert import export_hf
from llama_jax.kv_cache import KVCache
from llama_jax.loading import LoadedModel
from llama_jax.lora import merged_weight
from llama_jax.model import create_model
from llama_jax.model_dir import read_model_dir, write_model_dir
from llama_jax.sharding import make_mesh, param_shardings

CONFIG = preset("tiny")  # odd sizes: 6 query heads over 2 KV heads of 8, ffn 80, 2 layers
ROW_ADAPTERS = np.array([0, 1, 2, 1], np.int32)  # row r decodes with bank entry ROW_ADAPTERS[r]; 0: the base
LENGTH = 9


def random_adapter(rng, model, rank: int, alpha: float, weights: tuple[str, ...]) -> Adapter:
    """An adapter with A and B both random (a fresh one's B is zero: it would change nothing)."""
    found = {}
    for weight in weights:
        module = "attention" if weight in ("wq", "wk", "wv", "wo") else "mlp"
        shape = getattr(getattr(model.layers, module), weight).shape
        n_in = 3 if weight == "wo" else 2  # with the layers axis
        a = 0.3 * rng.standard_normal((*shape[:n_in], rank), np.float32)
        b = 0.3 * rng.standard_normal((shape[0], rank, *shape[n_in:]), np.float32)
        found[weight] = (a, b)
    return Adapter(f"random-rank-{rank}", found, alpha / rank)


def merged_model(model, adapter: Adapter | None):
    """The plain model with one adapter merged into its weights (W + scale·A·B): the reference."""
    params = nnx.to_pure_dict(nnx.state(model))
    for weight, (a, b) in (adapter.weights if adapter else {}).items():
        module = "attention" if weight in ("wq", "wk", "wv", "wo") else "mlp"
        w = params["layers"][module][weight]
        params["layers"][module][weight] = merged_weight(w, a, b, adapter.scale)
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


# Jitted once per graph (the plain model's, the banked one's): the references share their compiled programs.
@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, adapter_ids):
    return nnx.merge(graphdef, state)(ids, adapter_ids=adapter_ids)[0]


@functools.partial(jax.jit, static_argnums=0)
def _prefill(graphdef, state, ids, adapter_ids):
    return nnx.merge(graphdef, state).prefill(ids, adapter_ids=adapter_ids)


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, state, chunk, cache, adapter_ids):
    return nnx.merge(graphdef, state)(chunk, cache=cache, adapter_ids=adapter_ids)


def forward(model, ids, adapter_ids=None):
    return np.asarray(_forward(*nnx.split(model), ids, adapter_ids))


def prefill(model, ids, adapter_ids=None):
    logits, (k, v) = _prefill(*nnx.split(model), ids, adapter_ids)
    return np.asarray(logits), np.asarray(k), np.asarray(v)


def decode(model, ids, adapter_ids=None):
    """A prompt in two chunks into a KV cache, then one token at a time: logits of every position."""
    graphdef, state = nnx.split(model)
    cache, pieces = KVCache.zeros(model.config, ids.shape[0], 16), []
    for start, end in [(0, 4), (4, 6), *((i, i + 1) for i in range(6, LENGTH))]:
        logits, cache = _step(graphdef, state, ids[:, start:end], cache, adapter_ids)
        pieces.append(np.asarray(logits))
    return np.concatenate(pieces, axis=1)


def per_row(references, row_adapters=ROW_ADAPTERS):
    """Row r of the reference computed with row r's adapter."""
    return np.stack([references[k][r] for r, k in enumerate(row_adapters)])


@pytest.fixture(scope="module")
def setup():
    model = create_model(CONFIG, make_mesh(MeshConfig(), jax.devices()[:1]), seed=0)
    adapters = [
        random_adapter(np.random.default_rng(1), model, rank=3, alpha=5.0, weights=("wq", "wv", "wo", "w_down")),
        random_adapter(np.random.default_rng(2), model, rank=5, alpha=16.0, weights=("wq", "wk", "w_gate", "w_down")),
    ]
    banked = nnx.merge(*nnx.split(model))
    attach_bank(banked, adapters)
    references = [merged_model(model, adapter) for adapter in [None, *adapters]]
    ids = jax.random.randint(jax.random.key(7), (len(ROW_ADAPTERS), LENGTH), 0, CONFIG.vocab_size)
    return model, adapters, banked, references, ids


def test_each_row_is_the_model_merged_with_its_own_adapter(setup):
    model, adapters, banked, references, ids = setup
    expected = [forward(reference, ids) for reference in references]
    assert min(np.abs(expected[k] - expected[0]).max() for k in (1, 2)) > 0.1  # the adapters do change the model
    assert np.abs(expected[1] - expected[2]).max() > 0.1
    np.testing.assert_allclose(forward(banked, ids, ROW_ADAPTERS), per_row(expected), rtol=1e-5, atol=1e-5)
    # prefill: the same logits, and each row's keys and values are its adapter's (k and v adapted by one each)
    logits, k, v = prefill(banked, ids, ROW_ADAPTERS)
    reference_kv = [prefill(reference, ids)[1:] for reference in references]
    np.testing.assert_allclose(logits, per_row(expected), rtol=1e-5, atol=1e-5)
    for got, half in ((k, 0), (v, 1)):
        want = np.stack([reference_kv[a][half][:, r] for r, a in enumerate(ROW_ADAPTERS)], axis=1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_each_row_decodes_through_the_kv_cache_with_its_own_adapter(setup):
    model, adapters, banked, references, ids = setup
    expected = per_row([forward(reference, ids) for reference in references])
    np.testing.assert_allclose(decode(banked, ids, ROW_ADAPTERS), expected, rtol=1e-5, atol=1e-5)


def test_the_base_rows_are_the_plain_model_and_no_ids_ignore_the_bank(setup):
    model, adapters, banked, references, ids = setup
    plain = forward(model, ids)
    # entry 0 adds exactly zero; ids outside the bank (negative ones too) read the base, not another adapter
    outside = np.array([0, 3, -1, 0], np.int32)
    np.testing.assert_allclose(forward(banked, ids, outside), plain, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(forward(banked, ids), plain, rtol=1e-6, atol=1e-6)
    assert not hasattr(model.layers.attention, "wq_bank_a")  # the model the bank was copied from has none
    bank_a, bank_b = banked.layers.attention.wq_bank_a, banked.layers.attention.wq_bank_b
    assert bank_a.shape == (2, 3, 48, 5) and bank_b.shape == (2, 3, 5, 6, 8)  # 1 + 2 entries, rank padded to 5
    assert not hasattr(banked.layers.mlp, "w_up_bank_a")  # no adapter targets it: no bank
    np.testing.assert_array_equal(np.asarray(banked.layers.attention.wv_bank_b[...])[:, 2], 0)  # not targeted by 2
    np.testing.assert_array_equal(np.asarray(bank_b[...])[:, 0], 0)  # entry 0: the base
    np.testing.assert_array_equal(np.asarray(bank_a[...])[:, 1, :, 3:], 0)  # rank 3 padded with zeros
    # the scale is folded into B
    np.testing.assert_allclose(np.asarray(bank_b[...])[:, 2], adapters[1].scale * adapters[1].weights["wq"][1])
    # attaching no adapters leaves the plain model
    again = nnx.merge(*nnx.split(banked))
    attach_bank(again, [])
    assert not any(name.endswith(("_bank_a", "_bank_b")) for name in vars(again.layers.attention))


def test_the_bank_is_sharded_by_the_weights_logical_axes(setup):
    model, adapters, banked, references, ids = setup
    mesh = make_mesh(MeshConfig(data=1, tensor=2))
    state = nnx.state(model)
    sharded = nnx.merge(nnx.graphdef(model), jax.device_put(state, param_shardings(state, mesh)))
    attach_bank(sharded, adapters)
    spec = sharded.layers.attention.wq_bank_b[...].sharding.spec
    assert tuple(spec) == (None, None, None, "tensor", None), spec  # heads split as wq's, rank and entries not
    assert tuple(sharded.layers.mlp.w_down_bank_a[...].sharding.spec)[2] == "tensor"
    graphdef, state = nnx.split(sharded)
    with jax.set_mesh(mesh):
        logits = np.asarray(_forward(graphdef, state, ids, ROW_ADAPTERS))
    expected = per_row([forward(reference, ids) for reference in references])
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


# A real LoRA run of the stories260K base, and its PEFT export.


@pytest.fixture(scope="module")
def lora_run(stories_model, tmp_path_factory):
    from llama_jax.train import run
    from llama_jax.train.config import load_train_config

    run_dir = tmp_path_factory.mktemp("adapter_bank") / "run"
    settings = [
        f"init_from={stories_model}",
        "sft=true",
        "chat_template=llama2",
        "data=sft_example.jsonl",
        "seq_len=128",
        "batch_size=2",
        "steps=2",
        "lr=5e-2",  # large: after two steps every B is well away from its zero start
        "warmup=1",
        "eval_batches=1",
        "checkpoint_every=2",
        "samples=0",
        "lora.rank=4",
        "lora.alpha=8",
        "lora.targets=q,k,v,o,down",
        f"run_dir={run_dir}",
    ]
    run(load_train_config(None, settings))
    peft_dir = export_hf(run_dir, run_dir.parent / "peft")  # what `python -m llama_jax.convert to-hf` writes
    return run_dir, peft_dir


@pytest.mark.slow
def test_a_peft_export_reads_as_the_run_itself_and_serves_as_the_merged_run(lora_run, stories_model, tmp_path):
    run_dir, peft_dir = lora_run
    base = llama_jax.load(stories_model)
    from_run, from_peft = read_adapter(run_dir, base), read_adapter(peft_dir, base)
    assert sorted(from_run.weights) == sorted(from_peft.weights) == ["w_down", "wk", "wo", "wq", "wv"]
    assert from_run.scale == from_peft.scale == 2.0 and from_run.rank == 4
    for weight, (a, b) in from_run.weights.items():
        np.testing.assert_array_equal(from_peft.weights[weight][0], a)
        np.testing.assert_array_equal(from_peft.weights[weight][1], b)
        assert np.abs(b).max() > 1e-3  # trained: a real delta
    # rsLoRA scales by alpha / sqrt(rank)
    rs_dir = tmp_path / "rslora"
    shutil.copytree(peft_dir, rs_dir)
    settings = json.loads((rs_dir / "adapter_config.json").read_text())
    (rs_dir / "adapter_config.json").write_text(json.dumps({**settings, "use_rslora": True}))
    assert read_adapter(rs_dir, base).scale == 8 / 2
    # served from the bank, a row with the run's adapter is the merged run (llama_jax.load of the run directory)
    banked, names = with_adapters(base, {"run": str(run_dir), "peft": str(peft_dir)})
    assert names == ("run", "peft") and not hasattr(base.model.layers.attention, "wq_bank_a")
    ids = jnp.asarray(np.array([[1, 403, 407, 261, 378, 270, 288, 45, 99, 310]] * 4, np.int32))
    merged, plain = forward(llama_jax.load(run_dir).model, ids), forward(base.model, ids)
    got = forward(banked.model, ids, np.array([0, 1, 2, 1], np.int32))
    np.testing.assert_allclose(got, np.stack([plain[0], merged[1], merged[2], merged[3]]), rtol=1e-5, atol=1e-5)
    assert np.abs(merged - plain).max() > 1e-2


@pytest.mark.slow
def test_an_adapter_that_does_not_fit_the_base_is_refused_in_one_line(lora_run, stories_model, tmp_path):
    run_dir, peft_dir = lora_run
    for path in (run_dir, peft_dir):  # other dimensions
        with pytest.raises(ValueError, match="does not fit the base model") as refused:
            read_adapter(path, CONFIG)
        assert str(path) in str(refused.value) and "\n" not in str(refused.value)
    # same dimensions, other weights: the run knows the base it was trained on
    stories = read_model_dir(stories_model).config
    other = create_model(stories, make_mesh(MeshConfig(), jax.devices()[:1]), seed=3)
    with pytest.raises(ValueError, match=f"{run_dir} holds adapters trained on {stories_model}, whose"):
        read_adapter(run_dir, LoadedModel(other, stories, make_mesh(MeshConfig(), jax.devices()[:1])))
    other_dir = write_model_dir(tmp_path / "other", stories, nnx.to_pure_dict(nnx.state(other)))
    with pytest.raises(ValueError, match=f"trained on {stories_model}, not on {other_dir}"):
        read_adapter(run_dir, stories, base_dir=other_dir)
    copy = shutil.copytree(stories_model, tmp_path / "copy")  # the same weights elsewhere: the same base
    assert read_adapter(run_dir, stories, base_dir=copy).rank == 4
    # PEFT options that compute something else are refused by name
    dora = tmp_path / "dora"
    shutil.copytree(peft_dir, dora)
    settings = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**settings, "use_dora": True}))
    with pytest.raises(ValueError, match=f"{dora} uses use_dora=True, which is not supported"):
        read_adapter(dora, stories)
