"""Structured outputs in the engine (`inference/constraints.py`): the real stories260K model held to a JSON schema,
a regex, a choice or a Lark grammar gives text that parses and validates by construction, greedy or sampled; a
constrained request's tokens are the same alone or beside others, and its unconstrained neighbours' tokens are
the ones they get without it; the mask on the device clears exactly what llguidance's own numpy reference
clears; the scheduler asks for masks and runs one step per call only while a constrained request runs."""

import json
import re

import jsonschema
import llguidance.numpy
import numpy as np
import pytest
from test_scheduler import scheduler

from llama_jax.inference.constraints import Constraint, Grammars, token_bytes
from llama_jax.inference.engine import Engine
from llama_jax.inference.sampling import SamplingParams, only_allowed
from llama_jax.inference.settings import EngineSettings
from llama_jax.inference.types import Request, make_request
from llama_jax.loading import load

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
PROMPTS = ["Once upon a time", "Lily had a big", "The sun was", "Tom and his dog"]


@pytest.fixture(scope="module")
def engine(stories_model):
    return Engine(load(stories_model), EngineSettings(max_num_seqs=4, max_model_len=256))


def constrained(engine, prompt, constraint, max_tokens=96, temperature=0.0, stream=0):
    return make_request(
        engine.tokenizer.encode(prompt),
        max_tokens,
        tokenizer=engine.tokenizer,
        sampling=SamplingParams(temperature=temperature),
        stream=stream,
        constraint=constraint,
    )


@pytest.mark.slow
def test_json_schema_outputs_validate_greedy_or_sampled_alone_or_crowded(engine):
    schema = Constraint("json_schema", json.dumps(PERSON))
    requests = [constrained(engine, p, schema, temperature=t, stream=i) for i, p in enumerate(PROMPTS) for t in (0, 1)]
    plain = [constrained(engine, p, None, max_tokens=40) for p in PROMPTS]
    crowd = engine.generate([r for pair in zip(requests, plain + plain) for r in pair])
    outputs, neighbours = crowd[0::2], crowd[1::2]
    for output in outputs:
        assert output.finish_reason == "stop", output
        jsonschema.validate(json.loads(output.text), PERSON)
        assert engine.tokenizer.decode(output.token_ids) == output.text.lstrip()
    assert [o.token_ids for o in engine.generate(requests[:3])] == [o.token_ids for o in outputs[:3]]
    # The unconstrained requests beside them got exactly their tokens without them.
    assert [o.token_ids for o in neighbours] == [o.token_ids for o in engine.generate(plain + plain)]


@pytest.mark.slow
def test_regex_choice_lark_and_json_object_and_a_budget_cut_short(engine):
    cases = [
        (Constraint("regex", r"[0-9]{3}-[a-z]{2,5}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", t)),
        (Constraint("choice", json.dumps(["yes", "no", "a small dog"])), lambda t: t in ("yes", "no", "a small dog")),
        (
            Constraint("lark", 'start: "The " ANIMAL " ran."\nANIMAL: "cat" | "dog"'),
            lambda t: t in ("The cat ran.", "The dog ran."),
        ),
    ]
    outputs = engine.generate([constrained(engine, "Tom", c, max_tokens=120) for c, _ in cases])
    for (constraint, valid), output in zip(cases, outputs):
        assert output.finish_reason == "stop" and valid(output.text), (constraint, output)
    # Any JSON object: this small model writes one long key, cut by the budget — still the start of valid JSON.
    (anything,) = engine.generate([constrained(engine, "Tom", Constraint("json_object"), max_tokens=40)])
    assert anything.finish_reason == "length" and isinstance(json.loads(anything.text + '": 1}'), dict)
    short = engine.generate([constrained(engine, "Tom", Constraint("json_schema", json.dumps(PERSON)), max_tokens=5)])
    assert short[0].finish_reason == "length" and len(short[0].token_ids) == 5


def test_a_grammar_that_does_not_compile_is_refused_naming_its_kind(engine):
    for constraint, words in [
        (Constraint("regex", "[a-"), "regex"),
        (Constraint("json_schema", "{not json"), "json_schema"),
        (Constraint("lark", "start: missing_rule"), "lark"),
    ]:
        with pytest.raises(ValueError, match=f"the {words} constraint is not valid"):
            engine.generate([constrained(engine, "Tom", constraint)])


def test_the_device_mask_clears_what_llguidance_clears(llama3_tok):
    grammars = Grammars(llama3_tok, 128_256)
    follower = grammars.follow(Constraint("json_schema", json.dumps(PERSON)))
    masks = np.full((3, grammars.words), -1, np.int32)
    follower.fill(masks[0])
    for token in llama3_tok.encode('{"name":"Al', bos=False):
        assert follower.accept(token)
    follower.fill(masks[1])  # row 2 stays unconstrained
    logits = np.random.default_rng(0).normal(size=(3, 128_256)).astype(np.float32)
    expected = logits.copy()
    llguidance.numpy.apply_token_bitmask_inplace(expected, masks)
    np.testing.assert_array_equal(np.asarray(only_allowed(logits, masks)), expected)
    assert np.isfinite(expected[0]).sum() < 100 and np.isfinite(expected[2]).all()


