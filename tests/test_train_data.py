"""The data pipeline: packing (segments, positions, loss mask written out by hand), the batch of a step as a
pure function of (seed, step), each host's slice, the token cache, SFT masks, tokenizer=train:VOCAB."""

import json

import numpy as np
import pytest

from llama_jax.chat import encode_dialog
from llama_jax.sharding import MeshConfig, make_mesh
from llama_jax.tokenizers import load_tokenizer
from llama_jax.train.batching import PackedRows, feistel_permutation, global_batch
from llama_jax.train.config import load_train_config
from llama_jax.train.corpus_cache import TokenizedCorpus
from llama_jax.train.data import prepare_data
from llama_jax.train.examples import encode_example

# Three documents [BOS ... EOS] in one stream: 5 + 4 + 6 tokens.
STREAM = np.array([1, 10, 11, 12, 2, 1, 20, 21, 2, 1, 30, 31, 32, 33, 2], np.uint16)
STARTS = np.array([0, 5, 9, 15])


def corpus(weights=None):
    return TokenizedCorpus(STREAM, STARTS, None if weights is None else np.asarray(weights, np.uint8), "k")


def test_pretraining_windows_pack_documents_with_segments_positions_and_mask():
    rows = PackedRows(corpus(), seq_len=4, pad_id=0, whole_documents=False, val_fraction=0.3)
    assert (rows.n_rows, rows.n_train, rows.n_val) == (3, 2, 1)
    got = rows.arrays(np.array([0, 1, 2]))
    # row r is stream[4r : 4r + 5]; inputs its first 4 tokens, targets its last 4
    np.testing.assert_array_equal(got["inputs"], [[1, 10, 11, 12], [2, 1, 20, 21], [2, 1, 30, 31]])
    np.testing.assert_array_equal(got["targets"], [[10, 11, 12, 2], [1, 20, 21, 2], [1, 30, 31, 32]])
    np.testing.assert_array_equal(got["segments"], [[1, 1, 1, 1], [1, 2, 2, 2], [1, 2, 2, 2]])
    np.testing.assert_array_equal(got["positions"], [[0, 1, 2, 3], [0, 0, 1, 2], [0, 0, 1, 2]])
    # EOS -> next document's BOS is no prediction to learn
    np.testing.assert_array_equal(got["loss_mask"], [[1, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1]])


def test_sft_rows_hold_whole_examples_padded_and_mask_the_prompt():
    weights = [0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1]  # prompt tokens 0, response tokens 1
    rows = PackedRows(corpus(weights), seq_len=6, pad_id=0, whole_documents=True, val_fraction=0.3)
    got = rows.arrays(np.array([0, 1, 2, -1]))
    np.testing.assert_array_equal(
        got["inputs"], [[1, 10, 11, 12, 2, 0], [1, 20, 21, 2, 0, 0], [1, 30, 31, 32, 33, 2], [0] * 6]
    )
    np.testing.assert_array_equal(got["segments"], [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1] * 6, [0] * 6])
    np.testing.assert_array_equal(
        got["loss_mask"], [[0, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0], [0] * 6]
    )
    two_fit = PackedRows(corpus(weights), seq_len=9, pad_id=0, whole_documents=True, val_fraction=0.3)
    np.testing.assert_array_equal(two_fit.arrays(np.array([0]))["segments"], [[1, 1, 1, 1, 1, 2, 2, 2, 2]])


def test_sft_packing_counts_what_it_cuts_and_refuses_rows_with_nothing_to_learn():
    weights = [0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1]
    whole = PackedRows(corpus(weights), seq_len=6, pad_id=0, whole_documents=True, val_fraction=0.3)
    assert whole.supervision == {
        "examples": 3,
        "longer_than_a_row": 0,
        "targets": 8,
        "train_targets": 5,
        "validation_targets": 3,
    }
    # Rows of 4 tokens cut the 5- and 6-token examples: their last targets are gone, and said to be.
    cut = PackedRows(corpus(weights), seq_len=3, pad_id=0, whole_documents=True, val_fraction=0.3)
    assert (cut.supervision["longer_than_a_row"], cut.supervision["train_targets"]) == (2, 4)
    assert cut.supervision["validation_targets"] == 1
    assert cut.supervised_tokens(np.array([0, 1, 2])) == sum(cut.arrays(np.array([0, 1, 2]))["loss_mask"].ravel())
    assert "2 of 3 examples are longer than a row of 4 tokens and cut short, 3 of their 8 response tokens dropped" in (
        cut.describe_supervision()
    )
    # Rows of 3 tokens keep only prompts: a38b2de trained on them with loss 0.0 over 0 tokens, exit 0.
    with pytest.raises(ValueError, match="no training row holds a response token to learn: 3 of 3 examples"):
        late = [0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1]  # each response in the example's last tokens
        PackedRows(corpus(late), seq_len=2, pad_id=0, whole_documents=True, val_fraction=0.3)
    assert PackedRows(corpus(), seq_len=4, pad_id=0, whole_documents=False, val_fraction=0.3).supervision is None


