"""The engine's mechanics on a model: a request's tokens do not depend on the slots around it, streams add up
to results, the device loop stops early only when asked, the attention paths equal the reference, every
program it runs is compiled by its warm-up, and `--compile-for` lowers exactly those programs."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.attention import LONG_ROWS, LiveCache, attend_live_cache, attention, blockwise_attention
from llama_jax.config import preset
from llama_jax.inference.backend import Admitting
from llama_jax.inference.compiled import EnginePrograms
from llama_jax.inference.engine import Engine
from llama_jax.inference.pages import PagePool
from llama_jax.inference.sampling import SamplingParams
from llama_jax.inference.settings import EngineSettings
from llama_jax.inference.slots import SlotBackend
from llama_jax.inference.types import Program, Request, make_request
from llama_jax.loading import LoadedModel
from llama_jax.model import create_model
from llama_jax.sharding import MeshConfig, make_mesh

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


def test_a_requests_tokens_depend_on_nothing_else(loaded, prompts):
    sampled = requests(prompts, sampling=SamplingParams(0.9, 40, 0.95), seed=7)
    engine = Engine(loaded, EngineSettings(max_num_seqs=4))
    crowded = ids(engine.generate(sampled))
    alone = Engine(loaded, EngineSettings(max_num_seqs=1))
    assert crowded[:2] == [ids(alone.generate([r]))[0] for r in sampled[:2]]
    assert crowded == ids(engine.generate(sampled[::-1]))[::-1]  # other neighbours, other arrival order
    other_seed = requests(prompts, sampling=SamplingParams(0.9, 40, 0.95), seed=8)
    assert crowded != ids(engine.generate(other_seed))


@pytest.mark.slow
def test_streaming_events_add_up_to_the_result(loaded, prompts):
    engine = Engine(loaded, EngineSettings(max_num_seqs=4, steps_per_dispatch=4))
    request = requests(prompts)[4]
    events = list(engine.stream(request))
    result = engine.generate([request])[0]
    assert len(events) > 2  # a dispatch's tokens at a time
    assert [t for e in events for t in e.token_ids] == result.token_ids
    assert events[-1].finish_reason == result.finish_reason == "length"


@pytest.mark.slow
def test_the_decode_loop_stops_early_only_when_a_request_waits(loaded, prompts):
    backend = SlotBackend.of(loaded, EngineSettings(max_num_seqs=2).resolve(CONFIG))
    pages = PagePool(backend.num_pages, backend.page_size, backend.slots, backend.pages_per_seq)
    pages.grow(0, 64), pages.grow(1, 64)
    short, long = (Admitting(prompts[i], Request(prompts[i], n)) for i, n in ((1, 3), (2, 30)))
    backend.insert([0, 1], [short, long], bucket=16, tables=pages.table)
    *_, ran = backend.decode(20, [True, True], stop_early=True, tables=pages.table)
    assert ran == 2  # slot 0's third token ends it
    backend.insert([0], [short], bucket=16, tables=pages.table)
    *_, ran = backend.decode(20, [True, True], stop_early=False, tables=pages.table)
    assert ran == 20


def test_live_block_attention_equals_attention_over_the_whole_cache():
    """Seven query rows over the first seven of eight cache rows; more rows than LONG_ROWS, so the longest
    read their last blocks on their own."""
    rng = np.random.default_rng(0)
    layers, rows, kv_heads, max_len, head_dim, heads, block = 2, 8, 2, 64, 8, 6, 16
    k_all = rng.normal(size=(layers, rows, kv_heads, max_len, head_dim)).astype(np.float32)
    v_all = rng.normal(size=(layers, rows, kv_heads, max_len, head_dim)).astype(np.float32)
    q_index = np.asarray([[3, 4], [20, 21], [40, 41], [62, 63], [5, 6], [50, 51], [10, 11]])
    batch = len(q_index)
    assert batch > LONG_ROWS + 1
    q = rng.normal(size=(batch, 2, heads, head_dim)).astype(np.float32)

    # The rows' positions in pages of 8 scattered over the pool (two pages a block), as a pool in use holds them.
    page_size, per_row = 8, max_len // 8
    table = np.random.default_rng(1).permutation(rows * per_row).reshape(rows, per_row).astype(np.int32)
    pool = np.zeros((layers, rows * per_row, 2, kv_heads, page_size, head_dim), np.float32)
    for b in range(rows):
        for j in range(per_row):
            for half, source in enumerate((k_all, v_all)):
                pool[:, table[b, j], half] = source[:, b, :, j * page_size : (j + 1) * page_size]

    def attend(q_index):
        live = LiveCache(q_index, jnp.asarray(table), block)
        return np.asarray(attend_live_cache(jnp.asarray(q), jnp.asarray(pool), None, jnp.int32(1), live))

    live = attend(q_index)
    # numpy reference: query t of row b (head h, KV head h // 3) over cache slots 0..q_index[b, t]
    expected = np.zeros_like(q)
    for b in range(batch):
        for t in range(2):
            for h in range(heads):
                keys = k_all[1, b, h // 3, : q_index[b, t] + 1]
                scores = keys @ q[b, t, h] / np.sqrt(head_dim)
                weights = np.exp(scores - scores.max())
                expected[b, t, h] = weights @ v_all[1, b, h // 3, : q_index[b, t] + 1] / weights.sum()
    np.testing.assert_allclose(live, expected, rtol=1e-5, atol=1e-6)
    # A row's result does not change when another reaches further, or stops (more or fewer blocks are read,
    # and which rows read on their own changes).
    for row, moved in ((0, [62, 63]), (4, [33, 34]), (3, [-1, -1])):
        other = q_index.copy()
        other[row] = moved
        unchanged = [b for b in range(batch) if b != row]
        np.testing.assert_array_equal(live[unchanged], attend(other)[unchanged])


def test_the_ragged_paged_kernels_stand_in_computes_what_jaxs_reference_of_the_kernel_does():
    """Off TPU `ragged_paged._reference` replaces JAX's ragged paged attention kernel: it must compute what JAX's
    own reference of that kernel (`ref_ragged_paged_attention`) computes — GQA, ragged lengths, shuffled
    pages, a page two rows share (a cached prefix), queries that are a row's last positions."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention.kernel import ref_ragged_paged_attention

    from llama_jax.ragged_paged import _reference

    rng = np.random.default_rng(3)
    rows, q_len, heads, kv_heads, head_dim, page_size = 3, 4, 4, 2, 16, 8
    queries = jnp.asarray(rng.normal(size=(rows * q_len, heads, head_dim)), jnp.float32)
    pages = jnp.asarray(rng.normal(size=(12, page_size, 2 * kv_heads, head_dim)), jnp.float32)
    kv_lens = jnp.asarray([5, 17, 30], jnp.int32)
    tables = jnp.asarray([[7, 0, 0, 0], [7, 2, 9, 0], [4, 11, 1, 3]], jnp.int32)  # rows 0 and 1 share page 7
    cu_q_lens = jnp.arange(rows + 1, dtype=jnp.int32) * q_len
    args = (queries, pages, kv_lens, tables, cu_q_lens, jnp.asarray([rows], jnp.int32))
    expected = ref_ragged_paged_attention(*args, sm_scale=0.25)
    np.testing.assert_allclose(
        jax.jit(_reference, static_argnames="sm_scale")(*args, sm_scale=0.25), expected, rtol=2e-5, atol=2e-5
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "batch, length, heads, kv_heads, block",
    [(2, 48, 6, 2, 16), (1, 64, 4, 4, 16), (3, 32, 8, 1, 8), (2, 48, 6, 2, None)],
    ids=["gqa", "mha", "mqa", "one-block"],
)
def test_blockwise_flash_attention_equals_the_reference(batch, length, heads, kv_heads, block):
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(batch, length, heads, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(batch, length, kv_heads, 8)), jnp.float32) for _ in range(2))
    # packed documents: a segment starting inside a block, one spanning blocks
    segments = np.ones((batch, length), np.int32)
    segments[0, 5:] = 2
    segments[0, length // 2 + 3 :] = 3
    for segment_ids in (None, jnp.asarray(segments)):
        expected = attention(q, k, v, "xla", segment_ids=segment_ids)
        got = jax.jit(lambda q, k, v, s=segment_ids: blockwise_attention(q, k, v, s, block))(q, k, v)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # a row's result is its own: computed alone it is the same to the bit
    alone = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, None, block))(q[-1:], k[-1:], v[-1:])
    together = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, None, block))(q, k, v)
    np.testing.assert_array_equal(alone[0], together[-1])


