"""Shared test setup: two fake CPU devices for mesh tests, float32 matmuls, and the real files tests read."""

import os
import shutil
import tempfile
from pathlib import Path

# Must happen before JAX initialises its backend: two fake CPU devices let the sharding tests build a
# real 2-device mesh (more would hit XLA CPU rendezvous timeouts on a 2-core machine).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache for the session, shared by pytest's workers and by every command the tests start:
# they compile the same tiny programs again and again (a `train.py` of configs/tiny_test.yaml takes half the
# time with it). A new directory each session, so that no test depends on an earlier run; a size limit turns
# on JAX's file lock, since two workers write it at once. The first process (pytest's controller) removes it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="llama_jax-test-xla-cache-")
    os.environ["LLAMA_JAX_TEST_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.05")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_sessionfinish(session):
    if os.environ.get("LLAMA_JAX_TEST_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


REPO = Path(__file__).resolve().parents[1]
# Meta's tokenizers are not bundled (their license): tests that need them skip unless the folder that
# LLAMA_JAX_META_TOKENIZERS names holds them (assets/README.md).
META_TOKENIZERS = Path(os.environ["LLAMA_JAX_META_TOKENIZERS"]) if "LLAMA_JAX_META_TOKENIZERS" in os.environ else None
META_FILES = ("llama2_tokenizer.model", "llama3_tokenizer.model")


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    """One directory of every real file: the bundled assets/, data/'s TinyShakespeare, and Meta's tokenizers
    where they are provided (assets/README.md says how)."""
    folder = tmp_path_factory.mktemp("assets")
    sources = [*(REPO / "assets").iterdir(), REPO / "llama_jax" / "data" / "tinyshakespeare.txt"]
    if META_TOKENIZERS is not None:
        sources += [META_TOKENIZERS / name for name in META_FILES if (META_TOKENIZERS / name).is_file()]
    for source in sources:
        (folder / source.name).symlink_to(source)
    return folder


def meta_tokenizer_file(assets: Path, name: str) -> Path:
    path = assets / name
    if not path.is_file():
        where = f"in {META_TOKENIZERS}" if META_TOKENIZERS else "(LLAMA_JAX_META_TOKENIZERS is not set)"
        pytest.skip(f"{name} (Meta license, not bundled) not found {where}: see assets/README.md")
    return path


@pytest.fixture(scope="session")
def llama2_tokenizer_file(assets) -> Path:
    return meta_tokenizer_file(assets, "llama2_tokenizer.model")


@pytest.fixture(scope="session")
def llama3_tokenizer_file(assets) -> Path:
    return meta_tokenizer_file(assets, "llama3_tokenizer.model")


@pytest.fixture(scope="session")
def llama2_tok(llama2_tokenizer_file):
    from llama_jax.tokenizers import load_tokenizer

    return load_tokenizer(llama2_tokenizer_file)


@pytest.fixture(scope="session")
def llama3_tok(llama3_tokenizer_file):
    from llama_jax.tokenizers import load_tokenizer

    return load_tokenizer(llama3_tokenizer_file)


@pytest.fixture(scope="session")
def stories_model(assets, tmp_path_factory) -> Path:
    """The real stories260K weights, converted once: a model directory with its llama2.c tokenizer."""
    from llama_jax.convert import convert_llama2c

    out = tmp_path_factory.mktemp("stories_model") / "stories260K"
    convert_llama2c(assets / "stories260K.bin", assets / "tok512.bin", out)
    return out
