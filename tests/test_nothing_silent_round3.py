"""Nothing silent, round 3: a pretraining recipe reused to fine-tune takes the base's model and tokenizer and
refuses only what contradicts the base, by name; a model and a tokenizer that cannot belong together are refused
when the directory is written and when it is read (padding is not); an operating-system error names the user's
path; a bad SFT record says which and what is wrong; the loser of two conversions to one --out says so."""

import contextlib
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx

import llama_jax
from llama_jax.commands import convert as convert_command
from llama_jax.commands import infer
from llama_jax.commands.cli import run_cli
from llama_jax.config import preset
from llama_jax.errors import one_line
from llama_jax.inference import results_file
from llama_jax.model import create_model
from llama_jax.model_dir import PADDING_ROWS, write_model_dir
from llama_jax.sharding import MeshConfig, make_mesh
from llama_jax.tokenizers import load_tokenizer
from llama_jax.tokenizers.training import train_sentencepiece
from llama_jax.train import corpus_cache, run
from llama_jax.train.config import load_train_config
from llama_jax.train.data import prepare_data, trained_tokenizer
from llama_jax.train.init_from import build_model_config
from llama_jax.train.inputs import read_inputs
from llama_jax.train.sources import data_files, sft_texts

pytestmark = pytest.mark.slow  # commands run end to end, as test_reliability.py's: the whole suite runs them

REPO = Path(__file__).resolve().parents[1]
TINY_TEST = REPO / "configs" / "tiny_test.yaml"
NO_SPACE = os.strerror(errno.ENOSPC)


def one_error_line(stderr: str) -> str:
    """The one `error:` line a failed command ends with (after its progress lines, if any), no traceback."""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


def tiny_model_dir(out: Path, vocab_size: int, tokenizer: Path, **write) -> Path:
    config = preset("tiny").replace(vocab_size=vocab_size)
    model = create_model(config, make_mesh(MeshConfig(), jax.devices()[:1]), seed=0)
    return write_model_dir(out, config, nnx.to_pure_dict(nnx.state(model)), tokenizer, **write)


@contextlib.contextmanager
def warnings_logged():
    """The messages llama_jax logs inside the block (its logger may not propagate: `run_cli` prints its own)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("llama_jax")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


class FullDisk:
    """A file on a full disk: every write fails as the kernel reports it, naming no file."""

    def __init__(self, file):
        self._file = file

    def write(self, data):
        raise OSError(errno.ENOSPC, NO_SPACE)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


# --- 2. a pretraining recipe reused to fine-tune --------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Preference records, too few to train a 512-piece tokenizer on (which the recipe's train:512 would)."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    records = [{"prompt": f"Tom {i}?", "chosen": "Yes", "rejected": "No"} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def reused_recipe(base: Path, pairs: Path, tmp_path: Path, *extra: str):
    """configs/tiny_test.yaml (model: tiny, tokenizer: train:512) reused for DPO on `base` (stories260K)."""
    settings = [f"init_from={base}", "objective=dpo", f"data={pairs}", f"data_cache={tmp_path / 'cache'}"]
    return load_train_config(TINY_TEST, [*settings, f"run_dir={tmp_path / 'run'}", "eval_batches=1", *extra])


def test_a_pretraining_recipe_reused_to_fine_tune_takes_the_model_and_tokenizer_of_the_base(
    stories_model, pairs, tmp_path
):
    """Before: `cannot train a 512-piece tokenizer on this corpus` (the recipe's train:512, on the pairs), and
    with tokenizer=null `holds a different model: vocab_size=...` (the recipe's model: tiny)."""
    with warnings_logged() as warnings:
        config = reused_recipe(stories_model, pairs, tmp_path, "steps=1", "samples=0")
    inputs = read_inputs(config)
    [warning] = warnings
    assert "its model=tiny, tokenizer=train:512 give way to init_from" in warning and str(TINY_TEST) in warning
    assert config.model.preset is None and config.tokenizer is None and config.seq_len == 32  # the rest is kept
    base = llama_jax.model_dir.read_model_dir(stories_model)
    assert inputs.model_config.replace(dtype="float32", param_dtype="float32") == base.config
    assert inputs.tokenizer_path == stories_model / "tokenizer.bin"
    assert not list((tmp_path / "cache").glob("tokenizer-*")), "no tokenizer was trained on the pairs"
    report = run(config)
    assert report["step"] == 1 and report["vocab_size"] == 512
    # tokenizer=null (before: the recipe's model: tiny held against the base) reads the same base
    with warnings_logged() as warnings:
        config = reused_recipe(stories_model, pairs, tmp_path, "tokenizer=null")
    assert read_inputs(config).model_config == inputs.model_config
    assert "its model=tiny gives way" in warnings[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["model=tiny"], "holds a different model: dim=64 there but 48 here"),
        (["model=tiny"], "(set by model=tiny)"),
        (["model.dim=96"], "dim=64 there but 96 here (set by model.dim=96)"),
        (["model.vocab_size=1024"], "vocab_size=512 there but 1024 here (set by model.vocab_size=1024)"),
        (["tokenizer=train:512"], "tokenizer=train:512 would train a new tokenizer, but init_from"),
        (["tokenizer=OTHER"], "tokenizer=OTHER is not init_from"),
    ],
)
def test_a_setting_given_on_the_command_line_that_contradicts_the_base_is_refused_by_name(
    stories_model, pairs, tmp_path, extra, message
):
    other = tmp_path / "other.model"  # a tokenizer of the base's size that is not the base's
    if "tokenizer=OTHER" in extra:
        train_sentencepiece([REPO / "llama_jax" / "data" / "tinyshakespeare.txt"], 512, other)
    extra = [e.replace("OTHER", str(other)) for e in extra]
    with pytest.raises(ValueError) as error:
        read_inputs(reused_recipe(stories_model, pairs, tmp_path, *extra))
    assert message.replace("OTHER", str(other)) in str(error.value)
    assert "\n" not in str(error.value) and not (tmp_path / "run").exists()


