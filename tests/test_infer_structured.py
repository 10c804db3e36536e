"""`python infer.py --json-schema FILE | --json-object | --regex P | --choice T ... | --grammar FILE`: every
completion of a batch follows the grammar (checked by jsonschema, `re` and the choices, not by our code), a
request's record is the one the engine gives it alone, a grammar that does not compile or a schema that is
not JSON is one error line before any weights are read, and an output written under one constraint is not
resumed under another."""

import json
import re

import jsonschema
import pytest
from test_infer_cli import assert_one_error_line, stories  # noqa: F401 (a fixture)

from llama_jax.commands import infer
from llama_jax.commands.cli import run_cli
from llama_jax.inference.constraints import Constraint
from llama_jax.inference.engine import Engine
from llama_jax.inference.sampling import SamplingParams
from llama_jax.inference.settings import EngineSettings
from llama_jax.inference.types import make_request
from llama_jax.loading import load

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
PROMPTS = ["Once upon a time", "Lily and Tom", "The dog"]


def run_infer(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(infer.main, [str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_every_completion_follows_the_schema_and_equals_the_engines_own(stories, tmp_path, capsys):  # noqa: F811
    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(SCHEMA))
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    common = ["--checkpoint", stories, *prompts, "--max-new-tokens", "48", "--max-num-seqs", "2"]
    status, out, _ = run_infer(capsys, *common, "--temperature", "0", "--json-schema", schema_file)
    assert status == 0
    greedy = records(out)
    for record in greedy:
        assert record["finish_reason"] == "stop", record
        jsonschema.validate(json.loads(record["completion"]), SCHEMA)
    # The same request given to the engine alone: the batch and its neighbours change none of its tokens.
    engine = Engine(load(stories), EngineSettings(max_num_seqs=1, max_model_len=128))
    alone = engine.generate(
        [
            make_request(
                engine.tokenizer.encode(PROMPTS[1]),
                48,
                tokenizer=engine.tokenizer,
                sampling=SamplingParams(temperature=0.0),
                stream=1,
                constraint=Constraint("json_schema", json.dumps(SCHEMA)),
            )
        ]
    )[0]
    assert greedy[1]["token_ids"] == alone.token_ids
    status, out, _ = run_infer(capsys, *common, "--temperature", "1", "--seed", "3", "--regex", "[A-Z][a-z]{1,6}!")
    assert status == 0
    for record in records(out):
        assert re.fullmatch("[A-Z][a-z]{1,6}!", record["completion"]), record
    status, out, _ = run_infer(capsys, *common, "--temperature", "1", "--choice", "yes", "--choice", "no way")
    assert status == 0 and all(r["completion"] in ("yes", "no way") for r in records(out))


def test_a_json_object_cut_short_says_length(stories, capsys):  # noqa: F811
    status, out, _ = run_infer(
        capsys, "--checkpoint", stories, "--prompt", "Tom", "--max-new-tokens", "3", "--json-object"
    )
    (record,) = records(out)
    assert status == 0 and record["finish_reason"] == "length" and record["completion"].startswith("{"), record


def test_bad_grammars_are_one_line_and_write_nothing(stories, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out.jsonl"
    base = ["--checkpoint", stories, "--prompt", "Tom", "--max-new-tokens", "4", "--output", out]
    not_json = tmp_path / "schema.json"
    not_json.write_text("{'type': 'object'}")
    lark = tmp_path / "bad.lark"
    lark.write_text("start: missing_rule\n")
    binary = tmp_path / "grammar.bin"
    binary.write_bytes(b"\xff\xfe start")
    for args, expected in (
        (["--json-schema", not_json], f"--json-schema {not_json} is not JSON"),
        (["--grammar", binary], f"--grammar {binary} is not UTF-8 text (invalid start byte at byte 0)"),
        (["--json-schema", tmp_path], f"Is a directory: {tmp_path}"),
        (["--json-schema", tmp_path / "absent.json"], f"no such file: {tmp_path / 'absent.json'}"),
        (["--regex", "[a-"], "the regex constraint is not valid"),
        (["--grammar", lark], "the lark constraint is not valid"),
    ):
        status, _, err = run_infer(capsys, *base, *args)
        assert status == 2
        assert_one_error_line(err, expected)
        assert not out.exists()
    status, _, err = run_infer(capsys, *base, "--regex", "a", "--json-object")
    assert status == 2 and "not allowed with argument" in err


def test_an_output_is_resumed_only_under_its_own_constraint(stories, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out.jsonl"
    base = ["--checkpoint", stories, "--prompt", "Tom", "--max-new-tokens", "4", "--output", out]
    assert run_infer(capsys, *base, "--regex", "[a-z]+")[0] == 0
    status, _, err = run_infer(capsys, *base, "--regex", "[0-9]+")
    assert status == 2
    assert_one_error_line(err, "holds results of other settings")
    status, _, err = run_infer(capsys, *base, "--regex", "[a-z]+")
    assert status == 0 and "already in" in err
