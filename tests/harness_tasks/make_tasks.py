"""Writes the three small harness tasks of tests/test_harness.py from the bundled TinyStories excerpt
(assets/tinystories_sample.txt, CDLA-Sharing-1.0): `python tests/harness_tasks/make_tasks.py`.

  story_choice.jsonl    multiple choice: a story up to a sentence's last word; the true word and three
                        last words of other sentences
  story_complete.jsonl  generation: a story up to a sentence's last two words; they are the target
  story_text.jsonl      the five stories whole, for rolling loglikelihood (perplexity)
  story_ending.jsonl    multiple choice as HellaSwag and MMLU ask it: a long shared context (a story up to a
                        sentence, often longer than the test's 128-token window) and four endings of several
                        tokens each, the true next sentence and three sentences from elsewhere
"""

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLE = HERE.parents[1] / "assets" / "tinystories_sample.txt"


def main() -> None:
    stories = [s.strip() for s in SAMPLE.read_text(encoding="utf-8").split("<|endoftext|>") if s.strip()]
    cuts = []  # (text before the sentence's last words, the sentence's last word, its last two words)
    for story in stories:
        for match in re.finditer(r"[^.!?\n]*?\b(\w+) (\w+)[.!?]", story):
            before_last = story[: match.start(2)].rstrip()
            before_two = story[: match.start(1)].rstrip()
            if len(before_two) > 40:
                cuts.append((before_last, match.group(2), before_two, f"{match.group(1)} {match.group(2)}"))
    rng = random.Random(0)
    words = sorted({word for _, word, _, _ in cuts})
    with open(HERE / "story_choice.jsonl", "w", encoding="utf-8") as f:
        for context, word, _, _ in cuts[:40]:
            others = rng.sample([w for w in words if w != word], 3)
            choices = [word, *others]
            rng.shuffle(choices)
            f.write(json.dumps({"context": context, "choices": choices, "label": choices.index(word)}) + "\n")
    with open(HERE / "story_complete.jsonl", "w", encoding="utf-8") as f:
        for _, _, context, target in cuts[:24]:
            f.write(json.dumps({"context": context, "target": target}) + "\n")
    sentences = []  # (the story before the sentence, the sentence)
    for story in stories:
        for match in re.finditer(r"[^.!?\n]+[.!?]", story):
            if match.start() > 250:
                sentences.append((story[: match.start()].rstrip(), match.group(0).strip()))
    endings = sorted({sentence for _, sentence in sentences})
    with open(HERE / "story_ending.jsonl", "w", encoding="utf-8") as f:
        for context, sentence in rng.sample(sentences, 40):
            choices = [sentence, *rng.sample([e for e in endings if e != sentence], 3)]
            rng.shuffle(choices)
            f.write(json.dumps({"context": context, "choices": choices, "label": choices.index(sentence)}) + "\n")
    with open(HERE / "story_text.jsonl", "w", encoding="utf-8") as f:
        for story in stories:
            f.write(json.dumps({"text": story}) + "\n")


if __name__ == "__main__":
    main()
