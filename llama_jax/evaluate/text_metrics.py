"""Scores of generated text against references: BLEU (sacrebleu), ROUGE (rouge-score), exact match.

The field's own implementations, not ours: sacrebleu's corpus BLEU with its default 13a tokenizer (its
signature says so, and is printed with the score), and Google's rouge-score F1 with Porter stemming. All
scores are 0-100.

ROUGE-Lsum is ROUGE-L over sentences, and rouge-score finds sentences at newlines. Generated text rarely
has them, so every text is first split into sentences at end punctuation followed by whitespace
(`(?<=[.!?])\\s+`) and at its own newlines, then joined by newlines. (rouge-score's own splitting needs
NLTK's punkt data, which would be a download at run time.) With several references, ROUGE takes the best
F1 over them (rouge-score's `score_multi`), BLEU counts them all (sacrebleu's multi-reference BLEU), and
exact match needs any one, after stripping surrounding whitespace.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

METRICS = ("bleu", "rouge", "exact_match")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def parse_metrics(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric {', '.join(unknown) or repr(text)}: choose from {', '.join(METRICS)}")
    return names


def sentences_on_lines(text: str) -> str:
    """The text with one sentence per line: how ROUGE-Lsum is told where sentences end."""
    return "\n".join(part for part in _SENTENCE_END.split(text.strip()) if part)


class TextScorer:
    """Per-example and corpus scores for the chosen metrics."""

    def __init__(self, metrics: Sequence[str]):
        self.metrics = tuple(metrics)
        self._rouge = None
        if "rouge" in self.metrics:
            from rouge_score import rouge_scorer

            self._rouge = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
        self._bleu = self._sentence_bleu = None
        if "bleu" in self.metrics:
            from sacrebleu.metrics import BLEU

            self._bleu = BLEU()
            # effective_order: one short sentence's BLEU is not zeroed by a missing 4-gram.
            self._sentence_bleu = BLEU(effective_order=True)

    def example(self, prediction: str, references: Sequence[str]) -> dict[str, float]:
        """One example's scores (sentence BLEU for BLEU: a per-example view; the corpus BLEU is not their mean)."""
        scores: dict[str, float] = {}
        if self._bleu is not None:
            scores["bleu"] = self._sentence_bleu.sentence_score(prediction, list(references)).score
        if self._rouge is not None:
            best = self._rouge.score_multi([sentences_on_lines(r) for r in references], sentences_on_lines(prediction))
            scores.update({name: 100 * best[name].fmeasure for name in ROUGE_TYPES})
        if "exact_match" in self.metrics:
            scores["exact_match"] = 100.0 * any(prediction.strip() == r.strip() for r in references)
        return scores

    def corpus(
        self, predictions: Sequence[str], references: Sequence[Sequence[str]], examples: Sequence[dict[str, float]]
    ) -> dict[str, float | str]:
        """Corpus BLEU over all predictions; the mean of the per-example ROUGE F1 and exact match."""
        summary: dict[str, float | str] = {}
        if self._bleu is not None:
            # sacrebleu takes reference streams: stream k holds every example's k-th reference (None where an
            # example has fewer).
            most = max(len(r) for r in references)
            streams = [[r[k] if k < len(r) else None for r in references] for k in range(most)]
            summary["bleu"] = self._bleu.corpus_score(list(predictions), streams).score
            summary["bleu_signature"] = str(self._bleu.get_signature())
        for name in (*ROUGE_TYPES, "exact_match"):
            if examples and name in examples[0]:
                summary[name] = sum(e[name] for e in examples) / len(examples)
        return summary
