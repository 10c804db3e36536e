"""Generation against the model's own full forward pass (no cache, no padding, one prompt at a time):
incremental decoding, ragged batches, stop ids, per-prompt random streams, sharding, text and streaming."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax.config import preset
from llama_jax.inference.decode import bucket_length, decode_step, prefill
from llama_jax.inference.generator import Generator, generate, stream
from llama_jax.inference.sampling import SamplingParams
from llama_jax.inference.settings import GenerationSettings
from llama_jax.loading import LoadedModel
from llama_jax.model import create_model
from llama_jax.sharding import MeshConfig, make_mesh, param_shardings
from llama_jax.tokenizers import load_tokenizer

CONFIG = preset("tiny").replace(vocab_size=512)  # tok512's vocabulary, for the text tests
NEW = 8
PROMPT_LENGTHS = [1, 6, 11, 16]  # ragged, one prompt bucket (16): one compile serves every batch below


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(), jax.devices()[:1])


@pytest.fixture(scope="module")
def model(mesh):
    return create_model(CONFIG, mesh, seed=0)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(3)
    return [rng.integers(3, CONFIG.vocab_size, n).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def forward(model):
    """Full-sequence logits (no cache) of one sequence. It is padded at the end to one length so that
    a single compile serves every call: causal attention keeps the padding out of the real positions."""
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids)[0][0])
    pad = CONFIG.max_seq_len
    return lambda ids: np.asarray(run(state, jnp.asarray([list(ids) + [0] * (pad - len(ids))], jnp.int32)))[: len(ids)]


def greedy_by_full_forward(forward, prompts):
    """Each prompt's greedy continuation, recomputing the whole sequence for every token."""
    results = []
    for prompt in prompts:
        seq = list(prompt)
        for _ in range(NEW):
            seq.append(int(np.argmax(forward(seq)[-1])))
        results.append(seq[len(prompt) :])
    return results


@pytest.fixture(scope="module")
def reference_greedy(forward, prompts):
    return greedy_by_full_forward(forward, prompts)


def ids_only(model, mesh):
    """A loaded model without a tokenizer: no default stop ids, generation from token ids."""
    return LoadedModel(model, CONFIG, mesh)


def settings(temperature=0.0, top_k=0, top_p=1.0, **rest) -> GenerationSettings:
    return GenerationSettings(
        **{"max_new_tokens": NEW, "batch_size": 4, **rest}, sampling=SamplingParams(temperature, top_k, top_p)
    )


@pytest.fixture(scope="module")
def greedy(model, mesh):
    return Generator(ids_only(model, mesh), settings())


def test_incremental_decoding_gives_the_full_forward_logits_at_every_position(model, forward):
    graphdef, state = nnx.split(model)
    prefill_jit = jax.jit(prefill, static_argnames=("graphdef", "cache_len", "chunk"))
    step = jax.jit(decode_step, static_argnames=("graphdef",))
    lengths, steps, bucket = [3, 7], 13, 16
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, CONFIG.vocab_size, n + steps).tolist() for n in lengths]
    padded = np.zeros((2, bucket), np.int32)
    for row, (seq, n) in enumerate(zip(seqs, lengths)):
        padded[row, :n] = seq[:n]
    logits, cache = prefill_jit(graphdef, state, jnp.asarray(padded), jnp.asarray(lengths), cache_len=32, chunk=16)
    got = [np.asarray(logits)]
    for t in range(steps - 1):  # feed each row its own next true token
        logits, cache = step(graphdef, state, jnp.asarray([seq[n + t] for seq, n in zip(seqs, lengths)]), cache)
        got.append(np.asarray(logits))
    got = np.stack(got, axis=1)  # (rows, steps, vocab): positions n-1 .. n+steps-2
    for row, (seq, n) in enumerate(zip(seqs, lengths)):
        np.testing.assert_allclose(got[row], forward(seq)[n - 1 : n + steps - 1], rtol=1e-5, atol=1e-5)


def test_ragged_batch_gives_each_prompt_its_own_greedy_ids(greedy, prompts, reference_greedy):
    batch = greedy.generate_ids(prompts, range(len(prompts)))
    assert [ids for ids, _ in batch] == reference_greedy
    assert all(reason == "length" for _, reason in batch)
    for i, prompt in enumerate(prompts):  # alone: the other rows are padding
        assert greedy.generate_ids([prompt], [i]) == [batch[i]]
    assert greedy.compiled_shapes == {(4, 16, 16 + NEW)}


