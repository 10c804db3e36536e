"""Fault injection: damaged checkpoints are caught and rolled back, a diverging run stops before it saves
garbage, one process writes a run directory, and nothing a user made is overwritten or left half-written."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from module_runner import REPO, assert_one_error_line, run_module

import llama_jax
from llama_jax.convert import convert_llama2c
from llama_jax.model_dir import CHECKPOINTS_DIR, CONFIG_FILE
from llama_jax.tokenizers.training import train_sentencepiece
from llama_jax.train.config import load_train_config
from llama_jax.train.trainer import run

pytestmark = pytest.mark.slow  # the fast suite (-m 'not slow') leaves this module out

STEPS = 30


def tiny(workdir: Path, assets: Path, run_dir: Path, *extra: str):
    return load_train_config(
        None,
        [
            "model=tiny",
            f"data={workdir / 'shakespeare.txt'}",
            f"tokenizer={assets / 'tok512.bin'}",
            f"data_cache={workdir / 'cache'}",
            f"run_dir={run_dir}",
            "seq_len=32",
            "batch_size=8",
            f"steps={STEPS}",
            "warmup=4",
            "lr=1e-2",
            "eval_every=30",
            "checkpoint_every=10",
            "keep_checkpoints=3",
            "log_every=1",
            "eval_batches=1",
            "samples=0",
            "mesh.data=2",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, assets) -> Path:
    folder = tmp_path_factory.mktemp("reliability")
    (folder / "shakespeare.txt").write_text((assets / "tinyshakespeare.txt").read_text()[:30_000])
    return folder


@pytest.fixture(scope="module")
def finished(workdir, assets):
    """A finished run with checkpoints at steps 10, 20 and 30, kept as the pristine copy."""
    result = run(tiny(workdir, assets, workdir / "pristine"))
    return workdir / "pristine", result


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def data_files(item: Path) -> list[Path]:
    """An orbax item's data files (OCDBT: the array bytes, and the b-tree that indexes them)."""
    return sorted(p for p in item.rglob("*") if p.is_file() and p.parent.name == "d")


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def edit_meta(step_dir: Path, change) -> None:
    """Edit a step's meta JSON in place, as a person with an editor would."""
    file = step_dir / "meta" / "metadata"
    meta = json.loads(file.read_text())
    change(meta)
    file.write_text(json.dumps(meta))


def unsealed_without_checksums(step_dir: Path) -> None:
    edit_meta(step_dir, lambda meta: [meta.pop(key) for key in ("sha256", "checksums")])
    flip_bytes(max(data_files(step_dir / "params"), key=lambda f: f.stat().st_size))


DAMAGE = {
    "bytes flipped in params": lambda step: [flip_bytes(f) for f in data_files(step / "params")],
    "params cut short": lambda step: [
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]) for f in data_files(step / "params")
    ],
    "opt_state cut short": lambda step: [f.write_bytes(f.read_bytes()[:100]) for f in data_files(step / "opt_state")],
    "meta missing": lambda step: shutil.rmtree(step / "meta"),
    "opt_state missing": lambda step: shutil.rmtree(step / "opt_state"),
    # a38b2de resumed at the edited step with the old step's weights, or never finished (below the next save)
    "meta step edited up": lambda step: edit_meta(step, lambda meta: meta.update(step=meta["step"] + 3)),
    "meta step edited down": lambda step: edit_meta(step, lambda meta: meta.update(step=meta["step"] - 10)),
    "meta step removed": lambda step: edit_meta(step, lambda meta: meta.pop("step")),  # a KeyError traceback
    "meta unsealed, checksums removed, params flipped": unsealed_without_checksums,  # "training diverged"
}


