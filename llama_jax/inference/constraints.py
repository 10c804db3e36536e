"""Structured outputs: a request's text held to a grammar — a JSON schema, any JSON object, a regular expression,
one of fixed strings, or a Lark grammar — token by token, by llguidance.

    grammars = Grammars(tokenizer, model_vocab_size)
    grammars.check(Constraint("json_schema", schema_text))     # ValueError naming what is wrong
    follower = grammars.follow(constraint)
    follower.fill(mask_row)           # (ceil(vocab / 32),) int32: bit t % 32 of word t // 32 set where t may come
    follower.accept(token)            # the token sampled under that mask; .finished once the grammar is complete

The engine samples a constrained request's next token from its logits with every token the mask clears set to
-inf (`sampling.only_allowed`, on the device), then hands the token back to its follower, so the text is valid
by construction: only a token budget running out leaves it unfinished. A constrained request needs the host
between two of its tokens, so a decode call that holds one runs one step (`scheduler.py`).

Why llguidance rather than xgrammar (both maintained, both in vLLM): xgrammar 0.2.8 requires PyTorch,
transformers and Triton — gigabytes beside a JAX server — while llguidance is one Rust library with no Python
dependencies, a numpy bitmask API and its own JSON-schema, regex and Lark front ends. Outlines' `outlines-core`
compiles a regex into a token automaton ahead of time, seconds for a nested schema; llguidance computes each
mask lazily (tens of microseconds a token here, `benchmarks/serve_load.py`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import json
import os
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

from llama_jax.tokenizers import Tokenizer

ConstraintKind = Literal["json_schema", "json_object", "regex", "choice", "lark"]
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


@dataclasses.dataclass(frozen=True)
class Constraint:
    """What a request's generated text must be. `value`: the JSON schema as JSON text (json_schema), nothing
    (json_object: any JSON object), a regular expression (regex, Rust `regex` syntax), a JSON list of strings
    (choice: exactly one of them), or a Lark grammar (lark, llguidance's dialect)."""

    kind: ConstraintKind
    value: str = ""

    def grammar(self) -> str:
        """llguidance's grammar text of this constraint."""
        import llguidance

        matcher = llguidance.LLMatcher
        # JSON as json.dumps writes it (", " and ": "): with free whitespace small models pad forever.
        compact = {"whitespace_flexible": False}
        if self.kind == "json_schema":
            return matcher.grammar_from_json_schema(self.value, defaults=compact)
        if self.kind == "json_object":
            return matcher.grammar_from_json_schema({"type": "object"}, defaults=compact)
        if self.kind == "regex":
            return matcher.grammar_from_regex(self.value)
        if self.kind == "choice":
            # Lark string literals take JSON's escapes: each choice is exactly its text.
            return matcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(self.value)))
        return matcher.grammar_from_lark(self.value)


