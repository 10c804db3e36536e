"""Exported tokenizers load in `transformers.AutoTokenizer` and encode as llama_jax does: BOS like LLaMA,
chat templates to the same ids, EOS ids where our generation stops."""

import json

import pytest
from hf_reference import transformers

from llama_jax.chat import encode_dialog
from llama_jax.convert.hf_tokenizer import write_hf_tokenizer
from llama_jax.tokenizers import load_tokenizer

DIALOG = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Who was Ada?"},
    {"role": "assistant", "content": "A mathematician."},
    {"role": "user", "content": " And Alan? "},
]


def texts(assets) -> list[str]:
    """Story lines, the public tokenizer test strings, and whitespace, digits and unicode edge cases."""
    lines = (assets / "tinystories_sample.txt").read_text().splitlines()[:200]
    cases = json.loads((assets / "tokenizer_cases.json").read_text())
    public = [case["text"] for entry in cases.values() for case in entry["cases"]]
    edges = [
        "",
        " ",
        "  two  spaces",
        "tab\tand\nnewline\n\n",
        "1234567 digits",
        "naïve café 東京 🙂",
        " leading space",
        "x" * 300,
    ]
    return lines + public + edges


def exported(tokenizer, chat_template, directory):
    write_hf_tokenizer(tokenizer, chat_template, directory)
    return transformers.AutoTokenizer.from_pretrained(directory)


def assert_same_encoding(ours, theirs, assets):
    for text in texts(assets):
        assert theirs(text)["input_ids"] == ours.encode(text), repr(text)


def test_llama2c_tokenizer_exports_as_the_sentencepiece_model_it_came_from(assets, tmp_path):
    ours = load_tokenizer(assets / "tok512.bin")
    theirs = exported(ours, "llama2", tmp_path)
    assert_same_encoding(ours, theirs, assets)
    # Our own loader reads the rewritten file as SentencePiece, with run.c's tokens.
    rewritten = load_tokenizer(tmp_path / "tokenizer.model")
    assert rewritten.kind == "sentencepiece"
    for text in texts(assets):
        assert rewritten.encode(text) == ours.encode(text), repr(text)
        assert rewritten.decode(ours.encode(text)) == ours.decode(ours.encode(text)), repr(text)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 1 and set(generation["eos_token_id"]) == set(ours.stop_ids)


def test_llama2_sentencepiece_and_chat_template(llama2_tok, assets, tmp_path):
    theirs = exported(llama2_tok, "llama2", tmp_path)
    assert_same_encoding(llama2_tok, theirs, assets)
    assert theirs.apply_chat_template(DIALOG, tokenize=True, return_dict=False) == encode_dialog(
        llama2_tok, "llama2", DIALOG
    )


def test_llama3_tiktoken_exports_tokenizer_json_and_chat_template(llama3_tok, assets, tmp_path):
    theirs = exported(llama3_tok, "llama3", tmp_path)
    assert_same_encoding(llama3_tok, theirs, assets)
    assert theirs.apply_chat_template(
        DIALOG, tokenize=True, add_generation_prompt=True, return_dict=False
    ) == encode_dialog(llama3_tok, "llama3", DIALOG)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert llama3_tok.special_id("<|eot_id|>") in generation["eos_token_id"]
    assert (tmp_path / "original" / "tokenizer.model").read_bytes() == llama3_tok.path.read_bytes()


def test_base_model_without_chat_template_has_none(llama2_tok, tmp_path):
    theirs = exported(llama2_tok, None, tmp_path)
    assert theirs.chat_template is None
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [2, 1]


@pytest.fixture(autouse=True)
def _quiet_transformers():
    transformers.logging.set_verbosity_error()
