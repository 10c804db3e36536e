"""Shared test setup: two fake CPU devices for mesh tests, float32 matmuls, the shared real assets."""
import os
from pathlib import Path

# Must happen before JAX initialises its backend: two fake CPU devices let the sharding tests build a
# real 2-device mesh (more would hit XLA CPU rendezvous timeouts on a 2-core machine).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"


@pytest.fixture(scope="session")
def assets() -> Path:
    if not ASSETS.is_dir():
        pytest.skip(f"shared assets not found at {ASSETS}")
    return ASSETS


@pytest.fixture(scope="session")
def llama2_tok(assets):
    from llama_jax.tokenizers import load_tokenizer

    return load_tokenizer(assets / "llama2_tokenizer.model")


@pytest.fixture(scope="session")
def llama3_tok(assets):
    """The Llama 3 tokenizer is Meta-licensed: read from the shared assets, never committed."""
    from llama_jax.tokenizers import load_tokenizer

    path = assets / "llama3_tokenizer.model"
    if not path.is_file():
        pytest.skip("Llama 3 tokenizer (Meta Llama 3 license) not in the shared assets")
    return load_tokenizer(path)