def test_the_base_own_tokenizer_given_again_and_compute_settings_are_accepted(stories_model, pairs, tmp_path):
    same = tmp_path / "same.bin"
    shutil.copyfile(stories_model / "tokenizer.bin", same)
    inputs = read_inputs(reused_recipe(stories_model, pairs, tmp_path, f"tokenizer={same}", "model.remat=full"))
    assert inputs.model_config.remat == "full" and inputs.tokenizer.vocab_size == 512


def test_a_recipe_that_names_init_from_itself_is_held_to_its_model(stories_model, pairs, tmp_path):
    recipe = tmp_path / "fine_tune.yaml"
    recipe.write_text(TINY_TEST.read_text().replace("tokenizer: train:512\n", f"init_from: {stories_model}\n"))
    config = load_train_config(recipe, ["objective=dpo", f"data={pairs}", f"data_cache={tmp_path / 'cache'}"])
    with pytest.raises(ValueError, match=r"dim=64 there but 48 here.*\(set by model=tiny\)"):
        read_inputs(config)


def test_the_command_line_says_the_contradiction_in_one_line(stories_model, pairs, tmp_path, capsys):
    from llama_jax.commands import train

    argv = ["--config", str(TINY_TEST), f"init_from={stories_model}", "objective=dpo", f"data={pairs}"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, [*argv, "model=small", "tokenizer=null", f"run_dir={tmp_path / 'run'}"])
    assert exit_info.value.code == 2
    assert "(set by model=small)" in one_error_line(capsys.readouterr().err)


# --- 3. a model and a tokenizer that cannot belong together ---------------------------------------------------


def test_a_model_far_larger_than_its_tokenizer_is_refused_when_written(assets, tmp_path):
    """Before: written, loaded, then IndexError while decoding a generated id >= 512."""
    with pytest.raises(ValueError, match="has 512 tokens but the model 32000 embeddings") as error:
        tiny_model_dir(tmp_path / "model", 32000, assets / "tok512.bin")
    assert "\n" not in str(error.value) and not (tmp_path / "model").exists()
    assert list(tmp_path.iterdir()) == [], "no staging directory is left behind"


def test_a_model_far_larger_than_its_tokenizer_is_refused_when_read(assets, tmp_path, monkeypatch, capsys):
    """A directory written before the check (or by other tools) is refused by `load` and infer.py alike."""
    monkeypatch.setattr(llama_jax.model_dir, "check_tokenizer_fits", lambda tokenizer, config: None)
    model = tiny_model_dir(tmp_path / "model", 32000, assets / "tok512.bin")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="has 512 tokens but the model 32000 embeddings"):
        llama_jax.load(model)
    with pytest.raises(SystemExit):
        run_cli(infer.main, ["--checkpoint", str(model), "--prompt", "Tom", "--max-new-tokens", "2"])
    assert "it belongs to another model" in one_error_line(capsys.readouterr().err)


def test_a_padded_vocabulary_is_accepted_and_its_padding_ids_are_refused_by_decoding(assets, tmp_path):
    padded = 512 + PADDING_ROWS - 1
    loaded = llama_jax.load(tiny_model_dir(tmp_path / "model", padded, assets / "tok512.bin"))
    assert loaded.config.vocab_size == padded and loaded.tokenizer.vocab_size == 512
    with pytest.raises(ValueError, match="token id 600 is outside the 512 ids of tokenizer"):
        loaded.tokenizer.decode([1, 300, 600])
    assert loaded.tokenizer.decode([1, 300]) == load_tokenizer(assets / "tok512.bin").decode([1, 300])


