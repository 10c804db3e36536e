"""Tool calls without a model: Llama 3.1's JSON format as the llama3 template writes it (the expected text written
out by hand from Meta's format), an answer read back as calls (vLLM's llama3_json rules), and a streamed choice held
while it may still become a call."""

import json

import pytest

from llama_jax.chat import encode_dialog
from llama_jax.inference.types import Event
from llama_jax.serve.exchange import _Answer
from llama_jax.serve.protocol import ChatRequest
from llama_jax.serve.tools import call_constraint, parse_calls

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}


def body(**fields) -> ChatRequest:
    return ChatRequest(model="m", messages=[{"role": "user", "content": "Hi"}], tools=[WEATHER], **fields)


def test_the_llama3_template_writes_llama31_tool_turns(llama3_tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "weather", "arguments": {"city": "Paris"}}]},
        {"role": "tool", "content": '{"temperature": 21}'},
    ]
    text = llama3_tok.decode(encode_dialog(llama3_tok, "llama3", messages, [WEATHER]))
    definition = json.dumps(WEATHER, indent=4)
    expected = (
        "system\n\nEnvironment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief."
        "user\n\nGiven the following functions, please respond with a JSON for a function call with its proper "
        'arguments that best answers the given prompt.\n\nRespond in the format {"name": function name, '
        '"parameters": dictionary of argument name and its value}. Do not use variables.\n\n'
        f"{definition}\n\nWeather in Paris?"
        'assistant\n\n{"name": "weather", "parameters": {"city": "Paris"}}'
        'ipython\n\n{"temperature": 21}'
        "assistant\n\n"
    )
    assert text == expected  # (decode drops the special tokens between the turns)
    with pytest.raises(ValueError, match="llama2 chat template has no tool calls"):
        encode_dialog(llama3_tok, "llama2", messages, [WEATHER])
    with pytest.raises(ValueError, match="roles"):
        encode_dialog(llama3_tok, "llama3", messages[:3], [WEATHER])  # a call left unanswered


def test_answers_read_as_calls_as_vllms_llama3_json_parser_reads_them():
    request = body()
    one = parse_calls(' {"name": "weather", "parameters": {"city": "Paris"}}', request)
    assert [c["function"] for c in one] == [{"name": "weather", "arguments": '{"city": "Paris"}'}]
    two = parse_calls(
        '<|python_tag|>{"name": "weather", "parameters": {}}; {"name": "weather", "arguments": {}}', request
    )
    assert len(two) == 2 and two[0]["id"] != two[1]["id"] and two[0]["id"].startswith("call_")
    for text in ("It is sunny.", '{"name": "other", "parameters": {}}', '{"name": "weather"}', '{"name": "weather", '):
        assert parse_calls(text, request) is None, text


def test_a_required_or_named_call_is_held_to_its_schema_and_auto_is_not():
    assert call_constraint(body(tool_choice="auto")) is None and call_constraint(body()) is None
    schema = json.loads(call_constraint(body(tool_choice="required")).value)
    assert schema["properties"]["name"] == {"const": "weather"} and schema["additionalProperties"] is False
    with pytest.raises(ValueError, match="not among the tools"):
        body(tool_choice={"type": "function", "function": {"name": "nope"}})


def test_a_streamed_choice_is_held_while_it_may_become_a_call():
    request = body(tool_choice="auto")
    answer = _Answer(reads_calls=True)
    assert answer.take(Event([1], ' {"na', [0.0]), request) == []
    (chunk,) = answer.take(Event([2], 'me": "weather", "parameters": {}}', [0.0], "stop"), request)
    assert chunk[3] == "tool_calls" and chunk[4][0]["function"]["name"] == "weather"
    words = _Answer(reads_calls=True)
    (chunk,) = words.take(Event([1, 2], "It is", [0.0, 0.0]), request)
    assert chunk[:4] == ("It is", [1, 2], [0.0, 0.0], None)
    assert words.take(Event([3], " sunny", [0.0], "stop"), request)[0][0] == " sunny"
