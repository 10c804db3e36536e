"""Compiling for NVIDIA GPUs from this CPU host: target names, the device description XLA is given, and — with
JAX's CUDA plugin installed (the `gpu-compile` extra) — the real H100 programs of a tiny model: the train and
eval steps with cuDNN's flash attention in them, the engine's prefill and decode, and a batch beyond the GPU's
memory reported as not fitting."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_tpu_compile import TINY as TPU_TINY

from llama_jax.hardware import GPU_DEVICES, MiB, compile_target, gpu_target, gpu_target_config, has_cuda_plugin

pytestmark = pytest.mark.slow  # the fast suite (-m 'not slow') leaves this module out

REPO = Path(__file__).resolve().parents[1]
needs_cuda_plugin = pytest.mark.skipif(
    not has_cuda_plugin(), reason="JAX's CUDA plugin is not installed (pip install -e '.[gpu-compile]')"
)
# The tiny model of test_tpu_compile (128-wide heads, which cuDNN's flash attention takes), in bf16 as on a GPU.
TINY = [*TPU_TINY, "dtype=bfloat16"]


@pytest.mark.parametrize("name, gpu, count", [("1xH100", "H100", 1), ("8xh100", "H100", 8), ("8xH200", "H200", 8)])
def test_gpu_target_names(name, gpu, count):
    target = compile_target(name)
    assert (target.gpu, target.count, target.chips, target.slices) == (gpu, count, count, 1)


@pytest.mark.parametrize("name", ["16xH100", "0xH100"])
def test_more_gpus_than_one_host_are_refused(name):
    with pytest.raises(ValueError, match="1 to 8 GPUs of one host"):
        gpu_target(name)


def test_other_names_are_not_gpu_targets():
    assert gpu_target("v5p-128") is None and gpu_target("8xA100") is None
    with pytest.raises(ValueError, match="unknown TPU slice"):
        compile_target("8xA100")


@needs_cuda_plugin
def test_the_device_description_is_an_h100s():
    config = gpu_target_config("H100")
    assert "cuda_compute_capability { major: 9 minor: 0 }" in config
    assert "core_count: 132" in config and f"device_memory_size: {81559 * MiB}" in config
    assert "dnn_version_info { major: 9" in config and "runtime_version { major: 12" in config
    assert GPU_DEVICES["H200"].memory_bytes > GPU_DEVICES["H100"].memory_bytes


@needs_cuda_plugin
def test_train_and_eval_steps_compile_for_8xh100_with_cudnn_flash_attention():
    from llama_jax.train.compile import compile_training
    from llama_jax.train.config import load_train_config

    train, evaluate = compile_training(load_train_config(None, [*TINY, "mesh.fsdp=8"]), compile_target("8xH100"))
    for report in (train, evaluate):
        assert report.fits and report.attention == "cudnn", report  # cuDNN's fused attention call in the program
        assert 0 < report.peak_bytes < report.hbm_bytes == int(0.75 * 81559 * MiB)  # JAX's default share
    assert train.argument_bytes > evaluate.argument_bytes  # the optimizer state


@needs_cuda_plugin
def test_a_context_parallel_step_compiles_for_8xh100_with_xla_attention():
    """cuDNN's partitioner wants queries, keys and values split alike; a split sequence takes XLA's attention."""
    from llama_jax.train.compile import compile_training
    from llama_jax.train.config import load_train_config

    config = load_train_config(None, [*TINY, "mesh.fsdp=4", "mesh.context=2", "seq_len=512", "model.max_seq_len=512"])
    for report in compile_training(config, compile_target("8xH100")):
        assert report.fits and report.attention == "xla", report


@needs_cuda_plugin
def test_the_engines_programs_compile_for_one_h100():
    from llama_jax.inference.compile import compile_inference
    from llama_jax.inference.settings import EngineSettings
    from llama_jax.sharding import MeshConfig
    from llama_jax.train.config import load_train_config
    from llama_jax.train.init_from import build_model_config

    model = build_model_config(load_train_config(None, TINY), "gpu")
    settings = EngineSettings(max_num_seqs=4, max_model_len=164)
    reports, _ = compile_inference(model, compile_target("1xH100"), MeshConfig(), settings, prompt_lens=[100])
    assert [r.name for r in reports] == ["prefill_128", "decode"] and all(r.fits for r in reports)
    assert reports[0].attention == "cudnn"


@needs_cuda_plugin
def test_a_batch_beyond_the_gpus_memory_is_reported_as_not_fitting(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "--compile-for", "1xH100", *TINY, "batch_size=65536", "grad_accum=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},  # no JAX_PLATFORMS: the command chooses the CPU
    )
    assert result.returncode == 1 and result.stdout, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["target"] == "1xH100" and not report["fits"]
    train = report["functions"]["train_step"]
    assert train["per_chip_gib"] > train["hbm_gib"] and train["attention"] == "cudnn"
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: train_step"), lines
    assert "not fit in the memory of one chip of 1xH100" in lines[-1]
    assert not [line for line in lines if "Traceback" in line or "CUDA" in line], result.stderr[-3000:]
