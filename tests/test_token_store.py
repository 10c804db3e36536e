"""The pod data path: a tokenized corpus in a tensorstore token store (the file and memory drivers stand in for
gs://, through the same code) gives exactly the batches of the local cache, reads only the rows asked for,
and nothing at start; a store is never written over, and a run that does not match it is refused."""

import json

import numpy as np
import pytest

from llama_jax.sharding import MeshConfig, make_mesh
from llama_jax.train import token_store
from llama_jax.train.batching import PackedRows, global_batch
from llama_jax.train.config import load_train_config
from llama_jax.train.data import build_token_store, prepare_data
from llama_jax.train.token_store import StoreCorpus


def settings(tmp_path, data, *extra):
    return load_train_config(None, [f"data={data}", f"data_cache={tmp_path / 'cache'}", "seq_len=16", *extra])


@pytest.fixture(scope="module")
def stories(tmp_path_factory, assets):
    folder = tmp_path_factory.mktemp("stories")
    text = (assets / "tinystories_sample.txt").read_text()
    (folder / "stories.txt").write_text(text)
    (folder / "sft.jsonl").write_text(
        "".join(
            json.dumps({"prompt": f"Story {i}?", "response": line}) + "\n"
            for i, line in enumerate(text.splitlines()[:40])
            if line.strip()
        )
    )
    return folder


@pytest.mark.parametrize("sft", [False, True], ids=["pretraining", "sft"])
@pytest.mark.parametrize("location", ["file", "memory"])
def test_a_store_gives_the_batches_of_the_local_cache(tmp_path, stories, assets, location, sft):
    files = stories / ("sft.jsonl" if sft else "stories.txt")
    extra = [f"tokenizer={assets / 'tok512.bin'}", f"sft={str(sft).lower()}", "doc_separator=null"]
    local = prepare_data(settings(tmp_path, files, *extra), None)
    url = (tmp_path / "store").as_uri() if location == "file" else f"memory://stores/{tmp_path.name}-{sft}"
    summary = build_token_store(settings(tmp_path, files, *extra), None, url)
    assert summary["tokens"] == local.corpus.n_tokens and summary["key"] == local.corpus.key

    from_store = prepare_data(settings(tmp_path, url, f"sft={str(sft).lower()}"), None)
    assert from_store.corpus.key == local.corpus.key  # the run fingerprint, without hashing anything
    assert from_store.tokenizer_path.read_bytes() == (assets / "tok512.bin").read_bytes()
    mine = PackedRows(local.corpus, 16, 0, sft, 0.1)
    theirs = PackedRows(from_store.corpus, 16, 0, sft, 0.1)
    assert (mine.n_train, mine.n_val) == (theirs.n_train, theirs.n_val)
    ids = np.concatenate([mine.train_rows(step, 8, seed=1) for step in range(12)] + mine.val_rows(8, 2) + [[-1]])
    for field, expected in mine.arrays(ids).items():
        np.testing.assert_array_equal(theirs.arrays(ids)[field], expected, err_msg=field)


def test_hosts_read_only_their_rows_and_nothing_at_start(tmp_path, stories, assets, monkeypatch):
    url = f"memory://stores/{tmp_path.name}-reads"
    build_token_store(settings(tmp_path, stories / "stories.txt", f"tokenizer={assets / 'tok512.bin'}"), None, url)
    reads = []
    real_read = token_store._read_rows
    monkeypatch.setattr(
        token_store,
        "_read_rows",
        lambda a, start, end, width: (
            reads.append((a.shape[0], list(zip(start.tolist(), end.tolist())))) or real_read(a, start, end, width)
        ),
    )
    data = prepare_data(settings(tmp_path, url), None)
    rows = PackedRows(data.corpus, 16, 0, False, 0.1)
    assert reads == []  # opening the store and splitting it read no tokens
    mesh = make_mesh(MeshConfig(data=2))
    ids = rows.train_rows(3, 4, seed=0).reshape(1, 4)
    global_batch(rows, ids, mesh)
    [(size, ranges)] = reads
    assert size == data.corpus.n_tokens and sorted(ranges) == sorted((16 * r, 16 * r + 17) for r in ids[0])


def test_a_store_is_never_written_over_and_must_match_the_run(tmp_path, stories, assets):
    other_tokenizer = tmp_path / "other.bin"
    data = bytearray((assets / "tok512.bin").read_bytes())
    data[-1] ^= 1  # another tokenizer file (its last piece's last byte differs)
    other_tokenizer.write_bytes(bytes(data))
    tokenizer = f"tokenizer={assets / 'tok512.bin'}"
    config = settings(tmp_path, stories / "stories.txt", tokenizer)
    url = (tmp_path / "store").as_uri()
    build_token_store(config, None, url)
    before = sorted(p.name for p in (tmp_path / "store").iterdir())
    with pytest.raises(ValueError, match="already holds a token store"):
        build_token_store(config, None, url)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="already holds notes.txt"):
        build_token_store(config, None, (tmp_path / "mine").as_uri())
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == before
    store = str(tmp_path / "store")  # a local directory holding a store is one too
    with pytest.raises(ValueError, match="was tokenized with another tokenizer"):
        prepare_data(settings(tmp_path, store, f"tokenizer={other_tokenizer}"), None)
    with pytest.raises(ValueError, match="was tokenized with"):
        prepare_data(settings(tmp_path, store, "sft=true"), None)
    with pytest.raises(ValueError, match="holds no finished token store"):
        StoreCorpus.open((tmp_path / "mine").as_uri())
