"""The jitted train step: sharded layouts compute what one device computes, gradient accumulation equals the
big batch, the loss is masked float32 cross-entropy (+ z-loss) by an independent formula, and packed
documents never see each other."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llama_jax.config import preset
from llama_jax.model import abstract_state, create_model
from llama_jax.sharding import MeshConfig, make_mesh
from llama_jax.train.batching import batch_sharding
from llama_jax.train.config import TrainConfig
from llama_jax.train.objectives import NextTokenLoss
from llama_jax.train.optimizer import decay_mask, learning_rate, make_optimizer
from llama_jax.train.state import init_state, state_layout
from llama_jax.train.step import make_train_step, token_losses

# dim 48, 6 query / 2 KV heads, ffn 80, vocab 98: every axis splits in two, none equals another
MODEL = preset("tiny").replace(vocab_size=98)
CONFIG = TrainConfig(steps=10, warmup=1, lr=1e-2, batch_size=4, seq_len=16)
BATCH, SEQ = CONFIG.batch_size, CONFIG.seq_len


def packed_batch(seed: int) -> dict[str, np.ndarray]:
    """(BATCH, SEQ) rows of two documents each, positions restarting, a few padded targets per row."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, MODEL.vocab_size, (BATCH, SEQ + 1))
    split = rng.integers(3, SEQ - 3, BATCH)[:, None]
    index = np.arange(SEQ)
    segments = np.where(index < split, 1, 2)
    positions = np.where(index < split, index, index - split)
    mask = (index != split - 1) & (index < SEQ - rng.integers(0, 4, BATCH)[:, None])
    return {
        "inputs": inputs[:, :-1].astype(np.int32),
        "targets": inputs[:, 1:].astype(np.int32),
        "positions": positions.astype(np.int32),
        "segments": segments.astype(np.int32),
        "loss_mask": mask.astype(np.float32),
    }


BATCHES = [packed_batch(seed) for seed in range(2)]


@pytest.fixture(scope="module")
def initial_params():
    model = create_model(MODEL, make_mesh(MeshConfig(data=1), jax.devices()[:1]), seed=0)
    return jax.device_get(nnx.to_pure_dict(nnx.state(model)))


def run_steps(
    initial_params,
    mesh_config: MeshConfig,
    grad_accum: int = 1,
    optimizer=None,
    z_loss: float = 0.0,
    devices=None,
    batches=tuple(BATCHES),
):
    """Train from the same initial parameters on `mesh_config` over `batches`; (metrics per step, state)."""
    mesh = make_mesh(mesh_config, devices)
    optimizer = optimizer or make_optimizer(CONFIG)
    layout = state_layout(MODEL, optimizer, mesh)
    state = init_state(jax.device_put(initial_params, layout.shardings.params), optimizer, layout.shardings)
    shape = (grad_accum, BATCH // grad_accum, SEQ)
    step = make_train_step(layout, optimizer, mesh, shape, NextTokenLoss(z_loss), learning_rate(CONFIG))
    losses = []
    with jax.set_mesh(mesh):
        for batch in batches:
            placed = {k: jax.device_put(v.reshape(shape), batch_sharding(mesh, shape)) for k, v in batch.items()}
            state, metrics = step(state, placed)
            losses.append(jax.device_get(metrics))
    return losses, state


@pytest.fixture(scope="module")
def single_device(initial_params):
    return run_steps(initial_params, MeshConfig(data=1), devices=jax.devices()[:1])


def _assert_same_training(a, b):
    for metrics_a, metrics_b in zip(a[0], b[0]):
        for name in ("loss", "grad_norm", "z_loss", "tokens"):
            np.testing.assert_allclose(metrics_a[name], metrics_b[name], rtol=2e-5, err_msg=name)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5), a[1].params, b[1].params
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout, sharded_axis", [("data=2", None), ("fsdp=2,data=1", "fsdp"), ("tensor=2,data=1", "tensor")]
)
def test_sharded_step_matches_single_device(initial_params, single_device, layout, sharded_axis):
    sharded = run_steps(initial_params, MeshConfig.parse(layout))
    _assert_same_training(sharded, single_device)
    w_gate = sharded[1].params["layers"]["mlp"]["w_gate"]
    mu = sharded[1].opt_state[1][0].mu["layers"]["mlp"]["w_gate"]
    assert mu.sharding == w_gate.sharding  # optimizer moments live with their parameters
    if sharded_axis is not None:  # the layout really splits the weights (and the step still agrees)
        assert sharded_axis in jax.tree.leaves(tuple(w_gate.sharding.spec))
        assert w_gate.addressable_shards[0].data.shape != w_gate.shape


@pytest.mark.parametrize("mesh_config", ["data=1", "data=2"])
def test_gradient_accumulation_equals_the_big_batch(initial_params, single_device, mesh_config):
    """The micro-batches hold different numbers of target tokens: each is weighted by the whole batch's count.
    With a data axis each group sums its own micro-batches' gradients and the groups' sums are added once
    (`step._reduced_once_over_data`): still the big batch's."""
    devices = jax.devices()[:1] if mesh_config == "data=1" else None
    accumulated = run_steps(initial_params, MeshConfig.parse(mesh_config), grad_accum=2, devices=devices)
    _assert_same_training(accumulated, single_device)


