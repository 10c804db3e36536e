"""The rest of the OpenAI API, through the real `openai` client against a server of the real stories260K weights
with two LoRA adapters (a LoRA run of train.py, and another run's PEFT export): JSON-schema and JSON-object
response formats, vLLM's guided_choice and guided_regex, streamed or not, give text that validates; tool calls
that tool_choice requires parse against the function's parameters, streamed or not, and a conversation carrying a
call and its result goes back through the template; each request's `model` picks its adapter, requests to
different adapters in flight together get the merged model's tokens alone; /v1/models lists the adapters and
/metrics counts them; what cannot be honoured is refused with a 400 naming the field."""

import asyncio
import json

import jsonschema
import pytest
from test_serve import start_server

from llama_jax.convert import export_hf
from llama_jax.inference.engine import Engine
from llama_jax.inference.settings import EngineSettings
from llama_jax.inference.types import make_request
from llama_jax.loading import load

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

MODEL = "stories"
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 8}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
# A chat template that shows the tools, as a model's Jinja template for tool calling does.
TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}[TOOLS]{{ tools | tojson }}[/TOOLS]{% endif %}"
    "{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
    "{% elif m.role == 'tool' %}[RESULT]{{ m.content }}[/RESULT]"
    "{% elif m.tool_calls %}{{ m.tool_calls | tojson }}{% else %}{{ m.content }}{% endif %}{% endfor %}"
)


def lora_run(base, out, rank, targets, lr):
    from llama_jax.train import run
    from llama_jax.train.config import load_train_config

    settings = [
        f"init_from={base}",
        "sft=true",
        "chat_template=llama2",
        "data=llama_jax/data/sft_example.jsonl",
        "seq_len=128",
        "batch_size=2",
        "steps=2",
        f"lr={lr}",  # large: after two steps every B is well away from its zero start
        "warmup=1",
        "eval_batches=1",
        "checkpoint_every=2",
        "samples=0",
        f"lora.rank={rank}",
        "lora.alpha=8",
        f"lora.targets={targets}",
        f"run_dir={out}",
    ]
    run(load_train_config(None, settings))
    return out


@pytest.fixture(scope="module")
def adapters(stories_model, tmp_path_factory):
    """Run "a" (rank 4, attention and down) served from its run directory; run "b" (rank 8, q, v and the MLP's
    gate and up) served from its PEFT export."""
    folder = tmp_path_factory.mktemp("adapters")
    run_a = lora_run(stories_model, folder / "a", 4, "q,k,v,o,down", 5e-2)
    run_b = lora_run(stories_model, folder / "b", 8, "q,v,gate,up", 3e-2)
    return {"a": run_a, "b": run_b, "b_peft": export_hf(run_b, folder / "b_peft")}


@pytest.fixture(scope="module")
def server(stories_model, adapters, tmp_path_factory):
    folder = tmp_path_factory.mktemp("structured")
    (folder / "tools.jinja").write_text(TOOLS_TEMPLATE)
    args = ["--model-name", MODEL, "--max-num-seqs", "4", "--chat-template", str(folder / "tools.jinja")]
    args += ["--lora-modules", f"a={adapters['a']}", f"b={adapters['b_peft']}"]
    process, url = start_server(stories_model, *args, log=folder / "log")
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)


def chat(client, content="Tell me about Lily.", **kwargs):
    kwargs.setdefault("max_tokens", 100)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kwargs)


