"""Context parallelism: a training sequence split over the mesh's `context` axis trains exactly as the unsplit
one — the same loss and gradients (float32, 1e-5) through XLA's attention and the splash kernel, alone and with
a data axis, and through train.py's own command line on four chips — and the load-balanced order gives every
chip the same attention work."""

import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from module_runner import assert_one_error_line, run_module

from llama_jax.attention import _BalancedCausalMask
from llama_jax.config import preset
from llama_jax.context_parallel import balanced_order, check_sequence_splits
from llama_jax.model import create_model
from llama_jax.sharding import MeshConfig, make_mesh
from llama_jax.train.batching import batch_sharding
from llama_jax.train.objectives import NextTokenLoss
from llama_jax.train.state import init_state, state_layout
from llama_jax.train.step import make_train_step

MODEL = preset("tiny").replace(vocab_size=98)  # 6 query / 2 KV heads


@pytest.mark.parametrize("shards", [2, 4, 8])
def test_every_chip_attends_the_same_number_of_query_key_pairs(shards):
    length = 256
    order = balanced_order(length, shards)
    assert sorted(order) == list(range(length))
    visible_keys = order + 1  # under a causal mask, token t sees t + 1 keys
    work = visible_keys.reshape(shards, -1).sum(axis=1)
    assert (work == work[0]).all(), work
    contiguous = (np.arange(length) + 1).reshape(shards, -1).sum(axis=1)
    assert contiguous[-1] / contiguous[0] == pytest.approx(2 * shards - 1, rel=0.1)  # what the balanced order avoids


@pytest.mark.parametrize("shards", [2, 4])
def test_the_kernels_mask_is_the_causal_mask_of_the_sequence_put_back_in_order(shards):
    length = 32
    mask = _BalancedCausalMask(length, shards)[0:length, 0:length]
    back = np.argsort(balanced_order(length, shards))
    np.testing.assert_array_equal(mask[np.ix_(back, back)], np.tril(np.ones((length, length), bool)))


def test_sequences_must_divide_into_the_chunks():
    check_sequence_splits(64, 4)
    with pytest.raises(ValueError, match="multiple of 2 × mesh.context"):
        check_sequence_splits(60, 4)


def _train(layout: str, attention: str, seq_len: int, loss_chunk: int = 0):
    """Two SGD steps (lr 1: the parameters move by the gradient) of packed rows; the step's metrics and the
    parameters after. `loss_chunk`: positions per chunk of the loss (0: all at once)."""
    model = MODEL.replace(attention=attention, max_seq_len=seq_len)
    config = MeshConfig.parse(layout)
    n_devices = config.data * config.fsdp * config.context * config.tensor
    mesh = make_mesh(config, jax.devices()[:n_devices])
    params = create_model(model, make_mesh(MeshConfig(data=1), jax.devices()[:1]), seed=0)
    initial = jax.device_get(nnx.to_pure_dict(nnx.state(params)))
    sgd = optax.sgd(1.0)
    layout_ = state_layout(model, sgd, mesh)
    state = init_state(jax.device_put(initial, layout_.shardings.params), sgd, layout_.shardings)
    shape = (1, 2, seq_len)
    step = make_train_step(layout_, sgd, mesh, shape, NextTokenLoss(1e-4), loss_chunk=loss_chunk)
    rng = np.random.default_rng(0)
    metrics = []
    with jax.set_mesh(mesh):
        for _ in range(2):
            batch = _packed_rows(rng, 2, seq_len, model.vocab_size)
            placed = {k: jax.device_put(v.reshape(shape), batch_sharding(mesh, shape)) for k, v in batch.items()}
            state, m = step(state, placed)
            metrics.append({k: float(v) for k, v in m.items()})
    return metrics, jax.device_get(state.params)


def _packed_rows(rng, rows: int, seq_len: int, vocab: int) -> dict[str, np.ndarray]:
    """Rows of three documents each (positions restarting), some targets masked."""
    index = np.arange(seq_len)
    cuts = np.sort(rng.choice(np.arange(8, seq_len - 8), (rows, 2), replace=False), axis=1)
    segments = 1 + (index >= cuts[:, :1]) + (index >= cuts[:, 1:])
    starts = np.where(segments == 1, 0, np.where(segments == 2, cuts[:, :1], cuts[:, 1:]))
    tokens = rng.integers(0, vocab, (rows, seq_len + 1))
    return {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "positions": (index - starts).astype(np.int32),
        "segments": segments.astype(np.int32),
        "loss_mask": (rng.random((rows, seq_len)) > 0.1).astype(np.float32),
    }


