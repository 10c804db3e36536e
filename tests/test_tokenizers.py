"""Tokenizers against published vectors: llama2.c test.c (LLaMA 2 SentencePiece), meta-llama/llama3
test_tokenizer.py (Llama 3 tiktoken), llama2.c run.c output for stories260K (tok512.bin); format detection and
its errors; training a new SentencePiece model."""

import json
import struct
from pathlib import Path

import pytest

from llama_jax.tokenizers import load_tokenizer, tiktoken_tokenizer
from llama_jax.tokenizers.training import train_sentencepiece


@pytest.fixture(scope="module")
def cases(assets):
    return json.loads((assets / "tokenizer_cases.json").read_text())


@pytest.fixture(scope="module")
def tok512(assets):
    return load_tokenizer(assets / "tok512.bin")


# --- SentencePiece (LLaMA 1/2) -------------------------------------------------------------------------------


def test_sentencepiece_published_ids(llama2_tok, cases):
    spec = cases["llama2_sentencepiece"]  # karpathy/llama2.c test.c
    tok = llama2_tok
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id) == ("sentencepiece", 32000, 1, 2)
    for case in spec["cases"]:
        if "ids_no_bos" in case:
            assert llama2_tok.encode(case["text"], bos=False) == case["ids_no_bos"]
        else:
            assert llama2_tok.encode(case["text"]) == case["ids"]
            assert llama2_tok.decode(case["ids"]) == case["text"]


def test_sentencepiece_specials_and_eos(llama2_tok):
    assert llama2_tok.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    assert llama2_tok.decode([1, 15043, 3186, 2]) == "Hello world"
    assert (llama2_tok.special_id("<s>"), llama2_tok.special_id("</s>"), llama2_tok.special_id("<unk>")) == (1, 2, 0)
    with pytest.raises(KeyError):
        llama2_tok.special_id("▁Hello")  # an ordinary piece, not a special token
    assert set(llama2_tok.stop_ids) >= {2}
    assert llama2_tok.file_name == "tokenizer.model"


# --- llama2.c tokenizer.bin ----------------------------------------------------------------------------------


def test_llama2c_round_trips_published_outputs(tok512, assets):
    expected = json.loads((assets / "stories260K_expected.json").read_text())
    assert (tok512.kind, tok512.vocab_size, tok512.bos_id, tok512.eos_id) == ("llama2c", 512, 1, 2)
    for case in expected["cases"]:
        ids = tok512.encode(case["expected"])
        assert ids[0] == 1 and len(ids) < len(case["expected"]) / 2  # BOS, and merges happened
        assert tok512.decode(ids) == case["expected"]
        assert tok512.decode(ids[1:]) == case["expected"]  # generated ids come without the BOS
    # The first greedy tokens of stories260K, decoded as run.c prints them after BOS.
    start = tok512.decode(expected["first_greedy_ids"])
    assert len(start) > 10 and expected["cases"][0]["expected"].startswith(start)