def streamed(client, **kwargs):
    """The streamed chat's content and tool-call deltas, and its finish reason."""
    content, calls, reason = "", {}, None
    for chunk in chat(client, stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or ():
                entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
            reason = choice.finish_reason or reason
    return content, list(calls.values()), reason


def test_json_schema_and_json_object_validate_streamed_or_not(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    answer = chat(client, response_format=fmt).choices[0]
    assert answer.finish_reason == "stop"
    jsonschema.validate(json.loads(answer.message.content), PERSON)
    assert streamed(client, response_format=fmt) == (answer.message.content, [], "stop")
    sampled = chat(client, response_format=fmt, temperature=1.0, n=3, seed=5)
    for choice in sampled.choices:
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    text = client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=20,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert text.choices[0].text.startswith("{")  # any JSON object: a small model's runs on past 20 tokens
    cut = chat(client, response_format=fmt, max_tokens=4).choices[0]
    assert cut.finish_reason == "length"


def test_guided_choice_and_regex(client):
    choices = ["happy", "sad", "a little sleepy"]
    answer = chat(client, extra_body={"guided_choice": choices}).choices[0]
    assert answer.message.content in choices and answer.finish_reason == "stop"
    answer = chat(client, extra_body={"guided_regex": r"[A-Z][a-z]{2,8} is [0-9]{1,2}\."}).choices[0]
    assert answer.finish_reason == "stop"
    assert __import__("re").fullmatch(r"[A-Z][a-z]{2,8} is [0-9]{1,2}\.", answer.message.content)


def test_required_and_named_tool_calls_parse_against_their_parameters(client):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for choice in ("required", {"type": "function", "function": {"name": "time"}}):
        answer = chat(client, "What is the weather in Paris?", tools=[WEATHER, TIME], tool_choice=choice).choices[0]
        assert answer.finish_reason == "tool_calls" and answer.message.content is None
        (call,) = answer.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        if choice != "required":
            assert call.function.name == "time"
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        content, calls, reason = streamed(
            client, content="What is the weather in Paris?", tools=[WEATHER, TIME], tool_choice=choice
        )
        assert (content, reason) == ("", "tool_calls")
        assert calls == [{"name": call.function.name, "arguments": call.function.arguments}]
    # tool_choice "none": the tools are shown, the answer is words.
    answer = chat(client, tools=[WEATHER], tool_choice="none", max_tokens=10).choices[0]
    assert answer.message.tool_calls is None and answer.finish_reason == "length"


def test_a_call_and_its_result_go_back_through_the_template(client):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "weather", "arguments": '{"city": "Paris", "unit": "C"}'},
    }
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    answer = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], max_tokens=8, temperature=0
    )
    assert answer.choices[0].finish_reason in ("length", "stop", "tool_calls")
    bad = [
        *messages[:1],
        {**messages[1], "tool_calls": [{**call, "function": {**call["function"], "arguments": "{oops"}}]},
        messages[2],
    ]
    with pytest.raises(openai.BadRequestError, match="are not JSON"):
        client.chat.completions.create(model=MODEL, messages=bad, tools=[WEATHER], max_tokens=8)


def test_each_adapter_gives_its_merged_models_tokens_among_the_others(server, client, stories_model, adapters):
    prompts = ["Once upon a time", "Lily had a big", "The sun was"]
    names = [MODEL, "a", "b"]
    references = {
        MODEL: Engine(load(stories_model), EngineSettings(max_num_seqs=4)),
        "a": Engine(load(adapters["a"]), EngineSettings(max_num_seqs=4)),
        "b": Engine(load(adapters["b"]), EngineSettings(max_num_seqs=4)),
    }
    expected = {}
    for name, engine in references.items():
        tokenizer = engine.tokenizer
        requests = [make_request(tokenizer.encode(p), 24, tokenizer=tokenizer) for p in prompts]
        expected[name] = [c.text for c in engine.generate(requests)]
    assert expected["a"] != expected[MODEL] and expected["b"] != expected[MODEL]  # the adapters change tokens

    async def all_at_once():
        async_client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
        jobs = [
            async_client.completions.create(model=name, prompt=p, max_tokens=24, temperature=0)
            for p in prompts
            for name in names
        ]
        return await asyncio.gather(*jobs)

    answers = iter(asyncio.run(all_at_once()))
    for i in range(len(prompts)):
        for name in names:
            assert next(answers).choices[0].text == expected[name][i], (name, prompts[i])
    listed = {m.id: getattr(m, "parent", None) for m in client.models.list().data}
    assert listed == {MODEL: None, "a": MODEL, "b": MODEL}
    metrics = __import__("httpx").get(f"{server}/metrics").text
    assert 'vllm:generation_tokens_total{model_name="a"}' in metrics
    assert 'vllm:generation_tokens_total{model_name="b"}' in metrics


def test_what_cannot_be_honoured_is_refused_naming_the_field(client):
    cases = [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
            "response_format",
        ),
        ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a+"}}, "one of"),
        ({"extra_body": {"guided_regex": "[a-"}}, "guided_regex"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "cannot also constrain"),
        ({"model": "c"}, "'stories', 'a', 'b'"),
    ]
    for kwargs, words in cases:
        model = kwargs.pop("model", MODEL)
        with pytest.raises(openai.BadRequestError, match=words):
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], **kwargs)
