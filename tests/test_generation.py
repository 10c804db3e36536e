"""Generation against the model's own full forward pass (no cache, no padding, one prompt at a time): flash
prefill and incremental decoding, ragged prompts across buckets, stop ids, log-probabilities, per-prompt
random streams, sharding, and the text API with streaming."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import attention
from llama_jax.config import preset
from llama_jax.inference.api import generate, stream
from llama_jax.inference.compiled import bucket_length
from llama_jax.inference.engine import Engine
from llama_jax.inference.sampling import SamplingParams
from llama_jax.inference.settings import EngineSettings
from llama_jax.inference.types import Program, Request, make_request
from llama_jax.kv_cache import KVCache, write_layers
from llama_jax.loading import LoadedModel
from llama_jax.model import create_model
from llama_jax.sharding import MeshConfig, make_mesh, param_shardings
from llama_jax.tokenizers import load_tokenizer

CONFIG = preset("tiny").replace(vocab_size=512, max_seq_len=128)  # tok512's vocabulary, for the text tests
NEW = 8
PROMPT_LENGTHS = [1, 6, 11, 16, 3, 40]  # two prompt buckets (16, 64)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(), jax.devices()[:1])


@pytest.fixture(scope="module")
def model(mesh):
    return create_model(CONFIG, mesh, seed=0)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(3)
    return [tuple(rng.integers(3, CONFIG.vocab_size, n).tolist()) for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def forward(model):
    """Full-sequence logits (no cache) of one sequence, with the reference attention. It is padded at the end
    to one length so that a single compile serves every call: causal attention keeps the padding out."""
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids)[0][0])
    pad = CONFIG.max_seq_len
    return lambda ids: np.asarray(run(state, jnp.asarray([list(ids) + [0] * (pad - len(ids))], jnp.int32)))[: len(ids)]


@pytest.fixture(scope="module")
def reference_greedy(forward, prompts):
    """Each prompt's greedy continuation, recomputing the whole sequence for every token."""
    results = []
    for prompt in prompts:
        seq = list(prompt)
        for _ in range(NEW):
            seq.append(int(np.argmax(forward(seq)[-1])))
        results.append(seq[len(prompt) :])
    return results


def ids_only(model, mesh):
    """A loaded model without a tokenizer: no default stop ids, generation from token ids."""
    return LoadedModel(model, CONFIG, mesh)


def requests(prompts, **kw):
    return [Request(p, NEW, stream=i, **kw) for i, p in enumerate(prompts)]


