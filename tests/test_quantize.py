"""int8 weights for inference (`load(..., quantize="int8")`, `infer.py --quantize int8`): half of bf16's bytes,
logits within a stated bound of float32, and the real stories260K model's perplexity barely moved."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama_jax
from llama_jax.quantize import quantize_weight

IDS = jnp.asarray([[1, 403, 407, 261, 378, 270, 288, 45, 99, 310, 12, 77]], jnp.int32)


def test_per_channel_int8_round_trips_within_half_a_step():
    w = jax.random.normal(jax.random.key(0), (3, 64, 4, 8)) * jnp.arange(1, 33).reshape(4, 8)  # (layers, in, h, k)
    q, scale = quantize_weight(w, (1,))
    assert q.dtype == jnp.int8 and scale.shape == (3, 4, 8)
    assert float(jnp.max(jnp.abs(q.astype(jnp.float32) * scale[:, None] - w) / scale[:, None])) <= 0.5 + 1e-6


@pytest.mark.slow
def test_int8_model_logits_bytes_and_perplexity(stories_model, assets):
    full = llama_jax.load(stories_model)
    quantized = llama_jax.load(stories_model, quantize="int8")
    a, b = np.asarray(full.model(IDS)[0]), np.asarray(quantized.model(IDS)[0])
    assert np.abs(a - b).max() / np.abs(a).max() < 0.03  # measured 0.017 on this model
    # The projection matrices hold 1 byte per parameter (bf16: 2); scales add one float per output channel.
    state = nnx.to_flat_state(nnx.state(quantized.model))
    projections = {k: v.get_value() for k, v in state if k[-1] in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")}
    assert all(v.dtype == jnp.int8 for v in projections.values())
    matrix_bytes = sum(v.size for v in projections.values())
    scale_bytes = sum(v.get_value().size * 4 for k, v in state if str(k[-1]).endswith("_scale"))
    assert (matrix_bytes + scale_bytes) / (2 * matrix_bytes) < 0.6
    text = (assets / "tinystories_sample.txt").read_text().replace("<|endoftext|>", "")
    ids = full.tokenizer.encode(text, bos=True)
    from llama_jax.evaluate.perplexity import perplexity

    p_full = perplexity(full, ids, 256, 1)["perplexity"]
    p_int8 = perplexity(quantized, ids, 256, 1)["perplexity"]
    assert abs(p_int8 / p_full - 1) < 0.02, (p_full, p_int8)
    greedy = [
        llama_jax.generate(m, ["Once upon a time"], max_new_tokens=30, temperature=0)[0].text for m in (full, quantized)
    ]
    assert greedy[0] == greedy[1]


def test_an_int8_kv_cache_is_within_half_a_step_and_keeps_stories260k_greedy_story(stories_model):
    """int8 keys and values with a scale per position and head: each value within half a quantization step;
    the real stories260K model's greedy story through an int8 cache is its float32 cache's for its first 64
    tokens (run.c's; they part at token 75: 8-wide heads quantize coarsely)."""
    from llama_jax.inference.engine import Engine
    from llama_jax.inference.settings import EngineSettings
    from llama_jax.inference.types import Request
    from llama_jax.kv_cache import quantize

    x = jax.random.normal(jax.random.key(0), (3, 5, 4, 16)) * jnp.asarray([0.01, 1.0, 30.0, 0.0])[:, None]
    values, scale = quantize(x)
    assert values.dtype == jnp.int8 and scale.shape == (3, 5, 4)
    assert np.all(np.abs(np.asarray(values * scale[..., None] - x)) <= np.asarray(scale)[..., None] / 2 + 1e-7)
    loaded = llama_jax.load(stories_model)
    story = {}
    for dtype in ("auto", "int8"):
        engine = Engine(loaded, EngineSettings(max_num_seqs=1, kv_cache_dtype=dtype))
        story[dtype] = engine.generate([Request((1,), 64, stop_ids=())])[0].token_ids
    assert story["int8"] == story["auto"]
