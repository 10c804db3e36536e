"""A corpus on disk, tokenized once: text files, globs or JSONL → one flat token array, cached by content.

Pretraining reads text files (one document each, or split at a separator) and JSONL `{"text": ...}` records.
Supervised fine-tuning (SFT) reads JSONL prompt/response records:

    {"prompt": "What is the capital of France?", "response": "Paris."}

Direct Preference Optimization (`objective=dpo`) reads JSONL preference records:

    {"prompt": "Is this a question? ...", "chosen": "Yes", "rejected": "No"}

each becoming two consecutive documents, prompt + chosen then prompt + rejected, encoded as SFT examples are.

Without a chat template an SFT example is BOS + prompt + response + EOS, the text simply continued. With one
("llama2", "llama3") the prompt is the user's message in that template, exactly as `infer.py --chat`
builds it, and the response ends with the template's end-of-turn token, which the model must learn to
emit. Prompt tokens get weight 0, response tokens (and the end token) weight 1.

The cache entry of a corpus:

    tokens   [BOS doc0 EOS][BOS doc1 EOS]...   uint16 (uint32 for vocabularies over 65536)
    starts   offset of each document's first token, then the total length
    weights  (SFT only) 1 where a token is a training target: the response, not the prompt

The arrays are raw files (tokens.bin, weights.bin; dtype and sizes in meta.json) read through `np.memmap`:
a batch reads only the rows it needs, the operating system's page cache shares them between the processes
of a host, they are written in one streaming pass, and nothing beyond numpy is needed to inspect them.
(A tensorstore/zarr array would add chunked compression, which token ids barely benefit from, and a chunk
lookup to every random read.)

The cache key hashes the corpus bytes, the tokenizer file and the options that change the tokens, so a
changed file is re-tokenized and an unchanged one never is. Entries are assembled in a temporary directory
and renamed into place: a killed tokenization leaves nothing that looks complete. meta.json keeps a CRC-32 of
every 16 MiB of tokens.bin and weights.bin and of starts.npy; every run checks them before reading (about a
second per GB), and an entry that fails (cut short, bytes changed) is reported and built again, never read.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from llama_jax.chat import encode_dialog, end_of_turn
from llama_jax.staging import staged_output_dir
from llama_jax.tokenizers import Tokenizer, load_tokenizer
from llama_jax.tokenizers.training import train_sentencepiece
from llama_jax.train.config import TrainConfig
from llama_jax.train.token_store import StoreCorpus, store_url, write_store

CACHE_FORMAT = 3  # 3: meta.json holds the files' checksums
CHECKED_BYTES = 16 << 20  # the cache's files are checksummed this many bytes at a time
log = logging.getLogger("llama_jax")
BUNDLED_DATA = Path(__file__).resolve().parents[1] / "data"
TRAINED_TOKENIZER_FILE = "tokenizer.model"

Example = tuple[list[int], list[int] | None]  # token ids (BOS/EOS included), target weights or None


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
    """A corpus in this host's cache. `batching.PackedRows` reads it through the methods below, which a
    token store (`token_store.StoreCorpus`) implements too."""

    tokens: np.ndarray  # (n_tokens,) uint16/uint32, memory-mapped
    starts: np.ndarray  # (n_docs + 1,) int64
    weights: np.ndarray | None  # (n_tokens,) uint8, or None: every token is a target
    key: str  # content hash of corpus, tokenizer and options

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def read_rows(self, start: np.ndarray, end: np.ndarray, width: int) -> np.ndarray:
        """(rows, width): tokens [start, start + width) of each row; what lies at or beyond `end` is junk."""
        return self.tokens[np.minimum(start[:, None] + np.arange(width), end[:, None] - 1)]

    def read_weights(self, start: np.ndarray, end: np.ndarray, width: int) -> np.ndarray | None:
        if self.weights is None:
            return None
        return self.weights[np.minimum(start[:, None] + np.arange(width), end[:, None] - 1)]

    def document_starts(self, index: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """True where a document starts, for token positions `index` (their ids `tokens` unused here)."""
        found = np.minimum(np.searchsorted(self.starts, index), len(self.starts) - 1)
        return self.starts[found] == index


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
    else:
        tokenizer_path = Path(config.tokenizer)
        if not tokenizer_path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {tokenizer_path}")
    tokenizer = load_tokenizer(tokenizer_path)
    key = _corpus_key(raw_key, tokenizer_path, corpus_options(config, chat_template))
    if config.objective == "dpo":
        examples = dpo_examples(tokenizer, files, chat_template)
    elif config.sft:
        examples = sft_examples(tokenizer, files, chat_template)
    else:
        examples = ((tokenizer.encode(text, bos=True, eos=True), None) for text in texts() if text.strip())
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    return PreparedData(tokenizer, tokenizer_path, tokenize_corpus(examples, key, cache_dir, dtype))


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
        with staged_output_dir(entry, keep_existing=True) as staging:
            (staging / corpus.meta["tokenizer"]).write_bytes(stored)
    path = entry / corpus.meta["tokenizer"]
    return PreparedData(load_tokenizer(path), path, corpus)


def data_files(spec: str) -> list[Path]:
    """The files of a comma-separated list of paths and globs, each glob sorted, duplicates dropped. A name that
    matches nothing here but a file of llama_jax/data/ is that bundled file (the default corpus)."""
    files: list[Path] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        matches = sorted(glob.glob(os.path.expanduser(part), recursive=True))
        if not matches and (BUNDLED_DATA / part).is_file():
            matches = [str(BUNDLED_DATA / part)]
        if not matches:
            raise FileNotFoundError(f"no data file matches {part}")
        for match in map(Path, matches):
            if match.is_dir():
                raise ValueError(f"data {match} is a directory; name its files, e.g. {match}/*.txt")
            if match not in files:
                files.append(match)
    return files


def corpus_hash(files: list[Path]) -> str:
    """sha256 of the files' kinds and contents (not their names: a moved corpus is the same corpus)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(b"jsonl" if is_jsonl(path) else b"text")
        digest.update(path.stat().st_size.to_bytes(8, "little"))
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _corpus_key(raw_key: str, tokenizer_path: Path, options: dict) -> str:
    digest = hashlib.sha256(f"{CACHE_FORMAT}|{raw_key}|{json.dumps(options, sort_keys=True)}|".encode())
    digest.update(tokenizer_path.read_bytes())
    return digest.hexdigest()


