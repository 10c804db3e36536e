"""The prefix cache's bookkeeping over the page pool: chunks found only behind the very same prefix, the prompt's
last chunk never taken, kept chunks holding references to the pages their sequence wrote (freed only when
evicted), least recently used entries evicted with the chunks that continue them, a prompt's own chain kept."""

from llama_jax.inference.pages import PagePool
from llama_jax.inference.prefix_cache import PrefixCache

CHUNK, PAGE = 4, 2  # two pages a chunk


def chunks(*values):
    return [v for value in values for v in [value] * CHUNK]


def prefilled(pool: PagePool, prompt: list[int]) -> list[int]:
    """The pages a sequence of `prompt` wrote (slot 0), its slot then freed as when it ends."""
    pool.grow(0, len(prompt))
    pages = pool.pages_of(0)
    return pages


def store(cache: PrefixCache, prompt: list[int]) -> list[int]:
    """A sequence of `prompt` is prefilled into fresh pages, kept by the cache, and ends."""
    pages = prefilled(cache.pages, prompt)
    cache.store(prompt, pages)
    cache.pages.release(0)
    return pages


def test_a_prompt_finds_the_leading_chunks_stored_before_it_and_only_those():
    cache = PrefixCache(chunk=CHUNK, capacity=8, pages=PagePool(64, PAGE, 2, 32))
    pages = store(cache, chunks(1, 2, 3) + [9])
    assert cache.lookup(chunks(1, 2, 3, 4)) == pages[:6]
    assert cache.lookup(chunks(1, 2) + [5]) == pages[:4]
    assert cache.lookup(chunks(1, 5, 3, 4)) == pages[:2]  # chunk 3's tokens match, but behind another prefix
    assert cache.lookup(chunks(2, 1, 3)) == []
    # the kept chunks' pages stay out of the free pool; the sequence's last, partial page went back
    assert cache.pages.free == 64 - 6
    more = store(cache, chunks(1, 2, 4))  # only its third chunk is new: that one's pages are kept
    assert cache.lookup(chunks(1, 2, 4, 0)) == pages[:4] + more[4:6]


def test_the_last_chunk_is_never_taken_from_the_cache():
    cache = PrefixCache(chunk=CHUNK, capacity=8, pages=PagePool(64, PAGE, 2, 32))
    pages = store(cache, chunks(1, 2))
    assert cache.lookup(chunks(1, 2)) == pages[:2]  # the second chunk holds the last token: it is computed
    assert cache.lookup(chunks(1, 2) + [3]) == pages[:4]
    assert (cache.hit_tokens, cache.queried_tokens) == (12, 12)


def test_least_recently_used_chains_are_evicted_whole_and_a_prompts_own_chain_is_kept():
    pool = PagePool(64, PAGE, 2, 32)
    cache = PrefixCache(chunk=CHUNK, capacity=4, pages=pool)
    first = store(cache, chunks(1, 2))  # two entries
    store(cache, chunks(5, 6))  # two more: full
    cache.lookup(chunks(1, 2, 0))  # 1-2 used since
    store(cache, chunks(7))  # the least recent, 5, goes with its continuation 6: their pages are free again
    assert cache.lookup(chunks(5, 6, 0)) == []
    assert cache.lookup(chunks(1, 2, 0)) == first[:4] and cache.used == 3
    assert pool.free == 64 - 3 * 2
    # 8 and 9 take the room left and 7's (the least recent); 1-2, this prompt's own, stay; 10 finds no room
    # but the prompt's own chain
    own = store(cache, chunks(1, 2, 8, 9, 10))
    assert cache.lookup(chunks(7, 0)) == []
    assert cache.lookup(chunks(1, 2, 8, 9, 0)) == first[:4] + own[4:8] and cache.used == 4


def test_a_page_a_sequence_shares_with_the_cache_stays_until_both_let_go():
    pool = PagePool(8, PAGE, 2, 4)
    cache = PrefixCache(chunk=CHUNK, capacity=4, pages=pool)
    pages = store(cache, chunks(1, 2))  # the cache holds the first chunk's two pages
    pool.share(1, cache.lookup(chunks(1, 2)))  # a sequence shares them (and the lookup made them recent)
    assert cache.evict_oldest() and pool.free == 8 - 2  # the second chunk's pages: nobody else held them
    assert cache.evict_oldest() and pool.free == 8 - 2  # the first chunk's: evicted, still the sequence's
    pool.release(1)
    assert pool.free == 8 and not cache.evict_oldest()
    assert pages[:2] == [0, 1]  # free pages are taken lowest first: every process of a job takes the same
