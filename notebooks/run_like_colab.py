"""Run the Colab notebook as a fresh Colab runtime runs it, on this machine, and write the executed notebook.

    python notebooks/run_like_colab.py OUT.ipynb                             # tiny settings, as CI runs it
    python notebooks/run_like_colab.py --full notebooks/colab_tpu.ipynb      # the real run, outputs kept

A Colab runtime has JAX and the other dependencies but not llama_jax, and it opens the notebook on its own, in
an empty folder. So, from the environment this script runs in (where llama_jax's dependencies are installed):

  * a new virtual environment that sees this one's packages except llama_jax;
  * the notebook copied into an empty folder;
  * the repository URL (`LLAMA_JAX_REPO_URL`) pointing at a snapshot of this checkout — its working tree,
    committed to a throwaway git repository — which the notebook clones as it clones GitHub on Colab;
  * pip offline (`PIP_NO_INDEX`), so installing takes what the runtime has and downloads nothing;
  * every cell run top to bottom by nbclient, in a kernel of the new environment, with
    `LLAMA_JAX_NOTEBOOK_TINY=1` unless --full. A cell that fails stops the run: exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "colab_tpu.ipynb"
# What the new environment must not see: the package and its editable install.
HIDDEN_PREFIXES = ("llama_jax", "__editable__", "__editable___llama_jax")


def snapshot_of_checkout(out: Path) -> Path:
    """The checkout's working tree (tracked and untracked files, not ignored ones) as a one-commit git repo."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (entry.decode() for entry in listed)):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree is left out
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, out / name)
    git = ["git", "-c", "user.name=snapshot", "-c", "user.email=snapshot@localhost", "-C", str(out)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "snapshot of the checkout"], check=True)
    return out


def runtime_without_llama_jax(out: Path) -> Path:
    """A virtual environment whose python sees this environment's packages but not llama_jax; its python."""
    venv.create(out, with_pip=False, symlinks=True)
    python = out / "bin" / "python"
    new_site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # A folder of links to this environment's packages, minus llama_jax: on sys.path through a .pth line, after
    # the new environment's own site-packages, where the notebook's `pip install` puts llama_jax. (.pth files in
    # it are not processed: that is what keeps the editable install of this checkout out.)
    inherited = out / "inherited"
    inherited.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(HIDDEN_PREFIXES) and entry.suffix != ".pth":
            (inherited / entry.name).symlink_to(entry)
    (new_site / "inherited.pth").write_text(f"{inherited}\n")
    # The kernel nbclient starts must be this python: a kernel spec inside the environment, first on JUPYTER_PATH.
    kernel = out / "share" / "jupyter" / "kernels" / "python3"
    kernel.mkdir(parents=True)
    spec = {
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (fresh runtime)",
        "language": "python",
    }
    (kernel / "kernel.json").write_text(json.dumps(spec))
    return python


EXECUTE = """
import sys, nbclient, nbformat
source, out, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3])
notebook = nbformat.read(source, as_version=4)
folder = str(__import__("pathlib").Path(source).parent)
resources = {"metadata": {"path": folder}}  # the kernel's working folder
client = nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources=resources)
try:
    client.execute()
finally:
    nbformat.write(notebook, out)
"""


def run(out: Path, full: bool, timeout: int = 1800) -> int:
    with tempfile.TemporaryDirectory(prefix="colab-like-") as scratch:
        scratch = Path(scratch)
        origin = snapshot_of_checkout(scratch / "origin")
        python = runtime_without_llama_jax(scratch / "runtime")
        content = scratch / "content"  # Colab's working folder: empty but for the notebook
        content.mkdir()
        shutil.copy(NOTEBOOK, content / NOTEBOOK.name)
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("LLAMA_JAX_NOTEBOOK", "PYTHON", "VIRTUAL_ENV", "PIP_", "JUPYTER"))
        }
        env.update(
            LLAMA_JAX_REPO_URL=origin.as_uri(),
            JUPYTER_PATH=str(scratch / "runtime" / "share" / "jupyter"),
            PIP_NO_INDEX="1",
            PIP_NO_BUILD_ISOLATION="0",  # pip's spelling of "build with the setuptools already installed"
            PIP_DISABLE_PIP_VERSION_CHECK="1",
            JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"),
            PATH=f"{python.parent}{os.pathsep}{env.get('PATH', '')}",
        )
        if not full:
            env["LLAMA_JAX_NOTEBOOK_TINY"] = "1"
        executed = content / "executed.ipynb"
        result = subprocess.run(
            [str(python), "-c", EXECUTE, str(content / NOTEBOOK.name), str(executed), str(timeout)], env=env
        )
        if executed.is_file():
            write_as_read(executed, out)
        return result.returncode


def write_as_read(executed: Path, out: Path) -> None:
    """The executed notebook, each cell's stream outputs joined and a progress bar's redraws (carriage
    returns) reduced to what a reader saw last."""
    import nbformat

    notebook = nbformat.read(executed, as_version=4)
    for cell in notebook.cells:
        merged = []
        for output in cell.get("outputs", []):
            previous = merged[-1] if merged else None
            if output.output_type == "stream" and previous is not None and previous.get("name") == output.name:
                previous.text += output.text
            else:
                merged.append(output)
        for output in merged:
            if output.output_type == "stream":
                output.text = "\n".join(line.rsplit("\r", 1)[-1] for line in output.text.split("\n"))
        if cell.cell_type == "code":
            cell.outputs = merged
    nbformat.write(notebook, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="where the executed notebook goes")
    parser.add_argument("--full", action="store_true", help="the notebook's real settings, not the tiny ones")
    args = parser.parse_args()
    sys.exit(1 if run(args.out, args.full) else 0)


if __name__ == "__main__":
    main()
