"""The continuous-batching rules without a model: a deterministic fake backend (JetStream's mock-engine idea)
whose slot tokens are a function of the request alone, driven through admission, refill, stop conditions,
cancellation, fairness, the page pool (pages as sequences grow, shared cached prefixes) and preemption."""

import numpy as np
import pytest

from llama_jax.inference.scheduler import PREFILL_BUDGET, QueueFull, Request, Scheduler

STOP = 0


class FakeBackend:
    """Token t of a request is 10 + (sum(prompt) + t) % 50, except that a prompt starting with 99 emits the
    stop id at step prompt[1]. Like the device loop, a decode call ends when no slot's request is still going,
    or early when asked to and one ends (a stop id, or its last token). It checks that every position it would
    write lies in a page of its slot's table, and records what it was asked to do."""

    def __init__(self, slots: int, chunk: int = 1000, pages: int = 10_000, page_size: int = 4, prefix: int = 0):
        self.slots, self.chunk, self.prefix_chunks = slots, chunk, prefix
        self.num_pages, self.page_size, self.pages_per_seq = pages, page_size, 512
        self.mask_words = 2  # a 64-token vocabulary
        self.follows_in_loop = False  # the scheduler computes each mask between one-step calls
        self.masks = []  # (call, slot, mask) of every grammar mask handed in
        self.requests, self.steps, self.lengths = {}, {}, {}
        self.inserts = []  # (slots, bucket)
        self.decodes = []  # active slots per decode
        self.ran = []  # (steps asked, steps run) per decode
        self.calls = []  # extend calls, in order
        self.tables = []  # the slot's pages at each extend

    def bucket(self, n):
        return max(16, 1 << (n - 1).bit_length())

    def token(self, request, step):
        if request.prompt_ids[0] == 99 and step == request.prompt_ids[1]:
            return STOP
        return 10 + (sum(request.prompt_ids) + step) % 50

    def held(self, tables, slot, positions):
        pages = tables[slot][: -(-positions // self.page_size)]
        assert (pages < self.num_pages).all(), (slot, positions, tables[slot][:8])

    def insert(self, slots, items, bucket, tables, allowed):
        self.inserts.append((list(slots), bucket))
        self.masks += [("insert", slot, mask.tolist()) for slot, mask in zip(slots, allowed) if mask is not None]
        for slot, item in zip(slots, items):
            self.held(tables, slot, len(item.ids))
            self.requests[slot], self.steps[slot], self.lengths[slot] = item.request, item.first_step + 1, len(item.ids)
        return [self.token(i.request, i.first_step) for i in items], [-0.5] * len(items)

    def extend(self, slot, item, start, tables, allowed):
        self.calls.append(("extend", slot, start))
        if allowed is not None:
            self.masks.append(("extend", slot, allowed.tolist()))
        end = min(start + self.chunk, len(item.ids))
        self.held(tables, slot, end)
        self.tables.append(tables[slot][: -(-end // self.page_size)].tolist())
        if end < len(item.ids):
            return None
        self.requests[slot], self.steps[slot], self.lengths[slot] = item.request, item.first_step + 1, len(item.ids)
        return self.token(item.request, item.first_step), -0.5

    def decode(self, steps, active, stop_early, tables, allowed, follow=None):
        self.decodes.append([s for s in range(self.slots) if active[s]])
        if allowed is not None:
            self.masks += [("decode", slot, allowed[slot].tolist()) for slot in range(self.slots) if active[slot]]
        tokens = [[] for _ in range(self.slots)]
        live = {s for s in range(self.slots) if active[s] and self.requests.get(s)}
        ran = 0
        while ran < steps and live:
            ended = False
            going = np.zeros(self.slots, bool)
            for slot in range(self.slots):
                request, step = self.requests.get(slot), self.steps.get(slot, 0)
                token = self.token(request, step) if request else 1
                tokens[slot].append(token)
                self.steps[slot] = step + 1
                going[slot] = slot in live
                if slot in live:
                    self.held(tables, slot, self.lengths[slot] + 1)  # this step writes the last token
                    self.lengths[slot] += 1
                if slot in live and (token in request.stop_ids or step + 1 >= request.max_tokens):
                    live.discard(slot)
                    going[slot] = False
                    ended = True
            if follow is not None:  # as the device loop asks the host after each step
                masks = follow(np.asarray([t[-1] for t in tokens]), going)
                self.masks += [("loop", slot, masks[slot].tolist()) for slot in range(self.slots) if going[slot]]
            ran += 1
            if stop_early and ended:
                break
        self.ran.append((steps, ran))
        return tokens, [[-1.0] * ran for _ in range(self.slots)], ran


def text(prompt_ids, generated):
    return "".join(chr(ord("a") + t % 26) for t in generated)


def scheduler(slots=2, max_queue=8, steps=3, chunk=1000, **pool):
    backend = FakeBackend(slots, chunk, **pool)
    return Scheduler(backend, max_queue=max_queue, steps_per_dispatch=steps, text=text)


def submit(s, prompt, max_tokens=5, **kw):
    events = []
    s.submit(Request(tuple(prompt), max_tokens, stop_ids=(STOP,), **kw), events.append)
    return events


def run(s):
    while s.busy:
        s.step()


def expected_tokens(prompt, n):
    return [10 + (sum(prompt) + t) % 50 for t in range(n)]


def test_every_request_gets_its_own_tokens_whatever_shares_the_slots():
    alone = scheduler(slots=1)
    solo = [submit(alone, [i, 3, 4], max_tokens=4 + i) for i in range(5)]
    run(alone)
    crowded = scheduler(slots=3)
    shared = [submit(crowded, [i, 3, 4], max_tokens=4 + i) for i in range(5)]
    run(crowded)
    for i, (a, b) in enumerate(zip(solo, shared)):
        tokens = [t for e in b for t in e.token_ids]
        assert tokens == [t for e in a for t in e.token_ids] == expected_tokens([i, 3, 4], 4 + i)
        assert b[-1].finish_reason == "length" and all(e.finish_reason is None for e in b[:-1])
        assert "".join(e.text for e in b) == text(None, tokens)


def test_admission_is_first_come_first_served_and_slots_refill_at_once():
    s = scheduler(slots=2, steps=2)
    events = [submit(s, [n, 1], max_tokens=m) for n, m in ((1, 2), (2, 6), (3, 2), (4, 2))]
    s.step()  # admits 1 and 2; request 1 ends within this step's decode
    assert s.backend.inserts == [([0, 1], 16)]
    assert events[0][-1].finish_reason == "length" and not events[2]
    s.step()  # request 3 takes the freed slot 0 before decoding
    assert s.backend.inserts[1] == ([0], 16) and s.backend.decodes[1] == [0, 1]
    run(s)
    assert all(e[-1].finish_reason == "length" for e in events)
    assert [slots for slots, _ in s.backend.inserts] == [[0, 1], [0], [0]]


def test_a_decode_call_stops_at_a_finished_request_only_when_another_waits():
    s = scheduler(slots=2, steps=8)
    short, long = submit(s, [1, 2], max_tokens=3), submit(s, [3], max_tokens=20)
    s.step()  # nobody waits: the call runs its 8 steps though the short request ends at its third token
    assert s.backend.ran == [(8, 8)] and short[-1].finish_reason == "length" and not long[-1].finish_reason
    s = scheduler(slots=2, steps=8)
    short, long, waiting = (submit(s, p, max_tokens=n) for p, n in (([1, 2], 3), ([3], 20), ([5], 4)))
    s.step()  # the third waits for a slot: the call ends at the step the short one finishes
    assert s.backend.ran == [(8, 2)] and short[-1].finish_reason == "length" and not waiting
    s.step()
    assert s.backend.inserts[-1] == ([0], 16)
    run(s)
    assert [t for e in waiting for t in e.token_ids] == expected_tokens([5], 4)


def test_a_decode_call_ends_when_no_request_is_left():
    s = scheduler(slots=2, steps=8)
    submit(s, [1, 2], max_tokens=3)
    s.step()
    assert s.backend.ran == [(8, 2)] and not s.busy


def test_same_bucket_prompts_share_a_prefill_without_passing_the_head_of_the_queue():
    s = scheduler(slots=4)
    submit(s, [1] * 40)  # bucket 64
    submit(s, [2] * 3)  # bucket 16
    submit(s, [3] * 50)  # bucket 64: joins the head's prefill
    submit(s, [4] * 5)  # bucket 16
    s.step()
    assert s.backend.inserts == [([0, 1], 64), ([2, 3], 16)]


def test_a_stop_id_ends_a_request_and_is_not_returned():
    s = scheduler()
    events = submit(s, [99, 4, 7], max_tokens=20)
    run(s)
    tokens = [t for e in events for t in e.token_ids]
    assert tokens == expected_tokens([99, 4, 7], 4) and events[-1].finish_reason == "stop"


def test_stop_strings_end_the_text_and_are_never_shown_in_part():
    s = scheduler(steps=1)
    full = text(None, expected_tokens([5, 5], 12))
    stop = full[6:9]
    events = submit(s, [5, 5], max_tokens=12, stop_strings=(stop,))
    run(s)
    assert events[-1].finish_reason == "stop" and "".join(e.text for e in events) == full[: full.index(stop)]
    assert all(stop[:2] not in e.text for e in events[:-1])  # held back until it could not be a stop string


def test_cancelled_requests_free_their_slot_for_the_next():
    s = scheduler(slots=1)
    running = []
    handle = s.submit(Request((1, 2), 50, stop_ids=(STOP,)), running.append)
    waiting = submit(s, [3, 4], max_tokens=3)
    queued_events = []
    queued = s.submit(Request((5, 6), 3), queued_events.append)
    s.step()
    queued.cancel()
    handle.cancel()
    s.step()
    assert running[-1].finish_reason == "cancelled" and queued_events[-1].finish_reason == "cancelled"
    assert s.backend.inserts[-1] == ([0], 16)  # the waiting request took the freed slot in the same step
    run(s)
    assert waiting[-1].finish_reason == "length"


def test_the_queue_is_bounded():
    s = scheduler(slots=1, max_queue=2)
    submit(s, [1])
    submit(s, [2])
    with pytest.raises(QueueFull):
        submit(s, [3])
    s.step()  # one admitted: room again
    submit(s, [3])


def test_long_prompts_are_prefilled_a_budget_of_chunks_per_step_between_decode_calls():
    assert PREFILL_BUDGET == 2  # chunks' worth of prompt tokens per step, as this test counts them
    s = scheduler(slots=3, steps=20, chunk=4)
    short = submit(s, [1, 2], max_tokens=40)
    long = submit(s, list(range(10, 21)), max_tokens=3)  # 11 tokens: chunks at 0, 4, 8
    other = submit(s, list(range(40, 50)), max_tokens=3)  # 10 tokens: chunks at 0, 4, 8
    s.step()  # the short prompt is prefilled whole; two chunks of the long one; then 8 decode steps at most
    assert s.backend.inserts == [([0], 16)] and s.backend.calls == [("extend", 1, 0), ("extend", 1, 4)]
    assert s.backend.ran == [(8, 8)] and not long
    s.step()  # the long one's last 3 tokens and the other's first chunk (7 < 8 tokens), then its second
    assert s.backend.calls[2:] == [("extend", 1, 8), ("extend", 2, 0), ("extend", 2, 4)]
    assert s.backend.decodes[-1] == [0, 1] and long and not other  # the long one decodes with the short one
    run(s)
    assert [t for e in long for t in e.token_ids] == expected_tokens(list(range(10, 21)), 3)
    assert [t for e in other for t in e.token_ids] == expected_tokens(list(range(40, 50)), 3)
    assert [t for e in short for t in e.token_ids] == expected_tokens([1, 2], 40)


def test_a_prompt_shares_the_cached_pages_of_its_prefix_and_computes_the_rest():
    s = scheduler(slots=1, chunk=4, page_size=2, prefix=8)
    shared = list(range(30, 39))  # two whole chunks and a token
    submit(s, shared + [1, 2, 3], max_tokens=2)  # 12 tokens: chunks 0, 1, 2 computed, all three kept
    run(s)
    assert s.backend.calls == [("extend", 0, 0), ("extend", 0, 4), ("extend", 0, 8)]
    first_pages = s.backend.tables[-1]
    assert s.pages.free == s.pages.num_pages - 6  # the sequence ended; the cache keeps its three chunks' pages
    s.backend.calls.clear()
    events = submit(s, shared + [7], max_tokens=2)  # 10 tokens: chunks 0 and 1 cached, chunk 2 has its last token
    run(s)
    assert s.backend.calls == [("extend", 0, 8)]  # nothing copied, nothing computed again
    assert s.backend.tables[-1][:4] == first_pages[:4]  # its table starts with the cached chunks' pages
    assert s.backend.tables[-1][4] not in first_pages  # and computes its own third chunk
    assert [t for e in events for t in e.token_ids] == expected_tokens(shared + [7], 2)
    assert (s.prefix.hit_tokens, s.prefix.queried_tokens) == (8, 16)


def test_sequences_take_pages_as_they_grow_and_give_them_back():
    s = scheduler(slots=2, steps=4, page_size=4)
    events = submit(s, [1, 2, 3], max_tokens=9)
    s.step()  # 3 prompt positions and 4 decode steps: 2 pages
    assert s.pages.held[0] == 2
    run(s)
    assert events[-1].finish_reason == "length" and s.pages.free == s.pages.num_pages and s.pages.held == [0, 0]


def test_when_the_pool_runs_out_the_newest_sequence_is_preempted_and_makes_the_same_tokens():
    """Three requests that each grow to 28 positions in a pool of 12 pages of 4 (48 positions): the newest is
    preempted — its pages back, its prompt and tokens prefilled again later — and every request's tokens are
    those it makes alone."""
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    alone = []
    for prompt in prompts:
        one = scheduler(slots=1, steps=4)
        alone.append(submit(one, prompt, max_tokens=24))
        run(one)
    s = scheduler(slots=3, steps=4, pages=12)
    crowded = [submit(s, p, max_tokens=24) for p in prompts]
    run(s)
    assert s.preemptions > 0
    for a, b in zip(alone, crowded):
        assert [t for e in b for t in e.token_ids] == [t for e in a for t in e.token_ids]
        assert b[-1].finish_reason == "length"
    assert s.pages.free == 12
    # a resumed request is prefilled again with the tokens it had made, and samples on from its step
    assert any(len(slots) == 1 for slots, _ in s.backend.inserts[1:])


def test_a_request_waits_for_pages_the_running_ones_need():
    s = scheduler(slots=2, steps=4, pages=6)
    first = submit(s, [1] * 8, max_tokens=8)  # needs 4 pages by its end
    second = submit(s, [2] * 8, max_tokens=4)  # 2 pages for its prompt, beside the first's next 2
    s.step()
    assert s.backend.inserts[0] == ([0], 16)  # the second waits: its prompt would leave the first short
    run(s)
    assert first[-1].finish_reason == second[-1].finish_reason == "length" and s.preemptions == 0


def test_a_cancelled_prompt_being_prefilled_frees_its_slot():
    s = scheduler(slots=1, chunk=4)
    handle_events = []
    handle = s.submit(Request(tuple(range(20)), 5), handle_events.append)
    s.step()
    handle.cancel()
    waiting = submit(s, [1], max_tokens=2)
    s.step()
    assert handle_events[-1].finish_reason == "cancelled" and waiting[-1].finish_reason == "length"