@pytest.mark.slow
def test_warm_up_compiles_every_program_the_engine_then_runs(loaded, prompts):
    engine = Engine(loaded, EngineSettings(max_num_seqs=4, max_model_len=64))
    engine.warm_up()
    compiles = []
    listener = lambda name, *_, **__: compiles.append(name) if name.endswith("backend_compile_duration") else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        sampled = SamplingParams(0.8, 20, 0.9)
        mixed = [
            Request(p, 8, sampling=sampled if i % 2 else SamplingParams(), stream=i) for i, p in enumerate(prompts)
        ]
        engine.generate(mixed + mixed[:1])  # one prompt alone and groups, every bucket these prompts fall in
        status = engine.status()
        assert {p.kind for p in status.compiled} == {"prefill", "admit", "decode"}
        assert set(status.compiled) == set(status.programs)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


def test_compile_for_lowers_the_engines_own_programs(loaded):
    """The same programs, the decode loop's grammar callback included where the platform's devices are here
    (`--compile-for` a TPU or GPU leaves that host call out)."""
    settings = EngineSettings(max_num_seqs=4, max_model_len=64)
    abstract = EnginePrograms.abstract(CONFIG, loaded.mesh, settings, follows_in_loop=True)
    running = SlotBackend.of(loaded, settings.resolve(CONFIG)).programs
    programs = Engine(loaded, settings).status().programs
    assert list(programs) == abstract.all() == running.all()
    assert {p.kind for p in programs} == {"prefill", "admit", "decode"}
    for program in (programs[0], programs[-2], programs[-1]):
        assert abstract.lower(program).as_text() == running.lower(program).as_text(), program


