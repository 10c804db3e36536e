"""The corpus a run trains on: its files tokenized once through the cache, or a token store, and the tokenizer.

    data = prepare_data(config, chat_template)   # PreparedData(tokenizer, tokenizer_path, corpus)

The files and their records are read by `sources.py`, SFT and preference records become examples in
`examples.py`, and the tokenized corpus is an entry of this host's cache (`corpus_cache.py`) or, for pods, a
token store (`token_store.py`). `tokenizer=train:VOCAB` trains a SentencePiece tokenizer on the corpus first,
cached under the texts' hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from llama_jax.errors import errors_naming
from llama_jax.staging import staged_output_dir
from llama_jax.tokenizers import Tokenizer, load_tokenizer
from llama_jax.tokenizers.training import train_sentencepiece
from llama_jax.train.config import TrainConfig
from llama_jax.train.corpus_cache import TokenizedCorpus, corpus_key, tokenize_corpus
from llama_jax.train.examples import dpo_examples, sft_examples
from llama_jax.train.sources import corpus_hash, data_files, documents, dpo_records, sft_texts
from llama_jax.train.token_store import StoreCorpus, store_url, write_store

TRAINED_TOKENIZER_FILE = "tokenizer.model"


@dataclasses.dataclass(frozen=True)
class PreparedData:
    tokenizer: Tokenizer
    tokenizer_path: Path
    corpus: TokenizedCorpus | StoreCorpus


def prepare_data(config: TrainConfig, chat_template: str | None) -> PreparedData:
    """Tokenize the configured corpus (or find it in the cache) with `config.tokenizer`: a file, or
    train:VOCAB to train one on the corpus first. A token store (`data=gs://...`) is opened instead."""
    cache_dir = Path(os.path.expanduser(config.data_cache))
    url = store_url(config.data)
    if url is not None:
        return _open_store(url, config, chat_template, cache_dir)
    files = data_files(config.data)
    raw_key = corpus_hash(files)

    def texts() -> Iterator[str]:
        if config.objective == "dpo":
            return (text for _, *texts in dpo_records(files) for text in texts)
        return sft_texts(files) if config.sft else documents(files, config.doc_separator)

    if config.trained_vocab_size is not None:
        texts_key = hashlib.sha256(f"{raw_key}|{config.sft}|{config.doc_separator}".encode()).hexdigest()
        tokenizer_path = trained_tokenizer(texts(), config.trained_vocab_size, texts_key, cache_dir)
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        tokenizer_path, tokenizer = named_tokenizer(config)
    key = corpus_key(raw_key, tokenizer_path, corpus_options(config, chat_template))
    if config.objective == "dpo":
        examples = dpo_examples(tokenizer, files, chat_template)
    elif config.sft:
        examples = sft_examples(tokenizer, files, chat_template)
    else:
        examples = ((tokenizer.encode(text, bos=True, eos=True), None) for text in texts() if text.strip())
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    return PreparedData(tokenizer, tokenizer_path, tokenize_corpus(examples, key, cache_dir, dtype))


def named_tokenizer(config: TrainConfig) -> tuple[Path, Tokenizer]:
    """The tokenizer file `config.tokenizer` names (init_from's, resolved), and the tokenizer: one clear error for
    a missing file."""
    path = Path(config.tokenizer)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return path, load_tokenizer(path)


def corpus_options(config: TrainConfig, chat_template: str | None) -> dict:
    """The settings that change the tokens of a corpus."""
    options = {"sft": config.sft, "chat_template": chat_template, "doc_separator": config.doc_separator}
    # Only preference corpora say so: the keys of every other corpus stay those they were cached under.
    return options | ({"objective": "dpo"} if config.objective == "dpo" else {})


def build_token_store(config: TrainConfig, chat_template: str | None, url: str) -> dict:
    """Tokenize the configured files (through this host's cache) into a new token store at `url`."""
    if store_url(config.data) is not None:
        raise ValueError(f"data {config.data} is a token store already")
    data = prepare_data(config, chat_template)
    corpus = data.corpus
    write_store(
        url,
        corpus.tokens,
        corpus.starts,
        corpus.weights,
        data.tokenizer,
        corpus.key,
        corpus_options(config, chat_template),
    )
    return {"token_store": url, "tokens": corpus.n_tokens, "documents": len(corpus.starts) - 1, "key": corpus.key}


def _open_store(url: str, config: TrainConfig, chat_template: str | None, cache_dir: Path) -> PreparedData:
    """A token store's corpus, and its tokenizer copied into the cache (run directories keep a copy)."""
    corpus = StoreCorpus.open(url)
    options = corpus_options(config, chat_template)
    if corpus.meta["options"] != options:
        raise ValueError(f"{url} was tokenized with {corpus.meta['options']}, this run asks for {options}")
    stored = corpus.tokenizer_bytes()
    if config.trained_vocab_size is not None:
        raise ValueError(f"{url} holds its own tokenizer: drop tokenizer={config.tokenizer}")
    if config.tokenizer is not None and Path(config.tokenizer).read_bytes() != stored:
        raise ValueError(f"{url} was tokenized with another tokenizer than {config.tokenizer}")
    entry = cache_dir / f"store-tokenizer-{hashlib.sha256(stored).hexdigest()[:24]}"
    if not entry.is_dir():
        with staged_output_dir(entry, keep_existing=True) as staging, errors_naming(entry):
            (staging / corpus.meta["tokenizer"]).write_bytes(stored)
    path = entry / corpus.meta["tokenizer"]
    return PreparedData(load_tokenizer(path), path, corpus)


def trained_tokenizer(texts: Iterable[str], vocab_size: int, texts_key: str, cache_dir: Path) -> Path:
    """A SentencePiece model trained on `texts`, cached under their hash. Training is deterministic, so
    every host of a job and every rerun gets the same file."""
    entry = cache_dir / f"tokenizer-{texts_key[:24]}-{vocab_size}"
    if not entry.is_dir():
        with staged_output_dir(entry, keep_existing=True) as staging, errors_naming(entry):
            train_sentencepiece(texts, vocab_size, staging / TRAINED_TOKENIZER_FILE)
    return entry / TRAINED_TOKENIZER_FILE
