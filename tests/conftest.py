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
