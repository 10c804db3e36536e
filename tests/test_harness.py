"""lm-evaluation-harness through llama_jax (`evaluate harness`): the same requests answered by the harness's
own `hf` backend (transformers, CPU) on the same weights give the same loglikelihoods, greedy flags,
generations and scores. Tasks are local YAMLs over local files (tests/harness_tasks/): nothing downloads."""

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import llama_jax  # noqa: E402
from llama_jax.commands import evaluate  # noqa: E402
from llama_jax.convert import export_hf  # noqa: E402
from llama_jax.evaluate import harness  # noqa: E402

pytestmark = pytest.mark.slow  # the fast suite (-m 'not slow') leaves this module out

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "harness_tasks"
MAX_LENGTH = 128  # shorter than the stories: rolling windows and left truncation both happen


@pytest.fixture(scope="module")
def hf_dir(stories_model, tmp_path_factory):
    return export_hf(stories_model, tmp_path_factory.mktemp("harness") / "hf")


def run(lm, tasks: list[str]) -> dict:
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(TASKS)),
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )


def responses(results: dict, task: str) -> list:
    return [sample["resps"] for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_llama_jax_answers_as_the_hf_backend_does(stories_model, hf_dir, monkeypatch):
    monkeypatch.chdir(REPO)  # the task YAMLs name their data relative to the repository
    ours = run(
        harness.LlamaJaxLM(llama_jax.load(stories_model), batch_size=8, max_length=MAX_LENGTH),
        ["story_choice", "story_ending", "story_complete", "story_text"],
    )
    reference = run(
        HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=1, max_length=MAX_LENGTH, device="cpu"),
        ["story_choice", "story_ending", "story_complete"],
    )
    # Multiple choice: every choice's loglikelihood to 1e-4 relative (1e-5 absolute for those near 0, where a
    # relative bound would ask for more than float32's logsumexp gives), the same greedy flags and accuracy.
    # story_choice's endings are one word (the choices of a context share one row); story_ending's are
    # sentences after contexts longer than the window (left-truncated), as HellaSwag and MMLU ask.
    for task in ("story_choice", "story_ending"):
        mine, theirs = responses(ours, task), responses(reference, task)
        assert len(mine) == len(theirs) == 40
        for doc_mine, doc_theirs in zip(mine, theirs):
            for [(logprob, greedy)], [(hf_logprob, hf_greedy)] in zip(doc_mine, doc_theirs):
                assert logprob == pytest.approx(hf_logprob, rel=1e-4, abs=1e-5) and greedy == hf_greedy, task
        for metric in ("acc,none", "acc_norm,none"):
            assert ours["results"][task][metric] == reference["results"][task][metric], task
    mine = responses(ours, "story_choice")
    assert any(greedy for doc in mine for [(_, greedy)] in doc)  # the flag is exercised both ways
    # Generation: the same strings, the same exact match.
    generated = responses(ours, "story_complete")
    assert generated == responses(reference, "story_complete")
    assert sum(bool(doc[0][0].strip()) for doc in generated) >= 12, generated
    assert (
        ours["results"]["story_complete"]["exact_match,none"]
        == reference["results"]["story_complete"]["exact_match,none"]
    )
    # Rolling loglikelihood: the hf backend encodes the text with its own BOS and then also scores that BOS
    # after the BOS prefix; told not to add one, it scores what we score.
    rolling = run(
        HFLM(
            pretrained=str(hf_dir),
            dtype="float32",
            batch_size=1,
            max_length=MAX_LENGTH,
            device="cpu",
            add_bos_token=False,
        ),
        ["story_text"],
    )
    for [[logprob]], [[hf_logprob]] in zip(responses(ours, "story_text"), responses(rolling, "story_text")):
        assert logprob == pytest.approx(hf_logprob, rel=1e-4, abs=1e-5)
    assert ours["results"]["story_text"]["word_perplexity,none"] == pytest.approx(
        rolling["results"]["story_text"]["word_perplexity,none"], rel=1e-4
    )


def test_the_command_prints_the_table_then_json_and_refuses_bad_input(stories_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / "results.json"
    argv = [
        "harness",
        "--checkpoint",
        str(stories_model),
        "--tasks",
        "story_choice",
        "--include-path",
        str(TASKS),
        "--limit",
        "8",
        "--output",
        str(out),
    ]
    assert evaluate.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])["results"]["story_choice"]
    assert set(result) >= {"acc,none", "acc_norm,none", "acc_stderr,none"} and 0 <= result["acc,none"] <= 1
    assert any("story_choice" in line and "acc" in line for line in lines[:-1])  # the harness's table
    assert json.loads(out.read_text())["results"]["story_choice"]["acc,none"] == result["acc,none"]
    with pytest.raises(ValueError, match="exists"):
        evaluate.main(argv)
    with pytest.raises(ValueError, match="unknown harness task no_such_task"):
        evaluate.main(["harness", "--checkpoint", str(stories_model), "--tasks", "no_such_task"])
    monkeypatch.setattr(harness, "lm_utils", None)
    with pytest.raises(ValueError, match=r"pip install -e \"\.\[eval\]\""):
        evaluate.main(["harness", "--checkpoint", str(stories_model), "--tasks", "story_choice"])
