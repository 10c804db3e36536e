"""The sampler against independent references: numpy nuclei and top-k sets, softmax frequencies, argmax. It
takes a setting per row (a serving engine's slots each hold a request of its own) and cuts top-k and top-p by
bisection instead of sorting; the kept sets must be exactly the references'."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.inference.sampling import RowSampling, SamplingParams, _cut_top_p, sample_rows

VOCAB, ROWS, DRAWS = 12, 4, 8000
TEMPERATURE = 0.7  # one temperature for every sampling test: each setting costs a compile


@pytest.fixture(scope="module")
def logits():
    # Spread-out logits: no two tokens tie and no nucleus boundary sits within float32 rounding of p.
    return jnp.asarray(np.random.default_rng(0).normal(0.0, 1.5, (ROWS, VOCAB)), jnp.float32)


@jax.jit(static_argnames=("steps",))
def _draws(logits, keys, rows, steps):
    return jax.vmap(lambda step: sample_rows(logits, keys, jnp.full(logits.shape[0], step), rows))(jnp.arange(steps))


def draws(logits, params, seed=0, indices=None, steps=DRAWS, per_row=None):
    """(steps, rows) tokens: step t of every row, each row's key folded from the seed and its index (as the
    engine makes a request's key from its seed and stream); `per_row` gives each row its own params."""
    indices = jnp.arange(logits.shape[0]) if indices is None else jnp.asarray(indices)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(indices)
    return np.asarray(_draws(logits, keys, RowSampling.of(per_row or [params] * logits.shape[0]), steps))


def softmax64(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference_nucleus(logits_row, top_p, temperature=TEMPERATURE):
    """The smallest set of most likely tokens whose probability reaches top_p (float64 numpy)."""
    probs = softmax64(np.asarray(logits_row) / temperature)
    order = np.argsort(-probs)
    size = int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)
    return set(order[:size].tolist())


def test_temperature_zero_is_argmax(logits):
    tokens = draws(logits, SamplingParams(temperature=0.0), steps=DRAWS)
    assert (tokens == np.argmax(np.asarray(logits), -1)).all()


def test_low_temperature_converges_to_greedy(logits):
    tokens = draws(logits, SamplingParams(temperature=1e-3), steps=DRAWS)
    assert (tokens == np.argmax(np.asarray(logits), -1)).all()


def test_top_k_support_is_exactly_the_k_largest(logits):
    k = 3
    tokens = draws(logits, SamplingParams(temperature=TEMPERATURE, top_k=k))
    for row in range(ROWS):
        largest = set(np.argsort(-np.asarray(logits[row]))[:k].tolist())
        assert set(tokens[:, row].tolist()) == largest


def test_top_p_samples_only_the_minimal_nucleus(logits):
    top_p = 0.8
    tokens = draws(logits, SamplingParams(temperature=TEMPERATURE, top_p=top_p))
    for row in range(ROWS):
        nucleus = reference_nucleus(logits[row], top_p)
        # ⊆: nothing outside the nucleus; ⊇: nothing of it dropped (so the kept set is the minimal one).
        assert set(tokens[:, row].tolist()) == nucleus


def test_the_nucleus_cut_matches_the_reference_on_many_rows():
    rng = np.random.default_rng(1)
    for top_p in (0.1, 0.3, 0.75, 0.95, 1.0):
        rows = rng.normal(0, 2, (64, 50))
        cut = np.asarray(_cut_top_p(jnp.asarray(rows, jnp.float32), jnp.full((64,), top_p, jnp.float32)))
        for row, kept in zip(rows, cut):
            assert set(np.flatnonzero(np.isfinite(kept)).tolist()) == reference_nucleus(row, top_p, temperature=1.0)


def test_each_row_samples_with_its_own_settings(logits):
    per_row = [
        SamplingParams(0.0),
        SamplingParams(TEMPERATURE, top_k=2),
        SamplingParams(TEMPERATURE),
        SamplingParams(0.0),
    ]
    tokens = draws(logits, None, per_row=per_row)
    greedy = np.argmax(np.asarray(logits), -1)
    assert (tokens[:, 0] == greedy[0]).all() and (tokens[:, 3] == greedy[3]).all()
    assert set(tokens[:, 1].tolist()) == set(np.argsort(-np.asarray(logits[1]))[:2].tolist())
    assert len(set(tokens[:, 2].tolist())) > 2


def test_tiny_top_p_still_keeps_the_most_likely_token(logits):
    tokens = draws(logits, SamplingParams(temperature=TEMPERATURE, top_p=1e-6), steps=DRAWS)
    assert (tokens == np.argmax(np.asarray(logits), -1)).all()


def test_top_k_then_top_p_renormalises_over_the_k(logits):
    k, top_p = 5, 0.7
    tokens = draws(logits, SamplingParams(temperature=TEMPERATURE, top_k=k, top_p=top_p))
    for row in range(ROWS):
        values = np.asarray(logits[row], np.float64)
        top = np.argsort(-values)[:k]
        within = reference_nucleus(values[top], top_p)  # positions inside the top k
        assert set(tokens[:, row].tolist()) == {int(top[i]) for i in within}


def test_temperature_sampling_frequencies_match_the_softmax(logits):
    tokens = draws(logits, SamplingParams(temperature=TEMPERATURE))
    for row in range(ROWS):
        probs = softmax64(np.asarray(logits[row]) / TEMPERATURE)
        freqs = np.bincount(tokens[:, row], minlength=VOCAB) / tokens.shape[0]
        # Five standard errors per token: a correct sampler fails this with probability ~1e-5.
        bound = 5 * np.sqrt(probs * (1 - probs) / tokens.shape[0]) + 1e-4
        assert (np.abs(freqs - probs) <= bound).all(), (row, freqs, probs)


def test_same_seed_repeats_and_other_seeds_differ(logits):
    params = SamplingParams(temperature=TEMPERATURE)
    first, again = draws(logits, params, seed=3, steps=DRAWS), draws(logits, params, seed=3, steps=DRAWS)
    other = draws(logits, params, seed=4, steps=DRAWS)
    np.testing.assert_array_equal(first, again)
    assert (first != other).mean() > 0.3


def test_a_rows_stream_depends_on_its_index_not_its_row(logits):
    same = jnp.broadcast_to(logits[:1], (ROWS, VOCAB))
    params = SamplingParams(temperature=TEMPERATURE)
    a = draws(same, params, indices=[5, 2, 9, 1], steps=DRAWS)
    b = draws(same, params, indices=[7, 8, 5, 3], steps=DRAWS)
    np.testing.assert_array_equal(a[:, 0], b[:, 2])  # prompt 5, wherever it sits in the batch
    assert (a[:, 0] != a[:, 1]).any()  # different prompts get different streams


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.1),
        dict(temperature=float("nan")),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_p=-1.0),
        dict(top_k=-1),
    ],
)
def test_invalid_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