def _assert_same(split, whole):
    for a, b in zip(split[0], whole[0]):
        for name in ("loss", "z_loss", "grad_norm", "tokens"):
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, err_msg=name)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), split[1], whole[1])


@pytest.fixture(scope="module")
def unsplit():
    return {"xla": _train("data=1", "xla", 64), "splash": _train("data=1", "splash", 512)}


@pytest.mark.parametrize(
    "layout, attention, seq_len, loss_chunk",
    [
        ("data=1,context=2", "xla", 64, 0),
        ("data=1,context=2", "xla", 64, 16),  # the loss scans 16 positions of each chip's share at a time
        ("data=1,context=2", "xla", 64, 24),  # ... padded to 2 steps of 2 × 24
        ("data=1,context=2", "splash", 512, 0),
    ],
)
def test_a_split_sequence_trains_as_the_whole_one(unsplit, layout, attention, seq_len, loss_chunk):
    """XLA's attention gathers K/V through the partitioner; splash runs per chip on its share of the queries
    (Pallas interpret mode off TPU) with its rows of the load-balanced mask."""
    _assert_same(_train(layout, attention, seq_len, loss_chunk), unsplit[attention])


@pytest.mark.slow
def test_train_py_on_four_chips_of_context_gives_the_one_chip_losses(tmp_path):
    """The user's path: the tiny recipe with mesh.context=4 (and with data=2 × context=2, the data groups'
    gradients summed once: `step._reduced_once_over_data`) logs the losses and gradient norms of mesh.context=1,
    and prints its samples at the end (the engine on the same chips, context folded into fsdp)."""
    runs, samples = {}, {}
    for name, chips, mesh in [("whole", 1, []), ("context", 4, ["mesh.data=1", "mesh.context=4"]),
                              ("both", 4, ["mesh.data=2", "mesh.context=2"])]:  # fmt: skip
        run_dir = tmp_path / name
        args = ["--config", "configs/tiny_test.yaml", "steps=3", "eval_every=3", "checkpoint_every=3", "log_every=1"]
        args += ["samples=1", "sample_tokens=8", "seq_len=64", "batch_size=4", "grad_accum=2", f"run_dir={run_dir}"]
        args += mesh
        result = run_module("train", *args, env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={chips}"})
        assert result.returncode == 0, result.stderr[-3000:]
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        runs[name] = [r for r in map(json.loads, lines) if r["split"] == "train"]
        samples[name] = result.stdout.strip().splitlines()[:-1]  # "--- sample 1: '' ---" and its text
    assert len(runs["whole"]) == 3
    for name in ("context", "both"):
        for a, b in zip(runs[name], runs["whole"]):
            for key in ("loss", "grad_norm"):
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=f"{name} {key}")
        assert samples[name][0].startswith("--- sample 1"), samples  # sampled: the engine ran on the folded mesh


def test_generating_refuses_a_context_axis(tmp_path):
    """The engine keeps a sequence on one chip: a mesh that splits sequences is one error line, before loading."""
    result = run_module("infer", "--checkpoint", tmp_path / "absent", "--prompt", "Hi", "--mesh", "context=2")
    assert_one_error_line(result, "--mesh context=N splits training sequences")


def test_grpo_refuses_a_context_axis():
    from llama_jax.train.batching import check_batch_fits_mesh
    from llama_jax.train.config import load_train_config

    config = load_train_config(
        None,
        [
            "objective=grpo",
            "init_from=base",
            "batch_size=4",
            "grpo.num_generations=2",
            "seq_len=64",
            "grpo.max_completion_length=16",
            "reward=exact_match:answer",
        ],
    )
    mesh = make_mesh(MeshConfig(data=1, context=2))
    with pytest.raises(ValueError, match="GRPO's rollouts run the inference engine"):
        check_batch_fits_mesh(config, mesh)


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_the_step_puts_fields_in_the_balanced_order_and_back(shards):
    from llama_jax.context_parallel import from_balanced, to_balanced

    tokens = np.arange(3 * 64).reshape(3, 64)
    balanced = np.asarray(to_balanced({"inputs": jax.numpy.asarray(tokens)}, shards)["inputs"])
    np.testing.assert_array_equal(balanced, tokens[:, balanced_order(64, shards)])
    np.testing.assert_array_equal(np.asarray(from_balanced(jax.numpy.asarray(balanced), shards)), tokens)