def test_batches_are_a_pure_function_of_seed_and_step():
    rows = PackedRows(
        TokenizedCorpus(np.zeros(38 * 4 + 1, np.uint16), np.array([0, 38 * 4 + 1]), None, "k"),
        seq_len=4,
        pad_id=0,
        whole_documents=False,
        val_fraction=0.01,
    )
    assert rows.n_train == 37  # not a power of two: the permutation must walk cycles
    epoch = np.concatenate([rows.train_rows(step, 1, seed=3) for step in range(37)])
    assert sorted(epoch.tolist()) == list(range(37))  # every row once per epoch
    again = np.concatenate([rows.train_rows(step, 1, seed=3) for step in range(37)])
    np.testing.assert_array_equal(epoch, again)
    np.testing.assert_array_equal(rows.train_rows(5, 8, seed=3)[:1], rows.train_rows(40, 1, seed=3))
    assert not np.array_equal(epoch, np.concatenate([rows.train_rows(s, 1, seed=4) for s in range(37)]))
    second_epoch = np.concatenate([rows.train_rows(step, 1, seed=3) for step in range(37, 74)])
    assert sorted(second_epoch.tolist()) == list(range(37)) and not np.array_equal(epoch, second_epoch)
    big = feistel_permutation(np.arange(100_003), 100_003, key=7)
    assert len(np.unique(big)) == 100_003 and big.min() == 0 and big.max() == 100_002


def test_validation_rows_are_disjoint_and_padded():
    rows = PackedRows(corpus(), seq_len=2, pad_id=0, whole_documents=False, val_fraction=0.3)
    (val,) = rows.val_rows(batch_size=4, n_batches=5)
    train = {int(r) for s in range(20) for r in rows.train_rows(s, 3, seed=0)}
    assert train == set(range(rows.n_train)) and val.tolist() == [5, 6, -1, -1]
    assert rows.arrays(val)["loss_mask"][2:].sum() == 0


def test_each_host_slice_assembles_the_global_batch():
    rows = PackedRows(corpus(), seq_len=4, pad_id=0, whole_documents=False, val_fraction=0.3)
    mesh = make_mesh(MeshConfig(data=2))
    ids = np.array([[0, 1], [2, 1]])  # (grad_accum, micro_batch)
    batch = global_batch(rows, ids, mesh)
    expected = rows.arrays(ids)
    for name, array in batch.items():
        np.testing.assert_array_equal(np.asarray(array), expected[name])
        shards = sorted(array.addressable_shards, key=lambda s: s.index[1].start)
        assert [s.data.shape for s in shards] == [(2, 1, 4)] * 2  # rows split over the data axis
    assert batch["inputs"].sharding.spec[1] in ("data", ("data",))


def _config(tmp_path, data, *extra):
    return load_train_config(
        None, [f"data={data}", f"data_cache={tmp_path / 'cache'}", "seq_len=16", "tokenizer=train:400", *extra]
    )


CHINESE = (
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。" * 3
    + "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。" * 3
    + "The moon is bright tonight.\n"
)


def test_trained_tokenizer_round_trips_chinese_text_through_the_pipeline(tmp_path):
    path = tmp_path / "poems.jsonl"
    texts = [CHINESE, "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。", "A rare one: 龘 and an emoji 🙂 too."]
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts * 4))
    prepared = prepare_data(_config(tmp_path, path, "tokenizer=train:400"), None)
    assert prepared.tokenizer.vocab_size == 400
    tokens, starts = np.asarray(prepared.corpus.tokens), prepared.corpus.starts
    assert len(starts) == 13
    for doc, text in enumerate(texts):
        ids = tokens[starts[doc] : starts[doc + 1]].tolist()
        assert ids[0] == prepared.tokenizer.bos_id and ids[-1] == prepared.tokenizer.eos_id
        assert prepared.tokenizer.decode(ids) == text