@pytest.mark.parametrize("name", ["trained", "llama3"])
def test_every_tokenizer_refuses_an_id_outside_its_vocabulary(name, tmp_path, request):
    if name == "llama3":
        tokenizer = request.getfixturevalue("llama3_tok")  # skipped where Meta's file is not provided
    else:
        path = train_sentencepiece([REPO / "llama_jax" / "data" / "tinyshakespeare.txt"], 400, tmp_path / "t.model")
        tokenizer = load_tokenizer(path)
    hello = tokenizer.encode("Hello", bos=True)
    assert tokenizer.decode(hello) == "Hello"
    for outside in (tokenizer.vocab_size, tokenizer.vocab_size + 7, -1):
        with pytest.raises(ValueError, match=f"token id {outside} is outside the {tokenizer.vocab_size} ids"):
            tokenizer.decode([*hello, outside])


def test_training_refuses_a_model_vocabulary_far_past_its_tokenizer():
    config = load_train_config(None, ["model=tiny", "model.vocab_size=32000", "seq_len=32"])
    with pytest.raises(ValueError, match="the model has 32000 embeddings but the tokenizer only 512 tokens"):
        build_model_config(config, "cpu", vocab_size=512)
    assert build_model_config(config, "cpu", vocab_size=31999).vocab_size == 32000  # one padding row


# --- 4. errors that name their path ---------------------------------------------------------------------------


def test_a_full_disk_under_infer_output_names_the_output(stories_model, tmp_path, monkeypatch, capsys):
    """Before: `error: No space left on device`, no file named."""
    out = tmp_path / "out.jsonl"

    def full_output(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        return FullDisk(file) if Path(path) == out and "a" in mode and "+" not in mode else file

    monkeypatch.setattr(results_file, "open", full_output, raising=False)
    argv = ["--checkpoint", str(stories_model), "--prompt", "Tom", "--max-new-tokens", "2", "--output", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(infer.main, argv)
    assert exit_info.value.code == 2
    assert one_error_line(capsys.readouterr().err) == f"error: {NO_SPACE}: {out}"


def test_a_full_disk_under_standard_output_says_so(stories_model, tmp_path):
    """`infer.py ... > FILE` on a full disk (/dev/full). Before: `error: No space left on device`."""
    argv = ["infer.py", "--checkpoint", str(stories_model), "--prompt", "Tom", "--max-new-tokens", "2"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, *argv], cwd=REPO, env=env, stdout=full, stderr=subprocess.PIPE, text=True
        )
    assert result.returncode == 2
    assert one_error_line(result.stderr) == f"error: {NO_SPACE}: standard output"


def test_a_full_disk_while_caching_a_corpus_names_the_cache_entry(tmp_path, monkeypatch):
    def full_tokens(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        return FullDisk(file) if Path(path).name == "tokens.bin" else file

    monkeypatch.setattr(corpus_cache, "open", full_tokens, raising=False)
    with pytest.raises(OSError) as error:
        corpus_cache.tokenize_corpus([([1, 5, 6, 2], None)], "k" * 64, tmp_path / "cache")
    entry = tmp_path / "cache" / f"tokens-{'k' * 24}"
    assert one_line(error.value) == f"{NO_SPACE}: {entry}"
    assert list((tmp_path / "cache").iterdir()) == [], "the staged entry is removed"


def test_a_full_disk_while_caching_a_trained_tokenizer_names_the_cache_entry(tmp_path, monkeypatch):
    def full_disk(self, data):
        raise OSError(errno.ENOSPC, NO_SPACE)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    texts = (REPO / "llama_jax" / "data" / "tinyshakespeare.txt").read_text().splitlines()[:2000]
    with pytest.raises(OSError) as error:
        trained_tokenizer(texts, 400, "t" * 64, tmp_path / "cache")
    assert one_line(error.value) == f"{NO_SPACE}: {tmp_path / 'cache' / ('tokenizer-' + 't' * 24 + '-400')}"


def test_a_full_disk_while_writing_a_model_directory_names_it(assets, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, NO_SPACE)

    monkeypatch.setattr(llama_jax.model_dir, "save_params", full_disk)
    with pytest.raises(OSError) as error:
        tiny_model_dir(tmp_path / "model", 512, assets / "tok512.bin")
    assert one_line(error.value) == f"{NO_SPACE}: {tmp_path / 'model'}"


def test_a_full_disk_under_training_logs_names_the_file(tmp_path, monkeypatch):
    """TensorBoard's event file and metrics.jsonl are written in the training loop's thread: a write that
    fails names the file or directory (before, TensorBoard's worker thread failed and `close` said only
    `No space left on device`)."""
    from tensorboardX import record_writer

    from llama_jax.train.metrics import METRICS_FILE, TENSORBOARD_DIR, TrainLogger

    logger = TrainLogger(
        tmp_path, enabled=True, steps=2, start_step=0, tokens_per_step=1, flops_per_token=1.0, peak_flops_total=None
    )
    logger.train(1, {"loss": 2.0})
    monkeypatch.setattr(record_writer.RecordWriter, "flush", lambda self: FullDisk(None).write(b""))
    with pytest.raises(OSError) as error:
        logger.train(2, {"loss": 1.0})
    assert one_line(error.value) == f"{NO_SPACE}: {tmp_path / TENSORBOARD_DIR}"
    monkeypatch.undo()
    logger._jsonl = FullDisk(logger._jsonl)
    with pytest.raises(OSError) as error:
        logger.eval(2, 1.5)
    assert one_line(error.value) == f"{NO_SPACE}: {tmp_path / METRICS_FILE}"


def sft_config(tmp_path: Path, data: Path, tokenizer: str):
    settings = ["sft=true", f"data={data}", f"tokenizer={tokenizer}", f"data_cache={tmp_path / 'cache'}"]
    return load_train_config(None, settings)


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"prompt": 3, "response": "Paris."}, '"prompt" is a number, not a string'),
        ({"prompt": "Capital of France?"}, 'the "response" field is missing'),
        ({"prompt": "Capital?", "response": None}, '"response" is null, not a string'),
    ],
)
def test_a_bad_sft_record_is_named_when_a_tokenizer_is_trained_on_the_records(tmp_path, record, problem):
    """Before: `cannot train a 400-piece tokenizer on this corpus: INTERNAL: ValueError: ...`."""
    data = tmp_path / "sft.jsonl"
    good = [{"prompt": f"Line {i} of the play?", "response": "Yes."} for i in range(200)]
    data.write_text("".join(json.dumps(r) + "\n" for r in [*good, record]))
    with pytest.raises(ValueError) as error:
        prepare_data(sft_config(tmp_path, data, "train:400"), None)
    assert str(error.value).startswith(f"{data}:201: {problem}") and "INTERNAL" not in str(error.value)
    with pytest.raises(ValueError) as direct:
        train_sentencepiece(sft_texts(data_files(str(data))), 400, tmp_path / "t.model")
    assert str(direct.value) == str(error.value)