def test_followers_of_one_cached_grammar_are_independent(assets):
    """The second request with a schema copies the compiled grammar: each copy starts at the beginning, and
    what one follower accepts moves no other."""
    from llama_jax.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(assets / "tok512.bin")
    grammars = Grammars(tokenizer, 512)
    schema = Constraint("json_schema", json.dumps(PERSON))
    first, second = grammars.follow(schema), grammars.follow(schema)
    assert list(grammars._compiled) == [schema]
    start = np.zeros((2, grammars.words), np.int32)
    first.fill(start[0])
    for token in tokenizer.encode('{"name":"Al', bos=False)[1:]:  # after SentencePiece's leading space
        assert first.accept(token)
    second.fill(start[1])
    np.testing.assert_array_equal(start[0], start[1])
    moved = np.zeros(grammars.words, np.int32)
    first.fill(moved)
    assert not np.array_equal(moved, start[1])
    third = grammars.follow(schema)
    third.fill(moved)
    np.testing.assert_array_equal(moved, start[1])
    assert not third.accept(tokenizer.encode("}", bos=False)[-1])


def test_token_bytes_spell_the_text_for_each_vocabulary(llama2_tok, llama3_tok, assets):
    from llama_jax.tokenizers import load_tokenizer

    for tokenizer in (llama2_tok, llama3_tok, load_tokenizer(assets / "tok512.bin")):
        text = 'Hi {"x": [1, 2]}\n\tünï 🦙'
        ids = tokenizer.encode(text, bos=False)
        spelled = b"".join(token_bytes(tokenizer, i) for i in ids).decode("utf-8")
        assert spelled.removeprefix(" ") == text
        assert token_bytes(tokenizer, tokenizer.eos_id) is None


class CountingFollower:
    """A grammar of `length` tokens: token 10 + i allowed at step i; finished after the last."""

    def __init__(self, length: int):
        self.length, self.at = length, 0

    def fill(self, row):
        row[:] = 0
        token = 10 + self.at
        row[token // 32] = np.int32(np.uint32(1 << (token % 32)).view(np.int32))

    def accept(self, token):
        self.at += 1
        return True

    @property
    def finished(self):
        return self.at == self.length


def test_the_scheduler_masks_constrained_slots_and_steps_once_per_call_while_one_runs():
    """Without the decode loop's host callback (a multi-host job): one step per call while a grammar runs."""
    s = scheduler(slots=2, steps=4)
    s.follow = lambda constraint: CountingFollower(3)
    plain = Request((1, 2, 3), 10)
    held = Request((1, 2), 10, constraint=Constraint("regex", "x"))
    events = {0: [], 1: []}
    s.submit_all([plain, held], lambda i, e: events[i].append(e))
    while s.busy:
        s.step()
    assert s.backend.ran[:2] == [(1, 1), (1, 1)]  # one step per call while the constrained request runs
    assert s.backend.ran[2][0] == 4  # then the dispatch's steps again
    assert events[1][-1].finish_reason == "stop" and len([t for e in events[1] for t in e.token_ids]) == 3
    assert len([t for e in events[0] for t in e.token_ids]) == 10
    first = [m for m in s.backend.masks if m[0] == "insert"]
    assert [slot for _, slot, _ in first] == [1] and first[0][2][0] == 1 << 10
    assert [slot for call, slot, _ in s.backend.masks if call == "decode"] == [0, 1, 0, 1]


def test_with_the_loops_callback_a_grammar_is_followed_between_steps_of_full_calls():
    s = scheduler(slots=2, steps=4)
    s.backend.follows_in_loop = True
    s.follow = lambda constraint: CountingFollower(5)
    events = {0: [], 1: []}
    plain, held = Request((1, 2, 3), 10), Request((1, 2), 10, constraint=Constraint("regex", "x"))
    s.submit_all([plain, held], lambda i, e: events[i].append(e))
    while s.busy:
        s.step()
    assert s.backend.ran[0] == (4, 4)  # a whole call's steps with the constrained request in it
    assert events[1][-1].finish_reason == "stop" and len([t for e in events[1] for t in e.token_ids]) == 5
    assert len([t for e in events[0] for t in e.token_ids]) == 10
    # The call's first mask (token 10 + 1: the admission took 10 + 0), then after each step the next one.
    assert [m[0] for call, slot, m in s.backend.masks if call == "decode" and slot == 1] == [1 << 11]
    loop = [mask for call, slot, mask in s.backend.masks if call == "loop" and slot == 1]
    assert [m[0] for m in loop[:3]] == [1 << 12, 1 << 13, 1 << 14]