def test_tokenized_corpus_is_cached_by_content(tmp_path, assets, monkeypatch):
    path = tmp_path / "story.txt"
    path.write_text((assets / "tinystories_sample.txt").read_text())
    tokenizer = assets / "tok512.bin"
    first = prepare_data(_config(tmp_path, path, f"tokenizer={tokenizer}"), None)
    expected = load_tokenizer(tokenizer).encode(path.read_text(), bos=True, eos=True)
    assert np.asarray(first.corpus.tokens).tolist() == expected
    monkeypatch.setattr(
        "llama_jax.train.corpus_cache._build_entry", lambda *a: pytest.fail("re-tokenized a cached corpus")
    )
    moved = tmp_path / "moved.txt"
    moved.write_text(path.read_text())
    assert prepare_data(_config(tmp_path, moved, f"tokenizer={tokenizer}"), None).corpus.key == first.corpus.key
    monkeypatch.undo()
    path.write_text(path.read_text() + " The end.")
    assert prepare_data(_config(tmp_path, path, f"tokenizer={tokenizer}"), None).corpus.key != first.corpus.key


def test_sft_loss_mask_covers_exactly_the_response(tmp_path, llama2_tokenizer_file):
    tokenizer = load_tokenizer(llama2_tokenizer_file)
    path = tmp_path / "sft.jsonl"
    records = [
        ("What is two plus two?", "Four."),
        ("Name a colour.", "Blue, like the sea."),
        ("Say hi.", "Hi!"),
        ("Count to three.", "One, two, three."),
    ]
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in records))
    config = _config(tmp_path, path, "sft=true", f"tokenizer={llama2_tokenizer_file}")
    for template in (None, "llama2"):
        rows = PackedRows(
            prepare_data(config, template).corpus, 30, tokenizer.pad_id, whole_documents=True, val_fraction=0.3
        )
        got = rows.arrays(np.arange(rows.n_rows))
        examples = []  # (inputs, learned targets) of each packed example, in order
        for r in range(rows.n_rows):
            for segment in range(1, got["segments"][r].max() + 1):
                inside = got["segments"][r] == segment
                learned = inside & (got["loss_mask"][r] > 0)
                first_learned = int(np.argmax(learned[inside]))  # the input whose target starts the response
                examples.append((got["inputs"][r][inside].tolist(), got["targets"][r][learned].tolist(), first_learned))
        assert len(examples) == len(records)
        for (prompt, response), (inputs, learned, first_learned) in zip(records, examples):
            assert learned == tokenizer.encode(response, bos=False) + [tokenizer.eos_id]
            prompt_ids = (
                tokenizer.encode(prompt, bos=True)
                if template is None
                else encode_dialog(tokenizer, "llama2", [{"role": "user", "content": prompt}])
            )
            assert inputs[: len(prompt_ids)] == prompt_ids and first_learned == len(prompt_ids) - 1


def test_llama3_sft_responses_end_with_end_of_turn(llama3_tok):
    tokenizer = llama3_tok
    ids, weights = encode_example(tokenizer, "Hi", "Hello there.", "llama3")
    prompt = encode_dialog(tokenizer, "llama3", [{"role": "user", "content": "Hi"}])
    assert ids[: len(prompt)] == prompt and weights == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    assert ids[len(prompt) :] == tokenizer.encode("Hello there.", bos=False) + [tokenizer.special_id("<|eot_id|>")]


@pytest.mark.parametrize(
    "content, extra, error, message",
    [
        (None, [], FileNotFoundError, "no data file matches"),
        ("", [], ValueError, "cannot train a tokenizer on an empty corpus"),
        ("\n \n", ["tokenizer=ASSET"], ValueError, "the corpus holds no text"),
        (
            '{"text": "fine"}\n{"txt": "oops"}\n',
            [],
            ValueError,
            'corpus.jsonl:2: the "text" field is missing; expected a JSON object with a string "text"',
        ),
        ('{"text": "fine"}\nnot json\n', [], ValueError, "corpus.jsonl:2: not valid JSON"),
        ('{"prompt": "p"}\n', ["sft=true", "tokenizer=ASSET"], ValueError, 'needs string "prompt" and "response"'),
    ],
)
def test_bad_corpora_are_clear_errors(tmp_path, assets, content, extra, error, message):
    path = tmp_path / ("corpus.jsonl" if content and content.startswith("{") else "corpus.txt")
    if content is not None:
        path.write_text(content)
    extra = [e.replace("ASSET", str(assets / "tok512.bin")) for e in extra]
    with pytest.raises(error, match=message):
        prepare_data(_config(tmp_path, path, *extra), None)


def test_corpus_too_small_for_seq_len():
    with pytest.raises(ValueError, match="too small for seq_len 16"):
        PackedRows(corpus(), seq_len=16, pad_id=0, whole_documents=False, val_fraction=0.1)