def test_settings_are_checked_once_and_shared_by_every_user():
    """What the engine refuses, --compile-for refuses too: both take EngineSettings."""
    for bad, message in (
        ({"prefill_chunk": 8}, "prefill_chunk must be a power of two of at least 16"),
        ({"prefill_chunk": 48}, "prefill_chunk must be a power of two"),
        ({"max_num_seqs": 0}, "max_num_seqs must be an integer >= 1"),
        ({"steps_per_dispatch": 65}, "steps_per_dispatch must be an integer in"),
    ):
        with pytest.raises(ValueError, match=message):
            EngineSettings(**bad)
    with pytest.raises(ValueError, match="max_model_len 300 exceeds the model's max_seq_len 256"):
        EngineSettings(max_model_len=300).resolve(CONFIG)
    resolved = EngineSettings(max_num_seqs=3, max_model_len=100).resolve(CONFIG, batch_shards=2)
    assert (resolved.max_num_seqs, resolved.prefill_rows, resolved.prefix_cache_tokens) == (4, 4, 0)
    assert Program("extend", 1, 256).describe() == "the prefill of a long prompt's next 256 tokens"
    assert Program("decode", 8).name == "decode" and Program("prefill", 4, 64).name == "prefill_64"


def test_one_thread_steps_an_engine(loaded, prompts):
    engine = Engine(loaded, EngineSettings(max_num_seqs=2))
    engine.start()
    try:
        with pytest.raises(RuntimeError, match="runs in a thread of its own"):
            engine.generate(requests(prompts[:1]))
        with pytest.raises(RuntimeError, match="runs in a thread of its own"):
            next(engine.stream(requests(prompts[:1])[0]))
        done, both = [], threading.Event()

        def on_event(index, event):
            if event.finish_reason:
                done.append(index)
                if len(done) == 2:
                    both.set()

        engine.submit(requests(prompts[:2]), on_event)
        assert both.wait(timeout=120)
    finally:
        engine.stop()
    streaming = engine.stream(requests(prompts[:1])[0])
    next(streaming)
    with pytest.raises(RuntimeError, match="another thread is generating"):
        engine.generate(requests(prompts[:1]))
    streaming.close()
    assert engine.generate(requests(prompts[:1]))[0].finish_reason == "length"


@pytest.mark.slow
def test_rows_past_the_tokenizers_ids_are_never_sampled(tmp_path, assets):
    """A vocabulary padded past its tokenizer (576 rows, 512 pieces): the padding rows, however likely, are never
    chosen, greedy or sampled (they would decode to nothing)."""
    import dataclasses

    from flax import nnx

    from llama_jax.loading import load
    from llama_jax.model_dir import write_model_dir

    config = dataclasses.replace(preset("tiny"), vocab_size=576, tie_embeddings=False)
    params = nnx.to_pure_dict(nnx.state(create_model(config)))
    # The final norm keeps one feature; two padding rows read it at ±1000 (real rows at their own small weights):
    # whatever its sign, a padding row has the largest logit at every step.
    scale = np.zeros(config.dim, np.float32)
    scale[0] = 1.0
    head = np.array(params["lm_head"])
    head[0, 512], head[0, 513] = 1000.0, -1000.0
    params["norm"]["scale"], params["lm_head"] = scale, head
    padded = load(write_model_dir(tmp_path / "padded", config, params, assets / "tok512.bin"))
    tokenizer = padded.tokenizer
    engine = Engine(padded, EngineSettings(max_num_seqs=2))
    requests = [
        make_request(tokenizer.encode("Once"), 12, tokenizer=tokenizer, sampling=SamplingParams(temperature=t))
        for t in (0.0, 1.0)
    ]
    outputs = engine.generate(requests)
    assert all(0 <= token < 512 for output in outputs for token in output.token_ids), outputs
    assert all(len(output.token_ids) == 12 or output.finish_reason == "stop" for output in outputs)
