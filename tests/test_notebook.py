"""The Colab notebook, run as a fresh Colab runtime runs it (`notebooks/run_like_colab.py`), and the one
repository address that it, README and pyproject.toml share."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the fast suite (-m 'not slow') leaves this module out

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "colab_tpu.ipynb"


def test_the_colab_notebook_runs_on_a_fresh_runtime(tmp_path):
    """A new environment without llama_jax, the notebook alone in an empty folder, the repository cloned from
    a snapshot of this checkout: the first cell has to install the package it clones (a clone named llama_jax
    in the working directory once passed for the package and the next cell failed)."""
    nbformat = pytest.importorskip("nbformat")
    out = tmp_path / "executed.ipynb"
    command = [sys.executable, str(REPO / "notebooks" / "run_like_colab.py"), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    errors = []
    if out.is_file():
        cells = [c for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code"]
        errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert result.returncode == 0 and not errors, (result.stdout[-3000:], result.stderr[-3000:], errors)
    first = "".join(o.get("text", "") for o in cells[0].outputs)
    # Installed into the new environment from the clone, not found in this checkout.
    assert "llama_jax from" in first and "site-packages" in first and str(REPO) not in first, first
    last = "".join(o.get("text", "") for o in cells[-1].outputs)
    assert "adapter_config.json" in last, last


def test_the_repository_address_is_written_once():
    url = re.search(r'^Repository = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    owner_name = url.removeprefix("https://github.com/")
    badge = f"https://colab.research.google.com/github/{owner_name}/blob/main/notebooks/colab_tpu.ipynb"
    notebook = NOTEBOOK.read_text()
    assert f'\\"LLAMA_JAX_REPO_URL\\", \\"{url}\\"' in notebook  # the default the first cell clones
    for name, text in (("README.md", (REPO / "README.md").read_text()), ("the notebook", notebook)):
        assert badge in text, f"{name} has no Colab badge for {url}"
        others = set(re.findall(r"(?:github\.com|colab\.research\.google\.com/github)/([\w.-]+/[\w.-]+)", text))
        assert others <= {owner_name}, f"{name} names other repositories: {others - {owner_name}}"