# The decode loop asks the host for the next masks after each step (`programs._decode`, through `io_callback`):
# by a number, since a compiled program is shared by every engine of the same shapes. 0 is nobody.
_IN_LOOP: dict[int, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {}
_NUMBERS = itertools.count(1)


def follow_in_loop(advance: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> int:
    """Register `advance(tokens, advancing) -> masks` for one decode call: after each step it takes every row's
    token and whether the row goes on (its followers take the token), and gives every row's next mask."""
    number = next(_NUMBERS)
    _IN_LOOP[number] = advance
    return number


def stop_following(number: int) -> None:
    _IN_LOOP.pop(number, None)


def masks_after(number, tokens, advancing) -> np.ndarray:
    """What the decode loop's host callback runs: the registered follower's next masks."""
    return _IN_LOOP[int(number)](np.asarray(tokens), np.asarray(advancing))


class Follower:
    """One request's place in its grammar."""

    def __init__(self, matcher):
        self._matcher = matcher

    def fill(self, row: np.ndarray) -> None:
        """Write the next token's mask into `row` (a C-contiguous int32 vector of ceil(vocab / 32) words)."""
        self._matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def accept(self, token: int) -> bool:
        """Advance past `token`; False when the grammar does not allow it (a sampler that ignored the mask)."""
        return self._matcher.consume_token(int(token))

    @property
    def finished(self) -> bool:
        """The grammar is complete: nothing but an end of sequence may follow."""
        return self._matcher.is_stopped()


def fill_masks(followers: Sequence[tuple[Follower, int]], masks: np.ndarray) -> None:
    """Each (follower, row)'s next mask into that row of `masks` (C-contiguous int32): several at once on
    llguidance's threads, which run without the interpreter lock."""
    matchers = [(f._matcher, row) for f, row in followers if isinstance(f, Follower)]
    for follower, row in followers:
        if not isinstance(follower, Follower):  # another implementation (the scheduler's tests)
            follower.fill(masks[row])
    if len(matchers) == 1:
        matcher, row = matchers[0]
        matcher.unsafe_compute_mask_ptr(masks[row].ctypes.data, masks[row].nbytes)
    elif matchers:
        _executor().unsafe_compute_mask_ptr(matchers, masks.ctypes.data, masks.shape[1] * 4, masks.shape[0])


@functools.cache
def _executor():
    import llguidance

    return llguidance.LLExecutor(num_threads=os.cpu_count() or 1)


class Grammars:
    """Constraints turned into followers over one tokenizer's vocabulary, padded to the model's `vocab_size`
    (ids past the tokenizer's are never allowed). Building llguidance's view of a vocabulary takes up to a
    couple of seconds (Llama 3's 128,256 tokens): done once, on first use or in `warm_up`."""

    # Compiled grammars kept for the next request with the same constraint (an application sends the same
    # schema with every request), and the engine's check and the scheduler's follower would each compile it:
    # a nested schema over Llama 3's vocabulary takes about 2 ms to compile and its first mask, a copy 0.05 ms.
    CACHED_GRAMMARS = 64

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.words = (vocab_size + 31) // 32  # int32 words of one row's mask
        self._vocabulary = None
        self._lock = threading.Lock()
        self._compiled: collections.OrderedDict[Constraint, Any] = collections.OrderedDict()

    def warm_up(self) -> None:
        self._llg_tokenizer()

    def check(self, constraint: Constraint) -> None:
        """ValueError saying why, when `constraint` is no grammar llguidance can follow."""
        self._matcher(constraint)

    def follow(self, constraint: Constraint) -> Follower:
        return Follower(self._matcher(constraint))

    def _matcher(self, constraint: Constraint):
        """A fresh matcher at the start of `constraint`'s grammar: a copy of the compiled one when cached."""
        with self._lock:
            compiled = self._compiled.get(constraint)
            if compiled is not None:
                self._compiled.move_to_end(constraint)
                return compiled.deep_copy()
        compiled = self._compile(constraint)
        with self._lock:
            self._compiled[constraint] = compiled
            while len(self._compiled) > self.CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return compiled.deep_copy()

    def _compile(self, constraint: Constraint):
        import llguidance

        try:
            grammar = constraint.grammar()
        except (ValueError, TypeError) as e:  # a schema or a choice list that is not JSON
            raise ValueError(f"the {constraint.kind} constraint is not valid: {e}") from None
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            reason = " ".join(matcher.get_error().split()).removeprefix("Parser Error: ")
            raise ValueError(f"the {constraint.kind} constraint is not valid: {reason[:300]}")
        return matcher

    def _llg_tokenizer(self):
        with self._lock:
            if self._vocabulary is None:
                import llguidance

                vocabulary = _Vocabulary(self.tokenizer, self.vocab_size)
                self._vocabulary = llguidance.LLTokenizer(
                    llguidance.TokenizerWrapper(vocabulary),
                    n_vocab=self.vocab_size,
                    eos_token=list(self.tokenizer.stop_ids),
                )
            return self._vocabulary


class _Vocabulary:
    """A vocabulary as llguidance's `TokenizerWrapper` reads it: each id's bytes (special tokens as 0xFF and
    their name, which no text can contain), and a tokenizer of byte strings."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        pieces = [token_bytes(tokenizer, i) for i in range(tokenizer.vocab_size)]
        pieces += [None] * (vocab_size - len(pieces))  # the model's padding rows: no text
        self.tokens = [p if p is not None else b"\xff<|special_%d|>" % i for i, p in enumerate(pieces)]
        self.special_token_ids = [i for i, p in enumerate(pieces) if p is None]
        self._ids: dict[bytes, int] = {}
        for i, piece in enumerate(pieces):
            if piece:
                self._ids.setdefault(piece, i)
        self._longest = max(len(p) for p in self._ids)

    def __call__(self, text: bytes | str) -> list[int]:
        """Longest-match tokens of `text`. llguidance asks for a tokenization of bytes a grammar forces; any
        valid one serves. (A SentencePiece `encode` would add its dummy-prefix space to them.)"""
        data = text.encode("utf-8") if isinstance(text, str) else text
        ids, at = [], 0
        while at < len(data):
            for size in range(min(self._longest, len(data) - at), 0, -1):
                token = self._ids.get(data[at : at + size])
                if token is not None:
                    ids.append(token)
                    at += size
                    break
            else:  # no token spells this byte (a vocabulary without byte fallback): leave the rest to sampling
                break
        return ids


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes | None:
    """The bytes `token_id` adds to a text (None for a special token: BOS, EOS, a template's markers). The
    SentencePiece "▁" is the space it stands for and "<0x0A>" the byte it names."""
    if token_id in (tokenizer.bos_id, tokenizer.eos_id, *tokenizer.stop_ids):
        return None  # (llama2.c's vocabularies spell BOS and EOS as "\n<s>\n" and "\n</s>\n")
    piece = tokenizer.id_to_piece(token_id)
    try:
        tokenizer.special_id(piece)
        return None
    except KeyError:
        pass
    if tokenizer.kind == "tiktoken":  # byte-level pieces: a piece may hold part of a character
        return tokenizer.piece_bytes(token_id)
    raw = piece.encode("utf-8")
    byte = _BYTE_PIECE.fullmatch(raw)
    return bytes([int(byte[1], 16)]) if byte is not None else raw.replace("\u2581".encode(), b" ")
