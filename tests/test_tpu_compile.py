"""Compiling for TPU slices from this CPU host with libtpu: the real train, eval, prefill and decode programs
of a tiny model for two slices, the splash kernel compiled as Mosaic, a batch too large for the chips'
HBM reported as not fitting, and the slice names users type."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from llama_jax.hardware import tpu_slice
from llama_jax.train.config import load_train_config

pytestmark = pytest.mark.slow  # the fast suite (-m 'not slow') leaves this module out

REPO = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed (pip install -e '.[tpu]')"
)
# Two 128-wide heads (one KV head) and 256 positions: the shapes the splash kernel tiles.
TINY = [
    "model=tiny",
    "model.dim=256",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.ffn_dim=512",
    "model.vocab_size=1024",
    "model.max_seq_len=256",
    "seq_len=256",
    "batch_size=8",
]


@pytest.mark.parametrize(
    "name, topology, chips",
    [
        ("v5e-1", "v5e:1x1", 1),
        ("v5e-4", "v5e:2x2", 4),
        ("v5e-256", "v5e:16x16", 256),
        ("v6e-8", "v6e:2x4", 8),
        ("v4-8", "v4:2x2x1", 4),
        ("v4-4096", "v4:8x16x16", 2048),
        ("v5p-8", "v5p:2x2x1", 4),
        ("v5p-640", "v5p:4x4x20", 320),
        ("v5p-1152", "v5p:4x12x12", 576),
        ("v5p-12288", "v5p:16x16x24", 6144),
    ],
)
def test_slice_names_give_google_clouds_topologies(name, topology, chips):
    tpu = tpu_slice(name)
    assert (tpu.topology, tpu.chips) == (topology, chips)
    assert tpu.chips_per_host == ((1, 1, 1) if chips == 1 else (2, 2, 1))
    assert tpu.chip_config == ("megacore" if name.startswith(("v4", "v5p")) else "default")


@pytest.mark.parametrize("name", ["v5e-3", "v5p-100", "v7-8", "tpu", "v5litepod-16", "0xv5p-128", "2x v5p-128"])
def test_unknown_slices_are_refused(name):
    with pytest.raises(ValueError, match="TPU slice|slice of"):
        tpu_slice(name)


def test_several_slices_are_one_slice_shape_times_n():
    two = tpu_slice("2xV5P-128")
    assert (two.name, two.topology, two.slices, two.chips_per_slice, two.chips) == (
        "2xv5p-128",
        "v5p:4x4x4",
        2,
        64,
        128,
    )
    assert tpu_slice("v5p-128").slices == 1


@needs_libtpu
def test_the_data_axis_spans_the_slices_and_the_recipe_mesh_is_one_slices():
    """The recipe's mesh (fsdp=4 here) describes one slice; devices of two slices double the data axis, and
    each data row of the mesh lies in one slice, so only what is reduced over data crosses DCN."""
    from llama_jax.hardware import slice_devices
    from llama_jax.sharding import MeshConfig, make_mesh, mesh_slices

    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=1), slice_devices(tpu_slice("2xv5e-4")))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1} and mesh_slices(mesh) == 2
    assert [sorted({d.slice_index for d in row.flat}) for row in mesh.devices] == [[0], [1]]


@needs_libtpu
def test_a_multislice_train_step_sends_one_gradient_over_dcn_whatever_grad_accum_is(tpu_precision):
    """The bytes come from the compiled program's sends to the Megascale (DCN) runtime, times the trip count of
    the loops around them. Each slice sums its micro-batches' gradients and the slices' sums are all-reduced
    once (float32): one gradient shard per chip per step, for 1, 2 or 4 micro-batches. (With one micro-batch
    XLA reduces the embedding's gradient over DCN before its FSDP reduce-scatter: half the table, not a quarter.)"""
    from llama_jax.train.compile import compile_training
    from llama_jax.train.init_from import build_model_config

    sent = {}
    for accum in (1, 2, 4):
        config = load_train_config(None, [*TINY, "mesh.data=1", "mesh.fsdp=4", f"grad_accum={accum}", "batch_size=32"])
        train, evaluate = compile_training(config, tpu_slice("2xv5e-4"))
        assert train.fits and evaluate.dcn_bytes < 1024  # evaluation's DCN traffic: its loss sums
        sent[accum] = train.dcn_bytes
    params = build_model_config(config, "tpu").param_count()
    f32_gradient_shard = params * 4 / 4  # each chip's fsdp shard
    assert all(f32_gradient_shard <= bytes_ <= 1.25 * f32_gradient_shard for bytes_ in sent.values()), (sent, params)
    assert sent[2] == sent[4], sent


@pytest.fixture
def tpu_precision():
    """The suite asks for float32 matmuls everywhere (conftest); Mosaic refuses them for bf16 kernels, as a TPU
    program would never use them."""
    with jax.default_matmul_precision("default"):
        yield


@needs_libtpu
def test_train_and_eval_steps_compile_for_v5e_with_the_splash_kernel(tpu_precision):
    from llama_jax.train.compile import compile_training

    train, evaluate = compile_training(load_train_config(None, TINY), tpu_slice("v5e-4"))
    for report in (train, evaluate):
        assert report.fits and report.attention == "splash", report  # Mosaic custom calls in the program
        assert 0 < report.peak_bytes < report.hbm_bytes <= 16 * 2**30  # what XLA may use of a v5e's 16 GiB
    assert train.argument_bytes > evaluate.argument_bytes  # the optimizer state


@needs_libtpu
@pytest.mark.parametrize(
    "target, mesh",
    [
        ("v5e-4", ["mesh.data=1", "mesh.fsdp=2"]),
        ("v5e-4", ["mesh.data=2", "mesh.fsdp=1"]),
        ("2xv5e-4", ["mesh.data=1", "mesh.fsdp=2", "grad_accum=2"]),  # data groups over DCN, FSDP and context
    ],
)
def test_a_context_parallel_step_compiles_for_v5e_with_the_splash_kernel_per_chip(tpu_precision, target, mesh):
    """Sequences split over 2 chips (context parallelism), beside FSDP, a data axis (the data groups'
    shard_map) or both across two slices: the splash kernel runs per chip on its queries, with its rows of the
    load-balanced mask."""
    from llama_jax.train.compile import compile_training

    config = load_train_config(None, [*TINY, *mesh, "mesh.context=2", "seq_len=512", "model.max_seq_len=512"])
    for report in compile_training(config, tpu_slice(target)):
        assert report.fits and report.attention == "splash", report


@needs_libtpu
def test_the_engines_prefill_and_decode_compile_for_v4_with_the_splash_and_ragged_paged_kernels(tpu_precision):
    from llama_jax.inference.compile import compile_inference
    from llama_jax.inference.settings import EngineSettings
    from llama_jax.sharding import MeshConfig
    from llama_jax.train.init_from import build_model_config

    # Heads of 128, as Llama's: the ragged paged kernel tiles heads by the TPU's 128 lanes.
    model = build_model_config(load_train_config(None, TINY), "tpu").replace(head_dim=128)
    settings = EngineSettings(max_num_seqs=4, max_model_len=128 + 64)
    reports, kv_cache = compile_inference(model, tpu_slice("v4-8"), MeshConfig(data=2, tensor=2), settings, [100, 128])
    assert [r.name for r in reports] == ["prefill_128", "decode"]  # both prompts fall in one bucket
    prefill, decode = reports
    assert prefill.fits and decode.fits
    assert prefill.attention == "splash"  # the prompt's self-attention is the Mosaic kernel training uses
    assert decode.attention == "ragged_paged"  # decoding reads the pages through JAX's Mosaic kernel
    narrow, _ = compile_inference(model.replace(head_dim=64), tpu_slice("v4-8"), MeshConfig(data=4), settings, [100])
    assert narrow[1].attention == "xla"  # heads narrower than a lane: the XLA reader of the pages


@needs_libtpu
def test_a_grpo_run_compiles_its_train_step_and_its_rollouts_beside_the_optimizer_state(tpu_precision, tmp_path):
    """GRPO's --compile-for: the train step and the engine's rollout programs on the same weights (prefill of the
    longest prompt that leaves room for a completion, decode of batch_size sequences through the paged kernel).
    A rollout program's peak counts the optimizer state held while it runs: full fine-tuning's AdamW moments
    (8 bytes a parameter) are in it; LoRA's are a few adapters'."""
    from llama_jax.model_dir import write_config
    from llama_jax.train.compile import compile_training
    from llama_jax.train.init_from import build_model_config

    model = build_model_config(load_train_config(None, TINY), "tpu").replace(head_dim=128)
    write_config(tmp_path, model, None, None)
    grpo = [f"init_from={tmp_path}", "objective=grpo", "reward=exact_match:answer", "grpo.num_generations=4"]
    run = [setting for setting in TINY if not setting.startswith("model")]  # the model is init_from's
    peaks = {}
    for name, extra in (("full", []), ("lora", ["lora.rank=8"])):
        config = load_train_config(None, [*run, *grpo, "grpo.max_completion_length=64", *extra])
        reports = compile_training(config, tpu_slice("v5e-1"))
        assert [r.name for r in reports] == ["train_step", "rollout_prefill_256", "rollout_decode"]
        assert all(r.fits for r in reports) and reports[2].attention == "ragged_paged"
        peaks[name] = reports[2].peak_bytes
    moments = 8 * model.param_count()
    assert peaks["full"] > moments > peaks["lora"], (peaks, moments)


@needs_libtpu
def test_infer_compiles_for_a_slice_of_four_hosts(tmp_path):
    """v5e-16: four TPU VMs of four chips each, which a multi-host infer.py or server runs on: the engine's
    programs compile for all 16 chips, and the report says how many hosts they span."""
    result = subprocess.run(
        [sys.executable, "infer.py", "--compile-for", "v5e-16", "--model", "tiny", "--mesh", "data=4,tensor=4"]
        + ["--max-num-seqs", "8", "--prompt-len", "32", "--max-new-tokens", "16"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert (report["chips"], report["hosts"], report["fits"]) == (16, 4, True)
    assert set(report["functions"]) == {"prefill_32", "decode"}
    kv = report["kv_cache"]  # the default pool: 8 sequences of 48 positions rounded up to a prefill chunk of 256
    assert (kv["pages"], kv["block_size"], kv["tokens"], kv["sequences"]) == (16, 128, 2048, 8)


@needs_libtpu
def test_a_batch_beyond_the_chips_memory_is_reported_as_not_fitting(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "--compile-for", "v4-8", *TINY, "batch_size=65536"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "HOME": str(tmp_path)},
    )
    assert result.returncode == 1 and result.stdout, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["target"] == "v4-8" and report["chips"] == 4 and not report["fits"]
    assert not report["functions"]["train_step"]["fits"]
    assert report["functions"]["train_step"]["per_chip_gib"] > report["functions"]["train_step"]["hbm_gib"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [result.stderr.strip().splitlines()[-1]] and "does not fit" in errors[0]
    # Minutes of compiling for a real recipe are never silent: each function is announced, then timed.
    assert "compiling train_step for 4 × TPU v4 ..." in result.stderr, result.stderr[-3000:]
    assert re.search(r"train_step: does not fit \(\d+\.\d s\)", result.stderr)
    assert re.search(r"eval_step: lowered in \d+\.\d s, compiled in \d+\.\d s", result.stderr)


def test_a_bad_slice_name_exits_2():
    result = subprocess.run(
        [sys.executable, "train.py", "--compile-for", "v9-8"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and result.stderr.strip().startswith("error: unknown TPU slice 'v9-8'")
