"""The network itself: sharded == unsharded, scan == loop, remat, bf16, packing, cache, attention paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax.attention import attention
from llama_jax.config import RopeScaling, preset
from llama_jax.kv_cache import KVCache
from llama_jax.model import create_model
from llama_jax.rope import inverse_frequencies
from llama_jax.sharding import MeshConfig, logical_to_spec, make_mesh, param_shardings

CONFIG = preset("tiny")  # odd sizes: 6 query heads over 2 KV heads, vocab 97
BATCH, LENGTH = 2, 12


@pytest.fixture(scope="module")
def model():
    return create_model(CONFIG, make_mesh(MeshConfig(), jax.devices()[:1]), seed=0)


@pytest.fixture(scope="module")
def ids():
    return jax.random.randint(jax.random.key(7), (BATCH, LENGTH), 0, CONFIG.vocab_size)


def forward(model, ids, mesh=None, **kwargs):
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids, **kwargs)[0])
    if mesh is None:
        return np.asarray(run(state, ids))
    with jax.set_mesh(mesh):
        return np.asarray(run(state, ids))


def reconfigured(model, **changes):
    """The same parameters under a config that computes differently (scan, remat, dtype)."""
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    graphdef, state = nnx.split(create_model(model.config.replace(**changes), mesh))
    return nnx.merge(graphdef, nnx.state(model))


def placed(model, mesh):
    """The same parameters, laid out on `mesh` by the rules table."""
    state = nnx.state(model)
    return nnx.merge(nnx.graphdef(model), jax.device_put(state, param_shardings(state, mesh)))


def relative_error(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize(
    "mesh_config",
    [MeshConfig(data=2), MeshConfig(data=1, fsdp=2), MeshConfig(data=1, tensor=2)],
    ids=["data", "fsdp", "tensor"],
)
def test_sharded_forward_equals_unsharded(model, ids, mesh_config):
    mesh = make_mesh(mesh_config)
    sharded = placed(model, mesh)
    specs = {str(v.sharding.spec) for v in jax.tree.leaves(nnx.state(sharded))}
    if mesh_config.data == 1:  # the layout really splits weights, so the test compares something
        assert any("fsdp" in s or "tensor" in s for s in specs), specs
    np.testing.assert_allclose(forward(sharded, ids, mesh), forward(model, ids), rtol=1e-5, atol=1e-5)


def test_activation_constraints_follow_the_rules():
    mesh = make_mesh(MeshConfig(data=1, tensor=2))
    spec = logical_to_spec(("batch", "length", "q_heads", None), (2, 4, 6, 8), mesh)
    assert spec == jax.P(None, None, "tensor", None)
    # an axis that does not divide its dimension is replicated instead of failing
    assert logical_to_spec(("vocab", "embed"), (97, 48), mesh) == jax.P(None, None)
    with pytest.raises(ValueError, match="both map to mesh axis 'tensor'"):
        logical_to_spec(("q_heads", "mlp"), (6, 8), mesh)


def test_scan_equals_loop(model, ids):
    looped = reconfigured(model, scan_layers=False)
    np.testing.assert_allclose(forward(looped, ids), forward(model, ids), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "save_dots"])
def test_remat_leaves_values_and_gradients_unchanged(model, ids, policy):
    def loss_and_grads(m):
        graphdef, state = nnx.split(m)

        def loss(state):
            logits = nnx.merge(graphdef, state)(ids)[0]
            return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])

        return jax.jit(jax.value_and_grad(loss))(state)

    base_loss, base_grads = loss_and_grads(model)
    remat_loss, remat_grads = loss_and_grads(reconfigured(model, remat=policy))
    assert float(remat_loss) == pytest.approx(float(base_loss), rel=1e-6)
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(base_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


BF16_TOLERANCE = 2e-2  # max |logit difference| relative to the largest logit, for bf16 compute


def test_bf16_compute_stays_close_to_float32(model, ids):
    bf16 = reconfigured(model, dtype="bfloat16")
    assert relative_error(forward(bf16, ids), forward(model, ids)) < BF16_TOLERANCE


def test_packed_documents_do_not_attend_across_segments(model):
    first = jax.random.randint(jax.random.key(1), (1, 5), 0, CONFIG.vocab_size)
    second = jax.random.randint(jax.random.key(2), (1, 7), 0, CONFIG.vocab_size)
    packed = jnp.concatenate([first, second], axis=1)
    segments = jnp.array([[1] * 5 + [2] * 7])
    positions = jnp.array([list(range(5)) + list(range(7))])
    packed_logits = forward(model, packed, positions=positions, segment_ids=segments)
    np.testing.assert_allclose(packed_logits[:, 5:], forward(model, second), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed_logits[:, :5], forward(model, first), rtol=1e-5, atol=1e-5)
    # and the mask matters: without segment ids the second document sees the first
    assert not np.allclose(forward(model, packed)[:, 5:], packed_logits[:, 5:], atol=1e-3)


def test_cached_chunks_equal_the_full_forward(model, ids):
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, chunk, cache):
        return nnx.merge(graphdef, state)(chunk, cache=cache)

    cache = KVCache.zeros(CONFIG, BATCH, 16)
    pieces = []
    for start, end in [(0, 5), (5, 6), (6, 12)]:
        logits, cache = step(state, ids[:, start:end], cache)
        pieces.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(pieces, 1), forward(model, ids), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [LENGTH, LENGTH])


@pytest.mark.slow
def test_library_attention_path_equals_reference():
    """The cudnn path's plumbing (layout, grouped KV heads, segment masks) through
    jax.nn.dot_product_attention, run with its XLA kernel on CPU; on a GPU the same call runs cuDNN."""
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (2, 9, 6, 8))
    k = jax.random.normal(keys[1], (2, 9, 2, 8))
    v = jax.random.normal(keys[2], (2, 9, 2, 8))
    for segments in (None, jnp.array([[1] * 4 + [2] * 5, [1] * 9])):
        np.testing.assert_allclose(
            attention(q, k, v, "cudnn", segment_ids=segments),
            attention(q, k, v, "xla", segment_ids=segments),
            rtol=1e-5,
            atol=1e-5,
        )


@pytest.mark.slow
def test_splash_attention_matches_reference_with_gradients(model):
    """The TPU kernel in Pallas interpret mode, under shard_map with heads split over a 2-device tensor
    mesh, with packed segments."""
    mesh = make_mesh(MeshConfig(data=1, tensor=2))
    ids = jax.random.randint(jax.random.key(4), (BATCH, 128), 0, CONFIG.vocab_size)  # the kernel's smallest tile
    segments = jnp.array([[1] * 50 + [2] * 78, [1] * 128])

    def loss_and_grads(m):
        graphdef, state = nnx.split(m)

        def loss(state):
            return jnp.mean(nnx.merge(graphdef, state)(ids, segment_ids=segments)[0] ** 2)

        with jax.set_mesh(mesh):
            return jax.jit(jax.value_and_grad(loss))(state)

    splash_loss, splash_grads = loss_and_grads(placed(reconfigured(model, attention="splash"), mesh))
    xla_loss, xla_grads = loss_and_grads(placed(reconfigured(model, attention="xla"), mesh))
    assert float(splash_loss) == pytest.approx(float(xla_loss), rel=1e-5)
    for a, b in zip(jax.tree.leaves(splash_grads), jax.tree.leaves(xla_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_llama31_rope_scaling_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = transformers.LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    ours = inverse_frequencies(128, 500000.0, RopeScaling(8.0, 1.0, 4.0, 8192))
    np.testing.assert_allclose(ours, hf_inv_freq.numpy(), rtol=1e-6)
    assert not np.allclose(ours, inverse_frequencies(128, 500000.0))  # scaling changes something