def test_long_prompts_are_prefilled_in_chunks(model, mesh, forward):
    """Chunks of 16 positions (64 prompt tokens per call over a batch of 4): the longest prompt's bucket
    is capped at 56 (max_seq_len 64 - 8 new), so 3 scanned chunks and a remainder of 8 hold the rows'
    last prompt tokens (slots 0, 39, 51, 15)."""
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, CONFIG.vocab_size, n).tolist() for n in (1, 40, 52, 16)]
    generator = Generator(ids_only(model, mesh), settings(), prefill_tokens=64)
    assert [ids for ids, _ in generator.generate_ids(prompts, range(4))] == greedy_by_full_forward(forward, prompts)
    assert generator.compiled_shapes == {(4, 56, 56 + NEW)}


def test_rows_stop_independently_on_their_stop_ids(model, mesh, prompts, reference_greedy):
    stop = reference_greedy[1][3]  # the 4th greedy token of prompt 1
    results = Generator(ids_only(model, mesh), settings(stop_ids=(stop,))).generate_ids(prompts, range(len(prompts)))
    for (ids, reason), expected in zip(results, reference_greedy):
        if stop in expected:
            assert (ids, reason) == (expected[: expected.index(stop)], "stop")  # the stop id is not included
        else:
            assert (ids, reason) == (expected, "length")
    assert results[1] == (reference_greedy[1][:3], "stop")


def test_sampled_streams_follow_the_prompt_index_not_the_batch(model, mesh, prompts):
    def sampler(seed):
        return Generator(ids_only(model, mesh), settings(temperature=0.8, top_k=40, top_p=0.95, seed=seed))

    sampled = sampler(1)
    batch = sampled.generate_ids(prompts, range(4))
    assert sampled.generate_ids([prompts[2], prompts[0]], [2, 0]) == [batch[2], batch[0]]
    assert sampled.generate_ids(prompts, range(4)) == batch  # same seed, same tokens
    assert sampler(2).generate_ids(prompts, range(4)) != batch


@pytest.mark.parametrize("mesh_config", [MeshConfig(data=2), MeshConfig(data=1, tensor=2)], ids=["data", "tensor"])
def test_sharded_generation_equals_single_device(model, prompts, reference_greedy, mesh_config):
    mesh = make_mesh(mesh_config)
    state = nnx.state(model)
    placed = nnx.merge(nnx.graphdef(model), jax.device_put(state, param_shardings(state, mesh)))
    generator = Generator(ids_only(placed, mesh), settings())
    assert [ids for ids, _ in generator.generate_ids(prompts, range(4))] == reference_greedy


@pytest.fixture(scope="module")
def text_model(model, mesh, assets):
    return LoadedModel(model, CONFIG, mesh, load_tokenizer(assets / "tok512.bin"), "llama2")


def test_text_api_and_streaming_agree_with_token_generation(text_model):
    texts = ["Once upon a time", "", "Tom and Lily", "The sun"]
    completions = generate(text_model, texts, max_new_tokens=NEW, batch_size=4)
    generator = Generator(text_model, settings())
    encoded = [text_model.tokenizer.encode(t) for t in texts]
    assert [(c.token_ids, c.finish_reason) for c in completions] == generator.generate_ids(encoded, range(4))
    assert [c.prompt for c in completions] == texts
    for text, completion in zip(texts[:2], completions):
        pieces = list(stream(text_model, text, max_new_tokens=NEW))
        assert [i for p in pieces for i in p.token_ids] == completion.token_ids
        assert "".join(p.text for p in pieces) == completion.completion


def test_prompt_buckets_stay_few():
    limit = 2048 - 256
    assert [bucket_length(n, limit) for n in (1, 16, 17, 100, 1024, 1025, 1792)] == [16, 16, 32, 128, 1024, 1792, 1792]
    assert len({bucket_length(n, limit) for n in range(1, limit + 1)}) == 8


def test_bad_requests_are_refused_with_a_clear_message(model, mesh, text_model):
    with pytest.raises(ValueError, match="prompt 1 has 60 tokens; with max_new_tokens 8 it needs 68"):
        Generator(ids_only(model, mesh), settings()).generate_ids([[1] * 60], [0])
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        generate(text_model, ["x"], max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size"):
        generate(text_model, ["x"], batch_size=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Generator(text_model, settings(stop_ids=(512,)))
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        Generator(text_model, settings(max_new_tokens=CONFIG.max_seq_len))
    with pytest.raises(ValueError, match="no chat template"):
        Generator(ids_only(model, mesh), settings(chat=True))
    with pytest.raises(ValueError, match="top_p"):
        generate(text_model, ["x"], top_p=0)
