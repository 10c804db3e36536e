"""`python -m llama_jax.evaluate generate`: BLEU, ROUGE and exact match of generated text, as the libraries
that define them compute them, written per example and resumed after an interruption."""

import json

import pytest

from llama_jax.commands import evaluate
from llama_jax.evaluate.text_metrics import TextScorer, sentences_on_lines

sacrebleu = pytest.importorskip("sacrebleu")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")


def test_bleu_is_sacrebleus_and_its_published_example():
    # sacrebleu's README: BLEU = 48.53 for these three sentences against two reference streams.
    hypotheses = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    streams = [
        ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
        ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
    ]
    per_example = [list(refs) for refs in zip(*streams)]
    scorer = TextScorer(["bleu"])
    summary = scorer.corpus(hypotheses, per_example, [scorer.example(h, r) for h, r in zip(hypotheses, per_example)])
    assert round(summary["bleu"], 2) == 48.53
    assert summary["bleu"] == sacrebleu.corpus_bleu(hypotheses, streams).score
    assert summary["bleu_signature"].startswith("nrefs:2|case:mixed|eff:no|tok:13a|smooth:exp")
    # Examples with different numbers of references: the missing ones are left out, not counted as empty.
    uneven = scorer.corpus(hypotheses, [per_example[0], per_example[1][:1], per_example[2]], [])
    assert uneven["bleu"] == sacrebleu.corpus_bleu(hypotheses, [streams[0], [streams[1][0], None, streams[1][2]]]).score


def test_rouge_is_rouge_scores_with_stemming_and_its_published_example():
    scorer = TextScorer(["rouge", "exact_match"])
    # rouge-score's README example: rouge1 F = 0.7059 (P 0.75, R 0.667), rougeL F = 0.5882 (P 0.625, R 0.556).
    scores = scorer.example("The quick brown dog jumps on the log.", ["The quick brown fox jumps over the lazy dog"])
    assert scores["rouge1"] == pytest.approx(100 * 12 / 17) and scores["rougeL"] == pytest.approx(100 * 10 / 17)
    assert scores["exact_match"] == 0.0
    direct = rouge_scorer.RougeScorer(["rouge2", "rougeLsum"], use_stemmer=True)
    prediction = "The cats were running. They stopped! Then they slept"
    references = ["The cat ran fast. It stopped and slept.", "Cats run. Then they sleep."]
    scores = scorer.example(prediction, references)
    best = direct.score_multi([sentences_on_lines(r) for r in references], sentences_on_lines(prediction))
    assert scores["rouge2"] == 100 * best["rouge2"].fmeasure and scores["rougeLsum"] == 100 * best["rougeLsum"].fmeasure
    assert sentences_on_lines(prediction) == "The cats were running.\nThey stopped!\nThen they slept"
    assert scorer.example(" Cats run. ", ["x", "Cats run."])["exact_match"] == 100.0


def write_task(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow
def test_generate_scores_every_record_and_resumes_without_redoing_finished_ones(stories_model, tmp_path, capsys):
    stories = [
        ("Once upon a time, there was a little girl named Lily.", "She liked to play in the park."),
        ("Tom had a red ball.", "He played with it every day."),
        ("One day, a cat saw a bird.", ["The cat wanted to catch the bird.", "The bird flew away."]),
        ("The sun was shining.", "Everyone was happy."),
        ("Sue went to the store with her mom.", "They bought apples."),
        ("Ben saw a big dog.", "The dog was friendly."),
    ]
    task = write_task(
        tmp_path / "task.jsonl",
        [{"prompt": p, **({"references": r} if isinstance(r, list) else {"reference": r})} for p, r in stories],
    )
    out = tmp_path / "scores.jsonl"
    argv = [
        "generate",
        "--checkpoint",
        str(stories_model),
        "--data",
        str(task),
        "--output",
        str(out),
        "--max-new-tokens",
        "24",
        "--stop",
        "\n",
        "--max-num-seqs",
        "4",
    ]
    assert evaluate.main(argv) == 0
    summary = last_json(capsys)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["examples"] == summary["generated"] == 6 and len(records) == 6
    completions = [r["completion"] for r in records]
    assert all(c and "\n" not in c for c in completions)
    references = [r["references"] for r in records]
    assert references[2] == stories[2][1] and references[0] == [stories[0][1]]
    # The summary is the libraries' own numbers on these strings.
    most = max(len(r) for r in references)
    streams = [[r[k] if k < len(r) else None for r in references] for k in range(most)]
    assert summary["bleu"] == sacrebleu.corpus_bleu(completions, streams).score
    assert summary["rouge1"] == pytest.approx(sum(r["scores"]["rouge1"] for r in records) / 6)
    assert set(summary) >= {"bleu", "rouge1", "rouge2", "rougeL", "rougeLsum", "exact_match"}
    # Greedy: the completions are the model's greedy continuations (the same as generate()'s).
    import llama_jax

    loaded = llama_jax.load(stories_model)
    greedy = llama_jax.generate(loaded, [stories[1][0]], max_new_tokens=24, temperature=0)[0].text
    assert greedy.split("\n")[0] == completions[1]

    # Interrupted after two records, the last one cut short: the rerun generates only the other four.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:20])
    assert evaluate.main(argv) == 0
    resumed = last_json(capsys)
    assert resumed["generated"] == 4 and {k: v for k, v in resumed.items() if k != "generated"} == {
        k: v for k, v in summary.items() if k != "generated"
    }
    assert out.read_text().splitlines(keepends=True) == lines
    assert evaluate.main(argv) == 0 and last_json(capsys)["generated"] == 0
    with pytest.raises(ValueError, match="holds results of other settings"):
        evaluate.main([*argv, "--metrics", "bleu"])


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "holds no records"),
        ('{"prompt": "a", "reference": "b"}\nnot json\n', "line 2 is not JSON"),
        ('{"prompt": "a"}\n', 'line 1 needs a "reference"'),
        ('{"prompt": "a", "references": []}\n', 'line 1 needs a "reference"'),
        ('{"reference": "b"}\n', 'line 1 has no "prompt"'),
    ],
)
def test_bad_task_files_are_one_clear_error(stories_model, tmp_path, content, message):
    task = tmp_path / "task.jsonl"
    task.write_text(content)
    with pytest.raises(ValueError, match=message):
        evaluate.main(["generate", "--checkpoint", str(stories_model), "--data", str(task)])


def test_unknown_metric_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(ValueError, match="unknown metric meteor"):
        evaluate.main(["generate", "--checkpoint", str(tmp_path / "none"), "--data", "x", "--metrics", "bleu,meteor"])
