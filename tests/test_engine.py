"""The engine on a model: its greedy ids are those of the static-batch generator (itself checked against the
full forward pass), a request's tokens do not depend on the slots around it, sharded equals unsharded, and
the live-block cache attention equals attention over the whole cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax.attention import LiveCache, attend_live_cache, attention, causal_mask
from llama_jax.config import preset
from llama_jax.inference.engine import Engine
from llama_jax.inference.generator import Generator
from llama_jax.inference.sampling import SamplingParams
from llama_jax.inference.scheduler import Request
from llama_jax.inference.settings import GenerationSettings
from llama_jax.loading import LoadedModel
from llama_jax.model import create_model
from llama_jax.sharding import MeshConfig, make_mesh, param_shardings

CONFIG = preset("tiny").replace(vocab_size=512, max_seq_len=256)
LENGTHS = [1, 6, 11, 16, 3, 9, 40]


@pytest.fixture(scope="module")
def loaded():
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    return LoadedModel(create_model(CONFIG, mesh, seed=2), CONFIG, mesh)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(5)
    return [tuple(rng.integers(3, CONFIG.vocab_size, n).tolist()) for n in LENGTHS]


def requests(prompts, **kw):
    return [Request(p, 6 + 3 * i, stream=i, **kw) for i, p in enumerate(prompts)]


def ids(results):
    return [r.token_ids for r in results]


def test_greedy_ids_equal_the_static_generator(loaded, prompts):
    generator = Generator(loaded, GenerationSettings(max_new_tokens=24, batch_size=8))
    static = [ids for ids, _ in generator.generate_ids(list(prompts), range(len(prompts)))]
    engine = ids(Engine(loaded, slots=4).generate(requests(prompts)))
    assert engine == [s[: 6 + 3 * i] for i, s in enumerate(static)]


def test_a_requests_tokens_depend_on_nothing_else(loaded, prompts):
    sampled = requests(prompts, sampling=SamplingParams(0.9, 40, 0.95), seed=7)
    engine = Engine(loaded, slots=4)
    crowded = ids(engine.generate(sampled))
    alone = Engine(loaded, slots=1)
    assert crowded[:2] == [ids(alone.generate([r]))[0] for r in sampled[:2]]
    assert crowded == ids(engine.generate(sampled[::-1]))[::-1]  # other neighbours, other arrival order
    assert crowded != ids(engine.generate(requests(prompts, sampling=SamplingParams(0.9, 40, 0.95), seed=8)))


def test_streaming_events_add_up_to_the_result(loaded, prompts):
    engine = Engine(loaded, slots=4)
    request = requests(prompts)[4]
    events = list(engine.stream(request))
    result = engine.generate([request])[0]
    assert [t for e in events for t in e.token_ids] == result.token_ids
    assert events[-1].finish_reason == result.finish_reason == "length"


@pytest.mark.parametrize("mesh_config", [MeshConfig(data=2), MeshConfig(data=1, tensor=2)], ids=["data", "tensor"])
def test_sharded_engine_equals_one_device(loaded, prompts, mesh_config):
    mesh = make_mesh(mesh_config)
    state = nnx.state(loaded.model)
    placed = nnx.merge(nnx.graphdef(loaded.model), jax.device_put(state, param_shardings(state, mesh)))
    sharded = Engine(LoadedModel(placed, CONFIG, mesh), slots=4).generate(requests(prompts))
    assert ids(sharded) == ids(Engine(loaded, slots=4).generate(requests(prompts)))


def test_live_block_attention_equals_attention_over_the_whole_cache():
    rng = np.random.default_rng(0)
    layers, batch, kv_heads, max_len, head_dim, heads, block = 2, 3, 2, 64, 8, 6, 16
    k_all = jnp.asarray(rng.normal(size=(layers, batch, kv_heads, max_len, head_dim)), jnp.float32)
    v_all = jnp.asarray(rng.normal(size=(layers, batch, kv_heads, max_len, head_dim)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(batch, 2, heads, head_dim)), jnp.float32)
    q_index = jnp.asarray([[3, 4], [20, 21], [40, 41]])
    live = attend_live_cache(q, k_all, v_all, jnp.int32(1), LiveCache(q_index, block))
    kv_index = jnp.broadcast_to(jnp.arange(max_len), (batch, max_len))
    full = attention(q, k_all[1], v_all[1], "xla", mask=causal_mask(q_index, kv_index))
    np.testing.assert_allclose(live, full, rtol=1e-5, atol=1e-6)
    # a row's result does not change when another row reaches further (more blocks are read)
    further = attend_live_cache(q, k_all, v_all, jnp.int32(1), LiveCache(q_index.at[2].set([62, 63]), block))
    np.testing.assert_array_equal(live[:2], further[:2])