def is_jsonl(path: Path) -> bool:
    return path.suffix.lower() == ".jsonl"


def documents(files: list[Path], doc_separator: str | None = None) -> Iterator[str]:
    """Pretraining documents: a text file is one document (or several, split at `doc_separator`); a
    JSONL file holds one {"text": ...} record per line."""
    for path in files:
        if is_jsonl(path):
            for where, record in jsonl_records(path):
                if not isinstance(record.get("text"), str):
                    raise ValueError(f'{where}: expected a JSON object with a string "text" field')
                yield record["text"]
        else:
            text = path.read_text(encoding="utf-8")
            yield from text.split(doc_separator) if doc_separator else [text]


def jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    """("file:line", object) for each non-empty line of a JSONL file; one clear error for a bad line."""
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object")
            yield where, record


def trained_tokenizer(texts: Iterable[str], vocab_size: int, texts_key: str, cache_dir: Path) -> Path:
    """A SentencePiece model trained on `texts`, cached under their hash. Training is deterministic, so
    every host of a job and every rerun gets the same file."""
    entry = cache_dir / f"tokenizer-{texts_key[:24]}-{vocab_size}"
    if not entry.is_dir():
        with staged_output_dir(entry, keep_existing=True) as staging:
            train_sentencepiece(texts, vocab_size, staging / TRAINED_TOKENIZER_FILE)
    return entry / TRAINED_TOKENIZER_FILE


def tokenize_corpus(examples: Iterable[Example], key: str, cache_dir: Path, dtype=np.uint16) -> TokenizedCorpus:
    """The cached corpus for `key`, built from `examples` when it is not cached yet. Documents with no
    text (only BOS and EOS) are dropped; a corpus with none left is an error."""
    entry = cache_dir / f"tokens-{key[:24]}"
    problem = _entry_problem(entry) if (entry / "meta.json").is_file() else None
    if problem is not None:
        log.warning("the tokenized corpus %s is damaged (%s): tokenizing it again", entry, problem)
        shutil.rmtree(entry, ignore_errors=True)
    if not (entry / "meta.json").is_file():
        _build_entry(examples, entry, dtype)
        problem = _entry_problem(entry)
        if problem is not None:  # written and at once unreadable: the disk, not the data
            raise ValueError(f"the tokenized corpus {entry} cannot be read back as written: {problem}")
    meta = json.loads((entry / "meta.json").read_text())
    weights = entry / "weights.bin"
    return TokenizedCorpus(
        tokens=np.memmap(entry / "tokens.bin", dtype=meta["dtype"], mode="r"),
        starts=np.load(entry / "starts.npy"),
        weights=np.memmap(weights, dtype=np.uint8, mode="r") if weights.is_file() else None,
        key=key,
    )


def _build_entry(examples: Iterable[Example], entry: Path, dtype) -> None:
    with staged_output_dir(entry, keep_existing=True) as staging:
        starts = [0]
        with open(staging / "tokens.bin", "wb") as tokens, open(staging / "weights.bin", "wb") as weights:
            for ids, target_weights in examples:
                if len(ids) <= 2:
                    continue
                tokens.write(np.asarray(ids, dtype).tobytes())
                if target_weights is not None:
                    weights.write(np.asarray(target_weights, np.uint8).tobytes())
                starts.append(starts[-1] + len(ids))
        if len(starts) == 1:
            raise ValueError("the corpus holds no text: every document is empty")
        if (staging / "weights.bin").stat().st_size == 0:  # pretraining: every token is a target
            os.remove(staging / "weights.bin")
        np.save(staging / "starts.npy", np.asarray(starts, np.int64))
        meta = {
            "format": CACHE_FORMAT,
            "dtype": np.dtype(dtype).name,
            "tokens": starts[-1],
            "documents": len(starts) - 1,
            "checksums": {name: _chunk_crcs(staging / name) for name in _ENTRY_FILES if (staging / name).is_file()},
        }
        (staging / "meta.json").write_text(json.dumps(meta) + "\n")