def test_flash_prefill_and_incremental_decoding_give_the_full_forward_logits(model, forward, monkeypatch):
    """Ragged prompts right-padded in one bucket, prefilled through the blockwise flash attention (in blocks of
    8 of the 32 positions: several per prompt), then fed their true next tokens one at a time from the cache."""
    monkeypatch.setattr(attention, "_BLOCKWISE_TILE", CONFIG.n_heads * 8 * 8)
    graphdef, state = nnx.split(model)
    lengths, steps, bucket = [3, 21], 6, 32
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, CONFIG.vocab_size, n + steps).tolist() for n in lengths]
    padded = np.zeros((2, bucket), np.int32)
    for row, (seq, n) in enumerate(zip(seqs, lengths)):
        padded[row, :n] = seq[:n]
    last = jnp.asarray([[n - 1] for n in lengths])
    prefill = jax.jit(lambda state, ids: nnx.merge(graphdef, state).prefill(ids, logits_at=last))
    assert "while" in prefill.lower(state, jnp.asarray(padded)).as_text()  # the blockwise loops, not one block
    logits, (k, v) = prefill(state, jnp.asarray(padded))
    cache = KVCache.zeros(CONFIG, 2, 64)
    held = jnp.asarray(lengths, jnp.int32)
    kv, _ = write_layers(cache.kv, None, k, v, cache.page_table, held)
    cache = KVCache(kv, cache.page_table, held)
    step = jax.jit(lambda state, tokens, cache: nnx.merge(graphdef, state)(tokens[:, None], cache=cache))
    got = [np.asarray(logits[:, 0])]
    for t in range(steps - 1):  # each row gets its own next true token
        logits, cache = step(state, jnp.asarray([seq[n + t] for seq, n in zip(seqs, lengths)]), cache)
        got.append(np.asarray(logits[:, 0]))
    got = np.stack(got, axis=1)  # (rows, steps, vocab): positions n-1 .. n+steps-2
    for row, (seq, n) in enumerate(zip(seqs, lengths)):
        np.testing.assert_allclose(got[row], forward(seq)[n - 1 : n + steps - 1], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_config", [MeshConfig(data=2), MeshConfig(data=1, tensor=2)], ids=["data", "tensor"])
def test_flash_prefill_sharded_equals_one_device(model, mesh_config, monkeypatch):
    """The prefill's logits and keys and values with the batch over data, or the heads (2 KV heads) over tensor."""
    monkeypatch.setattr(attention, "_BLOCKWISE_TILE", CONFIG.n_heads * 8 * 8)  # several blocks per prompt
    ids = jnp.asarray(np.random.default_rng(1).integers(0, CONFIG.vocab_size, (2, 32)), jnp.int32)
    last = jnp.asarray([[4], [31]])

    def prefill(m):
        graphdef, state = nnx.split(m)
        return jax.jit(lambda state: nnx.merge(graphdef, state).prefill(ids, logits_at=last))(state)

    mesh = make_mesh(mesh_config)
    state = nnx.state(model)
    placed = nnx.merge(nnx.graphdef(model), jax.device_put(state, param_shardings(state, mesh)))
    with jax.set_mesh(mesh):
        sharded = prefill(placed)
    for got, expected in zip(jax.tree.leaves(sharded), jax.tree.leaves(prefill(model))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_engine_greedy_ids_equal_the_full_forward(model, mesh, prompts, reference_greedy):
    engine = Engine(ids_only(model, mesh), EngineSettings(max_num_seqs=4))
    results = engine.generate(requests(prompts))
    assert [r.token_ids for r in results] == reference_greedy
    assert all(r.finish_reason == "length" for r in results)
    assert set(engine.status().compiled) >= {Program("prefill", 4, 16), Program("prefill", 1, 64)}


@pytest.fixture(scope="module")
def shared_prefix_prompts():
    """Prompts longer than a 16-token chunk, three sharing their first 40 tokens (two whole chunks)."""
    rng = np.random.default_rng(8)
    prefix = rng.integers(3, CONFIG.vocab_size, 40).tolist()
    ends = [rng.integers(3, CONFIG.vocab_size, n).tolist() for n in (3, 17, 30)]
    return [tuple(prefix + end) for end in ends] + [tuple(rng.integers(3, CONFIG.vocab_size, 50).tolist())]


def test_chunked_prefill_and_the_prefix_cache_give_the_full_forward_ids(model, mesh, shared_prefix_prompts, forward):
    """Prompts of 43-70 tokens in chunks of 16, decoding in the other slot between chunks; the second round takes
    the shared chunks from the cache."""
    expected = []
    for prompt in shared_prefix_prompts:
        seq = list(prompt)
        for _ in range(NEW):
            seq.append(int(np.argmax(forward(seq)[-1])))
        expected.append(seq[len(prompt) :])
    engine = Engine(ids_only(model, mesh), EngineSettings(max_num_seqs=2, prefill_chunk=16, prefix_cache_tokens=128))
    for _ in range(2):
        assert [r.token_ids for r in engine.generate(requests(shared_prefix_prompts))] == expected
    status = engine.status()
    assert status.prefix_hit_tokens >= 2 * 3 * 32  # each shared prompt's two chunks, the second round
    assert {p.kind for p in status.compiled} >= {"extend"}


@pytest.mark.slow
def test_tokens_are_the_same_with_and_without_the_prefix_cache(model, mesh, shared_prefix_prompts):
    sampled = SamplingParams(0.9, 40, 0.95)
    asked = requests(shared_prefix_prompts) + requests(shared_prefix_prompts, sampling=sampled, seed=5)
    without = Engine(ids_only(model, mesh), EngineSettings(max_num_seqs=1, prefill_chunk=16, prefix_cache_tokens=0))
    cached = Engine(ids_only(model, mesh), EngineSettings(max_num_seqs=1, prefill_chunk=16, prefix_cache_tokens=128))
    assert without.settings.prefix_cache_chunks == 0 and cached.settings.prefix_cache_chunks == 8
    assert [r.token_ids for r in cached.generate(asked)] == [r.token_ids for r in without.generate(asked)]
    assert cached.status().prefix_hit_tokens > 0


def test_requests_stop_independently_on_their_stop_ids(model, mesh, prompts, reference_greedy):
    stop = reference_greedy[1][3]  # the 4th greedy token of prompt 1
    results = Engine(ids_only(model, mesh), EngineSettings(max_num_seqs=4)).generate(
        requests(prompts, stop_ids=(stop,))
    )
    for result, expected in zip(results, reference_greedy):
        if stop in expected:  # the stop id is not included
            assert (result.token_ids, result.finish_reason) == (expected[: expected.index(stop)], "stop")
        else:
            assert (result.token_ids, result.finish_reason) == (expected, "length")
    assert results[1].token_ids == reference_greedy[1][:3]


@pytest.mark.slow
def test_logprobs_are_the_full_forwards(model, mesh, prompts, forward):
    sampled = requests(prompts[:3], sampling=SamplingParams(0.9), seed=4, logprobs=True)
    for prompt, result in zip(prompts, Engine(ids_only(model, mesh), EngineSettings(max_num_seqs=2)).generate(sampled)):
        log_probs = np.asarray(jax.nn.log_softmax(forward(list(prompt) + result.token_ids)))
        expected = [log_probs[len(prompt) - 1 + i, t] for i, t in enumerate(result.token_ids)]
        np.testing.assert_allclose(result.logprobs, expected, rtol=1e-5, atol=1e-5)
    assert (
        Engine(ids_only(model, mesh), EngineSettings(max_num_seqs=2)).generate(requests(prompts[:1]))[0].logprobs == []
    )


def test_sampled_streams_follow_the_seed_and_stream_not_the_batch(model, mesh, prompts):
    engine = Engine(ids_only(model, mesh), EngineSettings(max_num_seqs=4))
    sampled = requests(prompts, sampling=SamplingParams(0.8, 40, 0.95), seed=1)
    batch = [r.token_ids for r in engine.generate(sampled)]
    assert [r.token_ids for r in engine.generate([sampled[2], sampled[0]])] == [batch[2], batch[0]]
    assert [r.token_ids for r in engine.generate(requests(prompts, sampling=sampled[0].sampling, seed=2))] != batch


@pytest.mark.slow
@pytest.mark.parametrize("mesh_config", [MeshConfig(data=2), MeshConfig(data=1, tensor=2)], ids=["data", "tensor"])
def test_sharded_generation_equals_single_device(model, prompts, reference_greedy, mesh_config):
    mesh = make_mesh(mesh_config)
    state = nnx.state(model)
    placed = nnx.merge(nnx.graphdef(model), jax.device_put(state, param_shardings(state, mesh)))
    results = Engine(ids_only(placed, mesh), EngineSettings(max_num_seqs=4)).generate(requests(prompts))
    assert [r.token_ids for r in results] == reference_greedy


@pytest.fixture(scope="module")
def text_model(model, mesh, assets):
    return LoadedModel(model, CONFIG, mesh, load_tokenizer(assets / "tok512.bin"), "llama2")


@pytest.mark.slow
def test_text_api_and_streaming_agree_with_the_engine(text_model):
    texts = ["Once upon a time", "", "Tom and Lily", "The sun"]
    completions = generate(text_model, texts, max_new_tokens=NEW, max_num_seqs=4)
    tokenizer = text_model.tokenizer
    engine_requests = [
        make_request(tokenizer.encode(t), NEW, tokenizer=tokenizer, stream=i) for i, t in enumerate(texts)
    ]
    direct = Engine(text_model, EngineSettings(max_num_seqs=2)).generate(engine_requests)
    assert [(c.token_ids, c.finish_reason, c.text) for c in completions] == [
        (d.token_ids, d.finish_reason, d.text) for d in direct
    ]
    for text, completion in zip(texts[:2], completions):
        events = list(stream(text_model, text, max_new_tokens=NEW))
        assert [i for e in events for i in e.token_ids] == completion.token_ids
        assert "".join(e.text for e in events) == completion.text
        assert events[-1].finish_reason == completion.finish_reason


def test_prompt_buckets_stay_few():
    assert [bucket_length(n, 2048) for n in (1, 16, 17, 100, 1024, 1025, 2047)] == [16, 16, 32, 128, 1024, 2048, 2048]
    assert [bucket_length(n, 384) for n in (200, 256, 257, 383)] == [256, 256, 384, 384]
    assert len({bucket_length(n, 2048) for n in range(1, 2048)}) == 8


def test_bad_requests_are_refused_with_a_clear_message(model, mesh, text_model):
    with pytest.raises(ValueError, match="the prompt has 125 tokens; with max_tokens 8 it needs 133"):
        Engine(ids_only(model, mesh), EngineSettings(max_num_seqs=1)).generate([Request((1,) * 125, 8)])
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        generate(text_model, ["x"], max_new_tokens=0)
    with pytest.raises(ValueError, match="max_num_seqs"):
        generate(text_model, ["x"], max_num_seqs=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(text_model, ["x"], stop_ids=(512,))
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        generate(text_model, ["x"], max_new_tokens=CONFIG.max_seq_len)
    with pytest.raises(ValueError, match="no chat template"):
        generate(LoadedModel(model, CONFIG, mesh, text_model.tokenizer), ["x"], chat=True, max_new_tokens=NEW)
    with pytest.raises(ValueError, match="top_p"):
        generate(text_model, ["x"], top_p=0)
    with pytest.raises(ValueError, match="prompt 1 has"):
        generate(text_model, ["story " * 200], max_new_tokens=8)


@pytest.mark.slow
def test_kv_heads_spread_over_a_wider_tensor_axis_give_the_same_tokens(tmp_path, prompts):
    """One KV head on a tensor axis of 2: `load` repeats it so that each device holds one head of the cache (as
    vLLM does) instead of all of it, and the logits and greedy tokens are those of the one-head model."""
    from llama_jax.loading import load
    from llama_jax.model_dir import write_model_dir

    config = CONFIG.replace(n_heads=4, n_kv_heads=1)
    one_device = make_mesh(MeshConfig(), jax.devices()[:1])
    write_model_dir(tmp_path / "mqa", config, nnx.to_pure_dict(nnx.state(create_model(config, one_device, seed=4))))
    alone = load(tmp_path / "mqa", mesh=one_device)
    spread = load(tmp_path / "mqa", mesh=make_mesh(MeshConfig(data=1, tensor=2)))
    assert (alone.config.n_kv_heads, spread.config.n_kv_heads) == (1, 2)
    assert spread.model.layers.attention.wk[...].sharding.spec[2] == "tensor"  # (layers, embed, kv_heads, ...)
    ids = jnp.asarray([prompts[2]], jnp.int32)
    np.testing.assert_allclose(alone.model(ids)[0], spread.model(ids)[0], rtol=1e-5, atol=1e-5)
    asked = requests(prompts)
    settings = EngineSettings(max_num_seqs=4)
    same = [r.token_ids for r in Engine(spread, settings).generate(asked)]
    assert same == [r.token_ids for r in Engine(alone, settings).generate(asked)]


@pytest.mark.slow
def test_a_pool_too_small_for_every_sequence_preempts_and_recomputes_the_same_tokens(model, mesh, prompts):
    """Six prompts of 1-40 tokens in four slots over a pool of six pages of 16: sequences take pages as they
    grow, the newest are preempted and prefilled again with the tokens they had, and every request's tokens —
    greedy and sampled — are those of a pool that never runs out."""
    sampled = SamplingParams(0.9, 40, 0.95)
    asked = requests(prompts) + requests(prompts, sampling=sampled, seed=6)
    sizes = dict(max_num_seqs=4, max_model_len=64, block_size=16, prefill_chunk=16, steps_per_dispatch=4)
    roomy = Engine(ids_only(model, mesh), EngineSettings(**sizes))
    tight = Engine(ids_only(model, mesh), EngineSettings(**sizes, kv_cache_tokens=96))
    expected = [r.token_ids for r in roomy.generate(asked)]
    assert [r.token_ids for r in tight.generate(asked)] == expected
    assert roomy.status().preemptions == 0 and tight.status().preemptions > 0
    # every sequence's pages back; the prefix cache keeps the 40-token prompt's two whole chunks
    assert tight.status().positions == 96 and tight.status().positions_used == 2 * 16


@pytest.mark.slow
@pytest.mark.parametrize("mesh_config", [None, MeshConfig(data=1, tensor=2)], ids=["one-device", "tensor"])
def test_the_tpu_kernel_layout_of_the_pool_gives_the_same_tokens(model, mesh, prompts, reference_greedy, mesh_config):
    """The pool laid out for the TPU's ragged paged attention kernel (what `attention="splash"` asks for on any
    host: off TPU, the kernel's reference runs in its place): the keys and values interleaved per page, each
    row's pages offset into the stacked pool, the heads split over tensor under `shard_map` — the full forward's
    greedy tokens, chunked prompts and a shared prefix included."""
    kernel_config = CONFIG.replace(attention="splash")
    if mesh_config is not None:
        mesh = make_mesh(mesh_config)
    state = nnx.state(model)
    placed = nnx.merge(nnx.graphdef(model), jax.device_put(state, param_shardings(state, mesh)))
    loaded = LoadedModel(placed, kernel_config, mesh)
    engine = Engine(loaded, EngineSettings(max_num_seqs=4, prefill_chunk=16, block_size=8))
    assert engine._backend.pool.kv.ndim == 5  # the layout under test
    assert [r.token_ids for r in engine.generate(requests(prompts))] == reference_greedy
