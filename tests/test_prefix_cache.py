"""The prefix cache's bookkeeping: chunks found only behind the very same prefix, the prompt's last chunk never
taken, least recently used entries evicted with the chunks that continue them, a prompt's own chain kept."""

from llama_jax.inference.prefix_cache import PrefixCache


def chunks(*values, size=4):
    return [v for value in values for v in [value] * size]


def test_a_prompt_finds_the_leading_chunks_stored_before_it_and_only_those():
    cache = PrefixCache(chunk=4, capacity=8)
    assert cache.store(chunks(1, 2, 3) + [9]) == {0: 0, 1: 1, 2: 2}
    assert cache.lookup(chunks(1, 2, 3, 4)) == [0, 1, 2]
    assert cache.lookup(chunks(1, 2) + [5]) == [0, 1]
    assert cache.lookup(chunks(1, 5, 3, 4)) == [0]  # chunk 3's tokens match, but behind another prefix
    assert cache.lookup(chunks(2, 1, 3)) == []
    assert cache.store(chunks(1, 2, 4)) == {2: 3}  # only what is new


def test_the_last_chunk_is_never_taken_from_the_cache():
    cache = PrefixCache(chunk=4, capacity=8)
    cache.store(chunks(1, 2))
    assert cache.lookup(chunks(1, 2)) == [0]  # the second chunk holds the last token: it is computed
    assert cache.lookup(chunks(1, 2) + [3]) == [0, 1]
    assert (cache.hit_tokens, cache.queried_tokens) == (12, 12)


def test_least_recently_used_chains_are_evicted_whole_and_a_prompts_own_chain_is_kept():
    cache = PrefixCache(chunk=4, capacity=4)
    cache.store(chunks(1, 2))  # entries 0, 1
    cache.store(chunks(5, 6))  # entries 2, 3: full
    cache.lookup(chunks(1, 2, 0))  # 1-2 used since
    assert cache.store(chunks(7)) == {0: 2}  # the least recent, 5, goes with its continuation 6
    assert cache.lookup(chunks(5, 6, 0)) == []
    assert cache.lookup(chunks(1, 2, 0)) == [0, 1] and cache.used == 3
    # chunks 8 and 9 take the free entry and 7's (the least recent); 1-2, this prompt's own, stay; 10 finds no
    # room but the prompt's own chain
    assert cache.store(chunks(1, 2, 8, 9, 10)) == {2: 3, 3: 2}
    assert cache.lookup(chunks(7, 0)) == []
    assert cache.lookup(chunks(1, 2, 8, 9, 0)) == [0, 1, 3, 2] and cache.used == 4