def test_an_sft_record_that_is_not_text_is_named(assets, tmp_path):
    """Before: SentencePiece's `RuntimeError: Unable to cast Python instance of type <class 'str'>`, a traceback."""
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "Hi", "response": "Yes."}\n{"prompt": "a\\ud800b", "response": "No."}\n')
    with pytest.raises(ValueError) as error:
        prepare_data(sft_config(tmp_path, data, str(assets / "tok512.bin")), None)
    assert str(error.value).startswith(f'{data}:2: "prompt" is not text: it holds')


def test_a_conversion_to_an_out_another_is_writing_is_refused_at_its_start(assets, tmp_path, capsys):
    """A live writer's staging directory beside OUT (its process runs): the second conversion stops before
    converting anything, and leaves the first one's work alone."""
    out = tmp_path / "out"
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as writer:
        try:
            staging = tmp_path / f".out.partial-{writer.pid}-x"
            staging.mkdir()
            (staging / "params").write_text("the other conversion's")
            argv = ["llama2c", str(assets / "stories260K.bin"), "--tokenizer", str(assets / "tok512.bin")]
            with pytest.raises(SystemExit) as exit_info:
                run_cli(convert_command.main, [*argv, "--out", str(out)])
        finally:
            writer.kill()
    assert exit_info.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"error: another process (pid {writer.pid}) is writing {out}: wait for it, or choose another output"
    assert sorted(p.name for p in tmp_path.iterdir()) == [staging.name]
    assert (staging / "params").read_text() == "the other conversion's"


def test_the_loser_of_two_conversions_to_one_out_says_another_is_writing_it(assets, tmp_path, monkeypatch, capsys):
    """Two conversions checked OUT was new at the same moment; the other one renamed its result into place first.
    Before: `error: Directory not empty: OUT`."""
    out = tmp_path / "out"
    save_params = llama_jax.model_dir.save_params

    def the_other_finishes_first(path, params):
        save_params(path, params)
        out.mkdir()
        (out / "config.json").write_text("the other conversion's")

    monkeypatch.setattr(llama_jax.model_dir, "save_params", the_other_finishes_first)
    argv = ["llama2c", str(assets / "stories260K.bin"), "--tokenizer", str(assets / "tok512.bin"), "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(convert_command.main, argv)
    assert exit_info.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: another conversion is writing {out}")
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text().startswith("the")
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "this conversion's staging directory is removed"
