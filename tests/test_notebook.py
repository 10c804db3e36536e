"""The Colab notebook, end to end on this CPU with its tiny setting, as `pytest --nbmake` runs it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "colab_tpu.ipynb"


def test_the_colab_notebook_runs_end_to_end(tmp_path):
    pytest.importorskip("nbmake")
    env = {
        **os.environ,
        "LLAMA_JAX_NOTEBOOK_TINY": "1",
        "LLAMA_JAX_NOTEBOOK_DIR": str(tmp_path / "work"),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    }
    command = [sys.executable, "-m", "pytest", "--nbmake", "-n", "0", "-p", "no:cacheprovider", str(NOTEBOOK)]
    result = subprocess.run(command, cwd=NOTEBOOK.parent, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert (tmp_path / "work" / "peft_adapter" / "adapter_config.json").is_file()