@pytest.mark.parametrize(
    "newest, older",
    [
        ("bytes flipped in params", "opt_state cut short"),
        ("meta missing", "params cut short"),
        ("opt_state missing", "bytes flipped in params"),
        ("meta step edited up", "meta step edited down"),
        ("meta step removed", "meta unsealed, checksums removed, params flipped"),
    ],
)
def test_damaged_newest_checkpoints_are_set_aside_and_the_run_recomputes_them(
    finished, workdir, assets, caplog, newest, older
):
    pristine, result = finished
    run_dir = workdir / f"damaged-{len(list(workdir.iterdir()))}"
    shutil.copytree(pristine, run_dir)
    DAMAGE[newest](run_dir / CHECKPOINTS_DIR / "30")
    DAMAGE[older](run_dir / CHECKPOINTS_DIR / "20")
    with caplog.at_level(logging.WARNING, logger="llama_jax"):
        resumed = run(tiny(workdir, assets, run_dir))
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert [w.split(" of ")[0] for w in warnings] == ["checkpoint step 30", "checkpoint step 20"], warnings
    assert sorted(p.name for p in (run_dir / "damaged").iterdir()) == ["20", "30"]  # kept, not deleted
    # resumed from step 10 and recomputed 11..30 exactly
    assert (resumed["train_loss"], resumed["eval_loss"]) == (result["train_loss"], result["eval_loss"])
    assert all(losses(run_dir)[s] == losses(pristine)[s] for s in range(11, STEPS + 1))
    assert sorted(int(p.name) for p in (run_dir / CHECKPOINTS_DIR).iterdir() if p.name.isdigit()) == [10, 20, 30]


def test_a_damaged_model_directory_is_refused_in_one_line_leaving_nothing(assets, tmp_path):
    """...and the output it was to write does not exist afterwards, so the rerun on a good model is not refused
    as "results of other settings" (a38b2de left an empty out.jsonl and out.jsonl.run.json)."""
    good = convert_llama2c(assets / "stories260K.bin", assets / "tok512.bin", tmp_path / "good")
    model_dir = shutil.copytree(good, tmp_path / "stories")
    flip_bytes(max(data_files(model_dir / "params"), key=lambda f: f.stat().st_size))  # inside the weights
    out = tmp_path / "out.jsonl"
    args = ["--prompt", "Once", "--max-new-tokens", "4", "--output", out]
    result = run_module("infer", "--checkpoint", model_dir, *args)
    assert result.returncode == 2 and result.stdout == ""
    assert "changed since it was saved" in assert_one_error_line(result, "holds no intact parameters")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "stories"]
    rerun = run_module("infer", "--checkpoint", good, *args)
    assert rerun.returncode == 0, rerun.stderr
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == ["Once"]


def test_missing_weight_files_are_one_line_without_stray_output(assets, tmp_path):
    """orbax leaves the reads of the other arrays unawaited: a38b2de printed ~128 `Exception ignored in:
    <coroutine ...>` tracebacks after the error line, and the line itself ended in a TensorStore spec dump."""
    model_dir = convert_llama2c(assets / "stories260K.bin", assets / "tok512.bin", tmp_path / "stories")
    for data in (model_dir / "params" / "ocdbt.process_0" / "d").iterdir():
        data.unlink()
    result = run_module("infer", "--checkpoint", model_dir, "--prompt", "Once", "--max-new-tokens", "4")
    line = assert_one_error_line(result, "holds no intact parameters")
    assert "Exception ignored" not in result.stderr and "TensorStore" not in line, result.stderr[-2000:]


def test_fine_tuning_from_a_damaged_model_directory_is_refused(workdir, assets, tmp_path):
    model_dir = convert_llama2c(assets / "stories260K.bin", assets / "tok512.bin", tmp_path / "stories")
    for data in data_files(model_dir / "params"):
        data.write_bytes(data.read_bytes()[:50])
    with pytest.raises(ValueError, match="holds no intact parameters"):
        run(tiny(workdir, assets, tmp_path / "tuned", f"init_from={model_dir}", "model=null", "seq_len=32"))
    assert not (tmp_path / "tuned").exists()


