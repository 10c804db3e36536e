"""`benchmarks/gpu.py` waits for a lent GPU; its smoke mode runs here so that it cannot rot: every benchmark it
drives runs at toy sizes on the CPU, both frameworks, and its table and JSON come out with every number."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the fast suite (-m 'not slow') leaves this module out

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("torch", reason="the benchmark races transformers: pip install -e '.[parity]'")


def test_the_gpu_benchmark_runs_in_smoke_mode(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["smoke"] and set(report["decode"]) == {"1", "4"}
    for side in report["decode"].values():
        assert side["llama_jax"] > 0 and side["hf_static"] > 0
    assert 0 < report["roofline_share_batch_1"]
    assert report["train"]["llama_jax"]["mfu"] > 0 and report["train"]["pytorch"]["tokens_per_s"] > 0
    assert report["ragged"]["llama_jax"] > 0 and report["ragged"]["hf_continuous"] > 0
    table = "\n".join(lines[:-1])
    for measure in ("decode tokens/s, batch 1", "share of HBM roofline", "training MFU", "ragged job"):
        assert measure in table
