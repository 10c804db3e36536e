"""`python -m llama_jax.evaluate`: the perplexity of a converted model equals the one computed from
transformers' logits on the same windows; bad input gives one error line."""

import json
import math

import numpy as np
import pytest
from hf_reference import hf_model, torch
from module_runner import assert_one_error_line, run_module

from llama_jax.commands.cli import run_cli
from llama_jax.commands.evaluate import main
from llama_jax.convert import convert_hf
from llama_jax.evaluate.perplexity import perplexity
from llama_jax.loading import load
from llama_jax.tokenizers import load_tokenizer

SEQ_LEN = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory, assets):
    root = tmp_path_factory.mktemp("evaluate")
    hf_model("llama2").save_pretrained(root / "hf", safe_serialization=True)
    convert_hf(root / "hf", root / "model", tokenizer=assets / "tok512.bin")
    data = root / "data.txt"
    data.write_text((assets / "tinystories_sample.txt").read_text()[:700])
    return root / "model", data


def reference_perplexity(text, tokenizer):
    """transformers' logits, window by window: BOS + ids cut every SEQ_LEN, each window predicting its
    tokens after the first."""
    ids = [tokenizer.bos_id, *tokenizer.encode(text, bos=False)]
    nll, tokens = 0.0, 0
    for start in range(0, len(ids), SEQ_LEN):
        window = torch.tensor([ids[start : start + SEQ_LEN]])
        with torch.no_grad():
            log_probs = torch.log_softmax(hf_model("llama2")(window).logits.double(), dim=-1)
        nll -= log_probs[0, :-1].gather(-1, window[0, 1:, None]).sum().item()
        tokens += window.shape[1] - 1
    assert len(ids) % SEQ_LEN > 1, "the test text should end in a partial window"
    return math.exp(nll / tokens), tokens


def test_cli_matches_transformers(setup, assets):
    model_dir, data = setup
    expected, tokens = reference_perplexity(data.read_text(), load_tokenizer(assets / "tok512.bin"))
    result = run_module(
        "llama_jax.evaluate",
        "--checkpoint",
        model_dir,
        "--data",
        data,
        "--max-model-len",
        SEQ_LEN,
        "--batch-size",
        2,
        "--mesh",
        "data=2",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["tokens"] == tokens
    assert abs(report["perplexity"] - expected) <= 1e-5 * expected
    assert report["nll_per_token"] == pytest.approx(math.log(expected), rel=1e-5)


def test_padded_batches_do_not_change_the_result(setup):
    """3 windows per batch on a 2-device mesh: the last batch is mostly padding rows."""
    model_dir, data = setup
    loaded = load(model_dir)
    expected, tokens = reference_perplexity(data.read_text(), loaded.tokenizer)
    ids = loaded.tokenizer.encode(data.read_text(), bos=True)
    report = perplexity(loaded, ids, SEQ_LEN, batch_size=3)
    assert report["tokens"] == tokens
    assert abs(report["perplexity"] - expected) <= 1e-5 * expected


def error_of(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(a) for a in argv])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_bad_input_is_one_error_line(setup, tmp_path, capsys):
    model_dir, data = setup
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"caf\xe9 \xff\xfe")
    cases = {
        "not a llama_jax model directory": ["--checkpoint", tmp_path / "missing", "--data", data],
        "is empty": ["--checkpoint", model_dir, "--data", empty],
        "not valid UTF-8": ["--checkpoint", model_dir, "--data", binary],
        "no such file": ["--checkpoint", model_dir, "--data", tmp_path / "missing.txt"],
        "between 2 and": ["--checkpoint", model_dir, "--data", data, "--max-model-len", 1],
        "max_seq_len 64": ["--checkpoint", model_dir, "--data", data, "--max-model-len", 65],
        "unrecognized arguments": ["--checkpoint", model_dir, "--data", data, "--bogus"],
    }
    for message, argv in cases.items():
        assert message in error_of(argv, capsys)


def test_cli_error_exit(tmp_path):
    assert "not a llama_jax model directory" in assert_one_error_line(
        run_module("llama_jax.evaluate", "--checkpoint", tmp_path, "--data", tmp_path / "x.txt")
    )


def test_windows_cover_every_token_once():
    from llama_jax.evaluate.perplexity import windows

    chunks = windows(np.arange(70), SEQ_LEN)
    assert [len(c) for c in chunks] == [32, 32, 6]
    assert np.array_equal(np.concatenate(chunks), np.arange(70))
    assert [len(c) for c in windows(np.arange(65), SEQ_LEN)] == [32, 32]  # a lone last id predicts nothing