def test_a_run_directory_falls_back_to_its_newest_intact_step(finished, workdir):
    pristine, _ = finished
    run_dir = workdir / "infer-fallback"
    shutil.copytree(pristine, run_dir)
    flip_bytes(data_files(run_dir / CHECKPOINTS_DIR / "30" / "params")[0])
    expected = llama_jax.load(pristine).model.embed[...]  # step 30
    loaded = llama_jax.load(run_dir).model.embed[...]
    older = np.asarray(loaded)
    assert not np.array_equal(older, np.asarray(expected))  # it is step 20's, not garbage from step 30
    assert np.isfinite(older).all()


def test_a_diverging_run_stops_before_it_saves_anything_not_finite(workdir, assets):
    run_dir = workdir / "diverged"
    with pytest.raises(ValueError, match="training diverged: the loss was not finite at steps"):
        run(tiny(workdir, assets, run_dir, "lr=1e6", "grad_clip=0", "warmup=0", "checkpoint_every=2"))
    steps = sorted(int(p.name) for p in (run_dir / CHECKPOINTS_DIR).iterdir() if p.name.isdigit())
    assert steps, "the good steps before the divergence were saved"
    params = llama_jax.load(run_dir).model  # the newest checkpoint, intact and finite
    assert np.isfinite(np.asarray(params.embed[...])).all()