def test_llama2c_stop_and_special_ids(tok512):
    assert 1 in tok512.stop_ids  # run.c stops when BOS is generated
    assert tok512.encode("") == [1]  # no dummy prefix on empty text
    assert tok512.encode("", bos=False, eos=True) == [2]
    assert [tok512.special_id(name) for name in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert tok512.decode([1, 2]) == ""


def _write_llama2c(path: Path, pieces: list[tuple[str, float]]) -> Path:
    """A tokenizer.bin in llama2.c's layout: <unk>, BOS, EOS, the 256 byte tokens, then `pieces`."""
    vocab = [("<unk>", 0.0), ("\n<s>\n", 0.0), ("\n</s>\n", 0.0)] + [(f"<0x{b:02X}>", 0.0) for b in range(256)]
    vocab += pieces
    encoded = [(piece.encode(), score) for piece, score in vocab]
    data = struct.pack("<i", max(len(piece) for piece, _ in encoded))
    for piece, score in encoded:
        data += struct.pack("<fi", score, len(piece)) + piece
    path.write_bytes(data)
    return path


def _both_encodes(tok):
    """`encode` (SentencePiece's C++ for these vocabularies) and run.c's loop in Python must agree: the hand
    cases below check both."""
    assert tok._sentencepiece is not None
    fast_encode = tok.encode

    def encode(text: str, bos: bool = False) -> list[int]:
        fast, reference = fast_encode(text, bos=bos), tok.encode_like_run_c(text, bos=bos)
        assert fast == reference, text
        return fast

    return encode


def test_llama2c_merge_order_by_hand(tmp_path):
    pieces = [(" ", -1.0), ("a", -1.0), ("b", -1.0), ("c", -1.0), ("ab", -3.0), ("bc", -2.0), (" ab", -4.0)]
    tok = load_tokenizer(_write_llama2c(tmp_path / "t.bin", pieces))
    tok.encode = _both_encodes(tok)
    space, a, b, c, ab, bc, space_ab = range(259, 266)
    # " abc" -> [" ", a, b, c]; pairs ab -3, bc -2: the best score wins over the leftmost pair -> [" ", a, bc];
    # " "+"a" and "a"+"bc" are no pieces: done.
    assert tok.encode("abc", bos=False) == [space, a, bc]
    # " ab" -> [" ", a, b]; only ab -> [" ", ab]; then " "+"ab" = " ab" is a piece -> [" ab"].
    assert tok.encode("ab", bos=False) == [space_ab]
    # "é" is no piece: its UTF-8 bytes C3 A9 fall back to ids 0xC3+3, 0xA9+3.
    assert tok.encode("é", bos=False) == [space, 0xC3 + 3, 0xA9 + 3]
    # Decoding: the piece after BOS (here, the start) loses its leading space; byte tokens become bytes.
    assert tok.decode([space, 0xC3 + 3, 0xA9 + 3]) == "é"
    assert tok.decode([space_ab, space_ab, 1, space_ab]) == "ab abab"


def test_llama2c_equal_scores_merge_leftmost_pair(tmp_path):
    pieces = [(" ", -1.0), ("a", -1.0), ("ab", -2.0), ("ba", -2.0), ("b", -1.0)]
    tok = load_tokenizer(_write_llama2c(tmp_path / "t.bin", pieces))
    tok.encode = _both_encodes(tok)
    space, a, ab, ba, b = range(259, 264)
    # " aba" -> [" ", a, b, a]; ab (pos 1) and ba (pos 2) tie at -2: run.c's strict '>' keeps the first.
    assert tok.encode("aba", bos=False) == [space, ab, a]
    # " bab" -> [" ", b, a, b]; ba (pos 1) before ab (pos 2).
    assert tok.encode("bab", bos=False) == [space, ba, b]


def _run_c_encode(tokenizer_bin: Path, text: str) -> list[int]:
    """Transcription of llama2.c run.c `encode` (bos=0, eos=0), reading the file itself: an O(n^2) oracle."""
    data = tokenizer_bin.read_bytes()
    vocab, scores, offset = [], [], 4
    while offset < len(data):
        score, length = struct.unpack_from("<fi", data, offset)
        vocab.append(data[offset + 8 : offset + 8 + length])
        scores.append(score)
        offset += 8 + length
    str_lookup = {piece: i for i, piece in reversed(list(enumerate(vocab)))}
    tokens = []
    for char in (" " + text) if text else "":
        token = str_lookup.get(char.encode())
        tokens += [byte + 3 for byte in char.encode()] if token is None else [token]
    while True:
        best_score, best_id, best_idx = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            merged = str_lookup.get(vocab[tokens[i]] + vocab[tokens[i + 1]])
            if merged is not None and scores[merged] > best_score:
                best_score, best_id, best_idx = scores[merged], merged, i
        if best_idx == -1:
            return tokens
        tokens[best_idx : best_idx + 2] = [best_id]


def test_llama2c_fast_merge_equals_run_c_loop(tok512, assets):
    assert tok512._sentencepiece is not None  # tok512 is encoded by SentencePiece's C++
    text = (assets / "tinystories_sample.txt").read_text()[:1500] + " naïve 中文 🦙  two\tspaces\n▁"
    for start in range(0, len(text), 150):
        chunk = text[start : start + 150]
        expected = _run_c_encode(assets / "tok512.bin", chunk)
        assert tok512.encode(chunk, bos=False) == expected
        assert tok512.encode_like_run_c(chunk, bos=False) == expected
        assert tok512.decode(tok512.encode(chunk)) == chunk
    # Whole texts (the SentencePiece path has no length-dependent cost to hide a difference behind).
    for corpus in ("tinystories_sample.txt", "tinyshakespeare.txt"):
        lines = (assets / corpus).read_text()[:200_000].splitlines()
        assert [tok512.encode(line) for line in lines] == [tok512.encode_like_run_c(line) for line in lines]


def test_llama2c_vocabularies_sentencepiece_would_read_otherwise_keep_run_c(tmp_path):
    """A piece run.c can never build (its "é" is no piece: it falls back to bytes) but SentencePiece could,
    a piece holding "▁", and a repeated piece: such files are encoded by the Python loop, as run.c does."""
    for name, extra in (("unbuildable", [("éa", -0.5)]), ("escaped", [("▁", -1.0)]), ("repeated", [("a", -2.0)])):
        pieces = [(" ", -1.0), ("a", -1.0), *extra]
        tok = load_tokenizer(_write_llama2c(tmp_path / f"{name}.bin", pieces))
        assert tok._sentencepiece is None, name
    tok = load_tokenizer(_write_llama2c(tmp_path / "unbuildable.bin", [(" ", -1.0), ("a", -1.0), ("éa", -0.5)]))
    assert (
        tok.encode("éa", bos=False)
        == _run_c_encode(tmp_path / "unbuildable.bin", "éa")
        == [259, 0xC3 + 3, 0xA9 + 3, 260]
    )


# --- Llama 3 tiktoken ----------------------------------------------------------------------------------------


def test_tiktoken_published_ids(llama3_tok, cases):
    spec = cases["llama3_tiktoken"]  # meta-llama/llama3 llama/test_tokenizer.py
    assert llama3_tok.kind == "tiktoken"
    assert llama3_tok.vocab_size == spec["n_vocab_with_specials"]
    assert tiktoken_tokenizer.PAT_STR == spec["pat_str"]
    for name, token_id in spec["special"].items():
        assert llama3_tok.special_id(name) == token_id
    for case in spec["cases"]:
        if "ids_bos_eos" in case:
            assert llama3_tok.encode(case["text"], bos=True, eos=True) == case["ids_bos_eos"]
            # Meta's decode prints the specials; ours drops them.
            assert llama3_tok.decode(case["ids_bos_eos"]) == case["text"]
        else:
            assert llama3_tok.encode(case["text"], bos=False) == case["ids"]


def test_tiktoken_llama31_specials_and_stops(llama3_tok):
    # Ids from meta-llama/llama-models models/llama3/api/tokenizer.py: 128000 + position in its list.
    assert llama3_tok.special_id("<|finetune_right_pad_id|>") == 128004
    assert llama3_tok.special_id("<|eom_id|>") == 128008
    assert llama3_tok.special_id("<|python_tag|>") == 128010
    assert llama3_tok.special_id("<|reserved_special_token_2|>") == 128011
    assert llama3_tok.special_id("<|reserved_special_token_246|>") == 128255
    assert set(llama3_tok.stop_ids) == {128001, 128008, 128009}
    assert llama3_tok.bos_id == 128000 and llama3_tok.eos_id == 128001
    assert llama3_tok.id_to_piece(128009) == "<|eot_id|>"
    with pytest.raises(KeyError):
        llama3_tok.special_id("<|not_a_token|>")


def test_tiktoken_special_text_in_input_is_plain_text(llama3_tok):
    text = "<|begin_of_text|>hi<|eot_id|>"
    ids = llama3_tok.encode(text, bos=False)
    assert max(ids) < 128000
    assert llama3_tok.decode(ids) == text


def _meta_split(s: str, max_consecutive_slice_len: int):
    """Transcription of Meta's Tokenizer._split_whitespaces_or_nonwhitespaces (llama3 llama/tokenizer.py)."""
    current_slice_len = 0
    current_slice_is_space = s[0].isspace() if len(s) > 0 else False
    slice_start = 0
    for i in range(len(s)):
        is_now_space = s[i].isspace()
        if current_slice_is_space ^ is_now_space:
            current_slice_len = 1
            current_slice_is_space = is_now_space
        else:
            current_slice_len += 1
            if current_slice_len > max_consecutive_slice_len:
                yield s[slice_start:i]
                slice_start = i
                current_slice_len = 1
    yield s[slice_start:]


def test_tiktoken_long_input_cut_like_meta(llama3_tok):
    limit = tiktoken_tokenizer._MAX_RUN_CHARS
    text = "ab " + "x" * (2 * limit + 7) + " \u3000\n" * (limit // 2) + "end " + " " * (limit + 1)
    assert list(tiktoken_tokenizer._split_for_tiktoken(text)) == list(_meta_split(text, limit))
    # Past the 400k-character chunk size, with a run far beyond tiktoken's comfortable length.
    long_text = "The quick brown fox. " * 20_000 + "z" * 120_000
    assert llama3_tok.decode(llama3_tok.encode(long_text)) == long_text


# --- format detection and errors -----------------------------------------------------------------------------


def test_detects_format_from_content_not_name(tmp_path, assets, llama2_tokenizer_file):
    (tmp_path / "tokenizer.model").write_bytes((assets / "tok512.bin").read_bytes())
    (tmp_path / "odd.bin").write_bytes(llama2_tokenizer_file.read_bytes())
    assert load_tokenizer(tmp_path / "tokenizer.model").kind == "llama2c"
    assert load_tokenizer(tmp_path / "odd.bin").kind == "sentencepiece"


@pytest.mark.parametrize(
    "content",
    [
        b"",
        bytes(range(256)) * 8,  # arbitrary bytes
        b"\x0a\x05<unk>\x15garbage",  # starts like a protobuf
        b"SGVsbG8= 0\nV29ybGQ= 1\nnot base64 here\n",  # a broken tiktoken file
        b"SGVsbG8= 0\nV29ybGQ= 5\n",  # ranks with a gap
    ],
    ids=["empty", "random", "bad-protobuf", "bad-tiktoken-line", "tiktoken-rank-gap"],
)
def test_unreadable_files_raise_value_error_naming_the_file(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="tokenizer.model"):
        load_tokenizer(path)


def test_truncated_files_raise_value_error(tmp_path, assets, llama2_tokenizer_file):
    for name, cut in [("tok512.bin", 3), ("tok512.bin", 3000), ("llama2_tokenizer.model", 1000)]:
        data = (assets / name).read_bytes()
        path = tmp_path / f"cut_{name}"
        path.write_bytes(data[: len(data) - cut] if name.endswith(".bin") else data[:cut])
        with pytest.raises(ValueError, match=f"cut_{name}"):
            load_tokenizer(path)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(tmp_path / "nope.model")


# --- training a SentencePiece model --------------------------------------------------------------------------

CHINESE = (
    "从前有一座山，山里有一座庙，庙里有一个老和尚在给小和尚讲故事。\n"
    "今天天气很好，我们一起去公园散步，看见很多孩子在放风筝。\n"
    "学习语言需要耐心和时间，每天读一点书，写一点字。\n"
) * 30


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    english = (assets / "tinyshakespeare.txt").read_text()[:200_000]
    out = tmp_path_factory.mktemp("spm") / "trained.model"
    return train_sentencepiece([english, CHINESE], 600, out)


def test_trained_tokenizer_round_trips_any_text(trained):
    tok = load_tokenizer(trained)
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id) == ("sentencepiece", 600, 1, 2)
    texts = [
        "First Citizen:\nBefore we proceed any further, hear me speak.",
        "  two leading spaces, trailing tab\t and\n\nblank lines\n",
        "老和尚在给小和尚讲故事。",
        "Unseen: 🦙 emoji, Ελληνικά, עברית, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, 1234567890",
    ]
    for text in texts:
        ids = tok.encode(text)
        assert ids[0] == 1 and max(ids) < 600
        assert tok.decode(ids) == text
    # Learned pieces: English words merge, and each Chinese character seen in training is one token, not
    # three byte tokens.
    assert len(tok.encode(texts[0], bos=False)) < 0.6 * len(texts[0])
    assert len(tok.encode(texts[2], bos=False)) <= len(texts[2]) + 1


def test_training_is_deterministic_and_accepts_files(trained, assets, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((assets / "tinyshakespeare.txt").read_text()[:200_000])
    again = train_sentencepiece([corpus, CHINESE], 600, tmp_path / "again.model")
    assert again.read_bytes() == trained.read_bytes()


def test_training_rejects_impossible_requests(tmp_path):
    with pytest.raises(ValueError, match="Vocabulary size too high"):
        train_sentencepiece(["a tiny corpus\n"], 4096, tmp_path / "t.model")
    with pytest.raises(ValueError, match="empty corpus"):
        train_sentencepiece(["", "\n"], 600, tmp_path / "t.model")
