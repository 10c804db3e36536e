"""Train a new SentencePiece BPE tokenizer with the settings of the LLaMA 1/2 tokenizer.

Byte fallback makes every UTF-8 text encodable (characters never seen in training become byte tokens),
and identity normalization without whitespace cleanup makes decode(encode(text)) == text exactly.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm


def _lines(corpus: Iterable[Path | str]) -> Iterator[str]:
    # SentencePiece trains on lines (empty ones are useless); newlines are encoded through byte fallback.
    for item in corpus:
        text = item.read_text(encoding="utf-8") if isinstance(item, Path) else item
        yield from filter(None, text.splitlines())


def train_sentencepiece(corpus: Iterable[Path | str], vocab_size: int, out_path: Path | str) -> Path:
    """Train a BPE model of `vocab_size` pieces on `corpus` and write it to `out_path`.

    `corpus` items are UTF-8 text files (`Path`) or texts (`str`), read lazily in order. Ids follow
    LLaMA: <unk>=0, <s>=1, </s>=2, no pad piece, then the 256 byte pieces. The same corpus gives the
    same file. Raises ValueError when the corpus is empty or too small for `vocab_size`.
    """
    lines = _lines(corpus)
    first_line = next(lines, None)
    if first_line is None:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    # SentencePiece pulls the lines from C++ and turns an error raised while reading them (a bad record of the
    # corpus, which names its file and line) into "INTERNAL: ValueError: ...": it is kept to be raised as is.
    reading_failed: list[Exception] = []

    def sentences() -> Iterator[str]:
        try:
            yield first_line
            yield from lines
        except Exception as e:
            reading_failed.append(e)
            raise

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=0.9995,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            # One thread and every sentence used (no sampling): training is deterministic.
            num_threads=1,
            input_sentence_size=0,
            minloglevel=2,
        )
    except Exception as e:
        if reading_failed:
            raise reading_failed[0] from None
        if not isinstance(e, RuntimeError):
            raise
        # SentencePiece's message reads "INTERNAL: file.cc(line) [check] reason"; keep the reason.
        reason = str(e).rsplit("] ", 1)[-1]
        raise ValueError(f"cannot train a {vocab_size}-piece tokenizer on this corpus: {reason}") from e
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(model.getvalue())
    return out_path