def test_one_training_process_per_run_directory(workdir, assets):
    args = [
        "model=tiny",
        f"data={workdir / 'shakespeare.txt'}",
        f"tokenizer={assets / 'tok512.bin'}",
        f"data_cache={workdir / 'cache'}",
        f"run_dir={workdir / 'contended'}",
        "seq_len=32",
        "batch_size=8",
        "steps=150",
        "eval_every=150",
        "checkpoint_every=150",
        "samples=0",
        "mesh.data=1",
    ]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    first, second = (
        subprocess.Popen(
            [sys.executable, "train.py", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    )
    outcomes = sorted([(p.wait(timeout=300), p.communicate()) for p in (first, second)], key=lambda o: o[0])
    (won, (won_out, _)), (lost, (lost_out, lost_err)) = outcomes
    assert (won, lost) == (0, 2) and lost_out == ""
    errors = lost_err.strip().splitlines()
    assert len(errors) == 1 and "is in use by another training process" in errors[0], lost_err[-2000:]
    steps = [
        json.loads(line)["step"]
        for line in (workdir / "contended" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == "train"
    ]
    assert steps == sorted(set(steps))  # one writer: no step logged twice


def test_a_refused_command_leaves_nothing_and_the_corrected_one_runs(workdir, assets):
    run_dir = workdir / "corrected"
    with pytest.raises(ValueError, match="must be a multiple of the data-parallel size"):
        run(tiny(workdir, assets, run_dir, "mesh.data=2", "batch_size=7"))
    assert not run_dir.exists()
    result = run(tiny(workdir, assets, run_dir, "warmup=1000", "steps=3"))  # a warmup longer than the run
    assert result["step"] == 3
    shutil.rmtree(run_dir / CHECKPOINTS_DIR)  # a run that never saved takes the new settings
    assert run(tiny(workdir, assets, run_dir, "steps=2"))["step"] == 2


def test_a_run_directory_missing_its_model_files_gets_them_back(finished, workdir, assets):
    pristine, _ = finished
    run_dir = workdir / "repaired"
    shutil.copytree(pristine, run_dir)
    (run_dir / CONFIG_FILE).unlink()
    (run_dir / "tokenizer.bin").unlink()
    run(tiny(workdir, assets, run_dir))
    assert llama_jax.load(run_dir).config.vocab_size == 512


def test_model_directories_that_lie_about_their_tokenizer_are_refused(assets, workdir, tmp_path):
    model_dir = convert_llama2c(assets / "stories260K.bin", assets / "tok512.bin", tmp_path / "stories")
    config = json.loads((model_dir / CONFIG_FILE).read_text())
    bigger = tmp_path / "bigger"
    shutil.copytree(model_dir, bigger)
    (bigger / "checksums.json").unlink()  # else the edited config.json is refused first (below)
    train_sentencepiece([workdir / "shakespeare.txt"], 600, bigger / "tokenizer.model")
    (bigger / CONFIG_FILE).write_text(json.dumps({**config, "tokenizer": "tokenizer.model"}))
    with pytest.raises(ValueError, match="has 600 tokens, more than the model's 512 embeddings"):
        llama_jax.load(bigger)
    escaping = tmp_path / "escaping"
    shutil.copytree(model_dir, escaping)
    (escaping / "checksums.json").unlink()
    for name in ("../stories/tokenizer.bin", str(model_dir / "tokenizer.bin")):
        (escaping / CONFIG_FILE).write_text(json.dumps({**config, "tokenizer": name}))
        with pytest.raises(ValueError, match="must be a file name inside"):
            llama_jax.load(escaping)


def test_sft_whose_rows_hold_no_response_is_refused_before_anything_is_written(finished, workdir, assets, tmp_path):
    """a38b2de: `sft_example.yaml init_from=<tiny run> lora.rank=4 seq_len=32` trained 40 steps at loss 0.0
    over 0 tokens and reported eval loss 0.0, perplexity 1.0, exit 0 (every example is longer than a row)."""
    pristine, _ = finished
    config = load_train_config(
        REPO / "configs" / "sft_example.yaml",
        [f"init_from={pristine}", "lora.rank=4", "seq_len=32", f"run_dir={tmp_path / 'sft'}"]
        + [f"data_cache={workdir / 'cache'}", "mesh.data=2"],
    )
    with pytest.raises(ValueError, match=r"no training row holds a response token to learn: 48\d of 48\d examples"):
        run(config)
    assert not (tmp_path / "sft").exists()


def test_a_damaged_token_cache_is_reported_and_rebuilt_never_trained_on(finished, workdir, assets, tmp_path, caplog):
    """The tokenized corpus is shared by every later run on it: a38b2de trained on a tokens.bin cut in half
    (other losses, exit 0), and flipped validation ids changed the eval loss or made it NaN."""
    from llama_jax.train.data import prepare_data

    pristine, result = finished
    cache = shutil.copytree(workdir / "cache", tmp_path / "cache")
    run_dir = tmp_path / "run"
    entry = (
        cache / f"tokens-{prepare_data(tiny(workdir, assets, run_dir, f'data_cache={cache}'), None).corpus.key[:24]}"
    )
    tokens = (entry / "tokens.bin").read_bytes()
    (entry / "tokens.bin").write_bytes(tokens[: len(tokens) // 2])
    with caplog.at_level(logging.WARNING, logger="llama_jax"):
        rerun = run(tiny(workdir, assets, run_dir, f"data_cache={cache}"))
    assert f"the tokenized corpus {entry} is damaged (tokens.bin holds" in caplog.text
    assert (rerun["train_loss"], rerun["eval_loss"]) == (result["train_loss"], result["eval_loss"])
    assert (entry / "tokens.bin").read_bytes() == tokens  # built again, whole
    caplog.clear()
    flipped = bytearray(tokens)
    flipped[-64:] = bytes(b ^ 0x5A for b in flipped[-64:])  # the last rows: the validation split's ids
    (entry / "tokens.bin").write_bytes(bytes(flipped))
    with caplog.at_level(logging.WARNING, logger="llama_jax"):
        prepared = prepare_data(tiny(workdir, assets, run_dir, f"data_cache={cache}"), None)
    assert "(tokens.bin changed since it was written)" in caplog.text
    assert bytes(np.asarray(prepared.corpus.tokens)) == tokens


def test_a_model_directorys_config_and_tokenizer_are_covered_by_its_checksums(assets, tmp_path, caplog):
    """a38b2de read an edited config.json (a one-character norm_eps change alters every generation) and, with
    checksums.json gone, flipped weights, without a word."""
    model_dir = convert_llama2c(assets / "stories260K.bin", assets / "tok512.bin", tmp_path / "stories")
    edited = shutil.copytree(model_dir, tmp_path / "edited")
    text = (edited / CONFIG_FILE).read_text()
    assert '"norm_eps": 1e-05' in text
    (edited / CONFIG_FILE).write_text(text.replace('"norm_eps": 1e-05', '"norm_eps": 1e-06'))
    result = run_module("infer", "--checkpoint", edited, "--prompt", "Once", "--max-new-tokens", "4")
    assert_one_error_line(result, "config.json changed since the model was written")
    retokenized = shutil.copytree(model_dir, tmp_path / "retokenized")
    (retokenized / "tokenizer.bin").write_bytes((assets / "tok512.bin").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="tokenizer.bin changed since the model was written"):
        llama_jax.load(retokenized)
    unverifiable = shutil.copytree(model_dir, tmp_path / "unverifiable")
    (unverifiable / "checksums.json").unlink()
    flip_bytes(max(data_files(unverifiable / "params"), key=lambda f: f.stat().st_size))
    with caplog.at_level(logging.WARNING, logger="llama_jax"):
        try:
            llama_jax.load(unverifiable)
        except ValueError:
            pass  # values gone non-finite are still caught; the warning is the point
    assert any(
        "has no checksums.json: its weights, config and tokenizer cannot be verified" in r.getMessage()
        for r in caplog.records
    ), caplog.text


def test_outputs_appear_whole_with_normal_permissions_and_stale_partials_are_cleaned(assets, tmp_path):
    abandoned = tmp_path / ".stories.partial-999999999-abc"  # a killed conversion's leftovers (no such pid)
    abandoned.mkdir()
    (abandoned / "big.bin").write_bytes(b"\0" * 1000)
    model_dir = convert_llama2c(assets / "stories260K.bin", assets / "tok512.bin", tmp_path / "stories")
    assert not abandoned.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stories"]
    umask = os.umask(0)
    os.umask(umask)
    assert model_dir.stat().st_mode & 0o777 == 0o777 & ~umask


def test_evaluate_refuses_a_zero_window(assets, tmp_path):
    model_dir = convert_llama2c(assets / "stories260K.bin", assets / "tok512.bin", tmp_path / "stories")
    result = run_module(
        "llama_jax.evaluate",
        "--checkpoint",
        model_dir,
        "--data",
        assets / "tinystories_sample.txt",
        "--max-model-len",
        "0",
    )
    assert_one_error_line(result, "--max-model-len must be between 2 and the model's max_seq_len 512, got 0")


@pytest.fixture
def full_disk(tmp_path):
    """A 512 KiB filesystem (tmpfs needs root; else the test is skipped)."""
    mount = tmp_path / "full"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here to fill")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_under_training_checkpoints_stops_the_run_in_one_line(full_disk):
    """Orbax writes checkpoints from background threads, and its own finalizing thread takes a failed save's
    error: before, the run trained on and said `error: No space left on device` (from TensorBoard's flush at
    exit) followed by tracebacks of tensorboardX's threads."""
    run_dir = full_disk / "run"
    result = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/tiny_test.yaml", f"run_dir={run_dir}", "steps=40"],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Exception" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        f"error: No space left on device: {run_dir / CHECKPOINTS_DIR} (step 10; no checkpoint is written)"
    ), result.stderr[-3000:]
    # Every metrics line written is whole, and nothing claims a step that was not saved.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records and not list((run_dir / CHECKPOINTS_DIR).glob("[0-9]*[0-9]")), records


def test_a_full_disk_during_conversion_is_one_line_and_leaves_nothing(assets, full_disk):
    (full_disk / "filler").write_bytes(b"\0" * (400 << 10))  # stories260K needs about 1 MiB
    result = run_module(
        "llama_jax.convert",
        "llama2c",
        assets / "stories260K.bin",
        "--tokenizer",
        assets / "tok512.bin",
        "--out",
        full_disk / "stories",
    )
    line = assert_one_error_line(result)
    assert "No space left on device" in line or "RESOURCE_EXHAUSTED" in line or "space" in line.lower(), line
    # It names the output the user asked for, not the staging directory it was assembled in (gone by now).
    assert str(full_disk / "stories") in line and ".partial-" not in line, line
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]