_ENTRY_FILES = ("tokens.bin", "weights.bin", "starts.npy")


def _chunk_crcs(path: Path) -> list[int]:
    """CRC-32 of each CHECKED_BYTES of `path` (an empty file: none)."""
    crcs = []
    with open(path, "rb") as f:
        while chunk := f.read(CHECKED_BYTES):
            crcs.append(zlib.crc32(chunk))
    return crcs


def _entry_problem(entry: Path) -> str | None:
    """Why a cache entry cannot be read as the corpus it was built from, or None."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        checksums = meta["checksums"]
        itemsize = np.dtype(meta["dtype"]).itemsize
        expected_sizes = {"tokens.bin": meta["tokens"] * itemsize, "weights.bin": meta["tokens"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"meta.json is unreadable: {e}"
    if meta.get("format") != CACHE_FORMAT:
        return f"it was written in cache format {meta.get('format')}, not {CACHE_FORMAT}"
    for name, crcs in checksums.items():
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if name in expected_sizes and size != expected_sizes[name]:
            return f"{name} holds {size} bytes, not {expected_sizes[name]}"
        if _chunk_crcs(path) != crcs:
            return f"{name} changed since it was written"
    if "starts.npy" not in checksums or "tokens.bin" not in checksums:
        return "its checksums are incomplete"
    return None


def sft_records(files: list[Path]) -> Iterator[tuple[str, str, str]]:
    """(where, prompt, response) for every record; one clear error for a file or record of another shape."""
    for path in files:
        if not is_jsonl(path):
            raise ValueError(f'SFT data must be JSONL files of {{"prompt": ..., "response": ...}} records; got {path}')
        for where, record in jsonl_records(path):
            prompt, response = record.get("prompt"), record.get("response")
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise ValueError(f'{where}: an SFT record needs string "prompt" and "response" fields')
            yield where, prompt, response


def sft_texts(files: list[Path]) -> Iterator[str]:
    """The texts of all records (to train a tokenizer on)."""
    for _, prompt, response in sft_records(files):
        yield prompt
        yield response


def encode_example(
    tokenizer: Tokenizer, prompt: str, response: str, chat_template: str | None
) -> tuple[list[int], list[int]]:
    """(ids, weights): weights are 1 on the tokens the model learns to produce."""
    if chat_template is None:
        prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
        response_ids = tokenizer.encode(response, bos=False, eos=True)
    else:
        prompt_ids = encode_dialog(tokenizer, chat_template, [{"role": "user", "content": prompt}])
        end = end_of_turn(tokenizer, chat_template)
        response_ids = tokenizer.encode(response.strip(), bos=False, eos=False) + [end]
    return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)


def sft_examples(
    tokenizer: Tokenizer, files: list[Path], chat_template: str | None
) -> Iterator[tuple[list[int], list[int]]]:
    for where, prompt, response in sft_records(files):
        if not response.strip():
            raise ValueError(f"{where}: the response is empty, nothing to learn from")
        yield encode_example(tokenizer, prompt, response, chat_template)


def dpo_records(files: list[Path]) -> Iterator[tuple[str, str, str, str]]:
    """(where, prompt, chosen, rejected) for every preference record; one clear error for anything else."""
    for path in files:
        if not is_jsonl(path):
            raise ValueError(
                f'DPO data must be JSONL files of {{"prompt": ..., "chosen": ..., "rejected": ...}} records; got {path}'
            )
        for where, record in jsonl_records(path):
            fields = [record.get(name) for name in ("prompt", "chosen", "rejected")]
            if not all(isinstance(field, str) for field in fields):
                raise ValueError(f'{where}: a DPO record needs string "prompt", "chosen" and "rejected" fields')
            if not fields[1].strip() or not fields[2].strip():
                raise ValueError(f"{where}: the chosen or the rejected response is empty")
            yield where, *fields


def dpo_examples(
    tokenizer: Tokenizer, files: list[Path], chat_template: str | None
) -> Iterator[tuple[list[int], list[int]]]:
    """Two examples per record, the chosen one first: consecutive documents of the corpus, one row each."""
    for _, prompt, chosen, rejected in dpo_records(files):
        yield encode_example(tokenizer, prompt, chosen, chat_template)
        yield encode_example(tokenizer, prompt, rejected, chat_template)
