"""Whole training runs in-process: loss falls on real text, the run directory is a loadable model, a checkpoint
resumes on another mesh, fine-tuning starts from init_from, and incompatible runs are refused untouched."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import llama_jax
from llama_jax.model_dir import CHECKPOINTS_DIR
from llama_jax.tokenizers.training import train_sentencepiece
from llama_jax.train.config import load_train_config
from llama_jax.train.metrics import TrainLogger
from llama_jax.train.trainer import run

pytestmark = pytest.mark.slow  # the fast suite (-m 'not slow') leaves this module out

STEPS = 40


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train_run")


@pytest.fixture(scope="module")
def excerpt(assets, workdir) -> Path:
    path = workdir / "shakespeare.txt"
    path.write_text((assets / "tinyshakespeare.txt").read_text()[:60_000])
    return path


def tiny_config(workdir, assets, data, run_dir, *extra):
    return load_train_config(
        None,
        [
            "model=tiny",
            f"data={data}",
            f"tokenizer={assets / 'tok512.bin'}",
            f"data_cache={workdir / 'cache'}",
            f"run_dir={run_dir}",
            "seq_len=32",
            "batch_size=8",
            f"steps={STEPS}",
            "warmup=4",
            "lr=1e-2",
            "eval_every=20",
            "checkpoint_every=20",
            "log_every=1",
            "eval_batches=2",
            "samples=1",
            "sample_tokens=8",
            "mesh.data=2",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def trained(workdir, assets, excerpt):
    config = tiny_config(workdir, assets, excerpt, workdir / "run")
    return config, run(config)


def test_loss_falls_on_real_text(trained):
    config, result = trained
    uniform = math.log(512)
    assert result["step"] == STEPS and result["checkpoint_step"] == STEPS and not result["preempted"]
    assert result["eval_loss"] < uniform - 1.5, result
    records = [json.loads(line) for line in (Path(config.run_dir) / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40] and evals[1]["loss"] < evals[0]["loss"]
    assert len(train_losses) == STEPS and train_losses[-1] < train_losses[0] - 1.5
    assert result["vocab_size"] == 512 and len(result["samples"]) == 1
    # What `tensorboard --logdir` shows (its own reader), and the loss curve the run saves as a picture.
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = event_accumulator.EventAccumulator(str(Path(config.run_dir) / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "eval/loss"} <= set(tags), tags
    assert [e.value for e in events.Scalars("eval/loss")] == pytest.approx([r["loss"] for r in evals], rel=1e-6)
    assert (Path(config.run_dir) / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_dir_loads_as_a_model(trained):
    config, _ = trained
    loaded = llama_jax.load(config.run_dir)
    assert loaded.config.vocab_size == 512 and loaded.tokenizer.vocab_size == 512
    assert sorted(p.name for p in (Path(config.run_dir) / CHECKPOINTS_DIR).iterdir()) == ["20", "40"]
    stored = json.loads((Path(config.run_dir) / CHECKPOINTS_DIR / "40" / "meta" / "metadata").read_text())
    assert stored["step"] == 40 and stored["data_position"] == {"seed": 0, "samples_seen": 40 * 8}


def test_checkpoint_resumes_on_another_mesh(trained, workdir, assets, excerpt):
    config, result = trained
    copy = workdir / "run_on_tensor_mesh"
    shutil.copytree(config.run_dir, copy)
    shutil.rmtree(copy / CHECKPOINTS_DIR / "40")  # resume from step 20, saved on the data=2 mesh
    resumed = run(tiny_config(workdir, assets, excerpt, copy, "mesh.data=1", "mesh.tensor=2", "samples=0"))
    assert resumed["step"] == STEPS
    np.testing.assert_allclose(resumed["train_loss"], result["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(resumed["eval_loss"], result["eval_loss"], rtol=1e-4)
    params = llama_jax.load(copy).model.layers.mlp.w_gate[...]
    original = llama_jax.load(config.run_dir).model.layers.mlp.w_gate[...]
    np.testing.assert_allclose(np.asarray(params), np.asarray(original), atol=1e-4)


def test_fine_tuning_starts_from_init_from(trained, workdir, assets):
    config, result = trained
    data = workdir / "sft.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"Who speaks line {i}?\n", "response": "ROMEO."}) + "\n" for i in range(40))
    )
    sft = load_train_config(
        None,
        [
            f"init_from={config.run_dir}",
            "sft=true",
            f"data={data}",
            f"data_cache={workdir / 'cache'}",
            f"run_dir={workdir / 'sft'}",
            "seq_len=32",
            "batch_size=8",
            "steps=2",
            "warmup=0",
            "lr=1e-9",
            "eval_batches=1",
            "samples=0",
            "mesh.data=2",
        ],
    )
    tuned = run(sft)
    assert tuned["step"] == 2 and tuned["vocab_size"] == 512
    stored = json.loads((workdir / "sft" / "config.json").read_text())
    assert stored["model"]["dim"] == 48 and stored["tokenizer"] == "tokenizer.bin"
    # with a negligible learning rate the tuned weights are init_from's (a fresh init would differ by ~0.02)
    tuned_weights = llama_jax.load(workdir / "sft").model.layers.attention.wq[...]
    np.testing.assert_allclose(
        np.asarray(tuned_weights), np.asarray(llama_jax.load(config.run_dir).model.layers.attention.wq[...]), atol=1e-6
    )
    assert tuned["eval_loss"] < math.log(512)


def _snapshot(directory: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.rglob("*"))}


def test_incompatible_run_dir_is_refused_and_untouched(trained, workdir, assets, excerpt):
    config, _ = trained
    before = _snapshot(Path(config.run_dir))
    with pytest.raises(ValueError, match=r"holds a different run \(seq_len: 32 there, 16 now\)"):
        run(tiny_config(workdir, assets, excerpt, config.run_dir, "seq_len=16"))
    with pytest.raises(ValueError, match="holds a different run"):
        run(tiny_config(workdir, assets, excerpt, config.run_dir, "model.dim=24"))
    assert _snapshot(Path(config.run_dir)) == before
    other = workdir / "not_a_run"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a training run"):
        run(tiny_config(workdir, assets, excerpt, other))
    assert (other / "notes.txt").read_text() == "mine" and len(list(other.iterdir())) == 1


@pytest.fixture(scope="module")
def bigger_tokenizer(workdir, excerpt) -> Path:
    """A 600-piece SentencePiece tokenizer: more ids than the 512 of the trained model."""
    return train_sentencepiece([excerpt], 600, workdir / "bigger.model")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["init_from=RUN", "model=small"], "holds a different model: dim=48 there but 192 here"),
        (["init_from=MISSING"], "is not a llama_jax model directory"),
        (["init_from=RUN", "model=null", "tokenizer=BIGGER"], "bigger.model is not init_from .*'s tokenizer"),
        (["init_from=RUN", "model=null", "sft=true", "chat_template=auto"], "has no chat template"),
    ],
)
def test_incompatible_init_from_is_refused(trained, workdir, assets, excerpt, bigger_tokenizer, extra, message):
    config, _ = trained
    replace = {"RUN": config.run_dir, "MISSING": str(workdir / "missing"), "BIGGER": str(bigger_tokenizer)}
    extra = [e.split("=")[0] + "=" + replace.get(e.split("=")[1], e.split("=")[1]) for e in extra]
    with pytest.raises(ValueError, match=message):
        run(tiny_config(workdir, assets, excerpt, workdir / "refused", *extra))
    assert not (workdir / "refused").exists()


def test_metrics_of_a_killed_run_stay_whole_lines(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 2.0}\n{"step": 2, "spl')
    logger = TrainLogger(
        tmp_path, enabled=True, steps=3, start_step=2, tokens_per_step=8, flops_per_token=1.0, peak_flops_total=None
    )
    logger.train(3, {"loss": 1.5})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 3]