def _reference_loss(params, batch, z_loss):
    """Masked mean next-token cross-entropy (+ z_loss · mean log²Z), written out independently."""
    model = nnx.merge(abstract_state(MODEL)[0], params)
    logits, _ = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segments"])
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    picked = jnp.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
    log_z = jnp.log(jnp.sum(jnp.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    mask = batch["loss_mask"]
    nll = jnp.sum(-picked * mask)
    return (nll + z_loss * jnp.sum(log_z**2 * mask)) / jnp.sum(mask), nll / jnp.sum(mask)


@pytest.mark.slow
def test_loss_and_gradient_are_masked_cross_entropy_plus_z_loss(initial_params):
    z_loss = 0.1
    sgd = optax.sgd(1.0)  # parameters after one step = parameters - gradient
    ([first], state) = run_steps(
        initial_params, MeshConfig(data=1), optimizer=sgd, z_loss=z_loss, devices=jax.devices()[:1], batches=BATCHES[:1]
    )
    batch = {k: jnp.asarray(v) for k, v in BATCHES[0].items()}
    (total, cross_entropy), grads = jax.value_and_grad(_reference_loss, has_aux=True)(initial_params, batch, z_loss)
    np.testing.assert_allclose(first["loss"], cross_entropy, rtol=1e-5)
    np.testing.assert_allclose(first["loss"] + z_loss * first["z_loss"], total, rtol=1e-5)
    assert first["tokens"] == BATCHES[0]["loss_mask"].sum()
    assert abs(float(cross_entropy) - np.log(MODEL.vocab_size)) < 0.1  # a fresh model is near uniform
    expected = jax.tree.map(lambda p, g: p - g, initial_params, grads)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6), state.params, expected
    )
    assert int(state.step) == 1


@pytest.mark.slow
def test_chunked_loss_gives_the_full_logits_loss_and_gradients(initial_params):
    """6-position chunks over 16 positions: two full chunks and a padded third, values and gradients as the
    loss over the whole (batch, seq, vocab) logits."""
    graphdef = abstract_state(MODEL)[0]
    batch = {k: jnp.asarray(v) for k, v in BATCHES[1].items()}

    def chunked(params):
        nll, log_z = token_losses(graphdef, params, batch, loss_chunk=6)
        mask = batch["loss_mask"]
        return (jnp.sum(nll * mask) + 0.1 * jnp.sum(log_z**2 * mask)) / jnp.sum(mask)

    value, grads = jax.jit(jax.value_and_grad(chunked))(initial_params)
    (expected, _), expected_grads = jax.value_and_grad(_reference_loss, has_aux=True)(initial_params, batch, 0.1)
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7),
        grads,
        expected_grads,
    )


def test_packed_documents_never_attend_across(initial_params):
    graphdef = abstract_state(MODEL)[0]
    losses = jax.jit(lambda p, b: token_losses(graphdef, p, b)[0])
    rng = np.random.default_rng(0)
    first, second = rng.integers(3, MODEL.vocab_size, 7), rng.integers(3, MODEL.vocab_size, 9)

    def row(doc_a, doc_b):
        tokens = np.concatenate([doc_a, doc_b])
        targets = np.append(tokens[1:], 0)
        return {
            "inputs": tokens[None].astype(np.int32),
            "targets": targets[None].astype(np.int32),
            "positions": np.concatenate([np.arange(7), np.arange(9)])[None].astype(np.int32),
            "segments": np.repeat([1, 2], [7, 9])[None].astype(np.int32),
        }

    packed = np.asarray(losses(initial_params, row(first, second)))[0]
    changed_first = np.asarray(losses(initial_params, row(first[::-1].copy(), second)))[0]
    np.testing.assert_array_equal(packed[7:], changed_first[7:])  # document 2 never saw document 1
    assert not np.allclose(packed[:6], changed_first[:6])
    alone = {
        "inputs": second[None, :-1].astype(np.int32),
        "targets": second[None, 1:].astype(np.int32),
        "positions": np.arange(8)[None].astype(np.int32),
        "segments": np.ones((1, 8), np.int32),
    }
    np.testing.assert_allclose(packed[7:15], np.asarray(losses(initial_params, alone))[0], rtol=1e-5)


def test_weight_decay_skips_norm_gains_only(initial_params):
    mask = decay_mask(initial_params)
    assert mask["embed"] and mask["lm_head"] and mask["layers"]["attention"]["wq"] and mask["layers"]["mlp"]["w_down"]
    assert not mask["norm"]["scale"] and not mask["layers"]["attention_norm"]["scale"]
    assert not mask["layers"]["mlp_norm"]["scale"]
    schedule = learning_rate(TrainConfig(steps=100, warmup=10, lr=1.0))
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(100)], [0, 0.5, 1, 0.1], atol=1e-6)
