"""Names a package exports, imported on first use: `import llama_jax` (or a command line that fails on a bad
flag, or `--help`) does not pay for importing JAX.

    __getattr__ = lazy_exports(__name__, {"run": "llama_jax.train.trainer"})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str], subpackages: tuple[str, ...] = ()) -> Callable[[str], Any]:
    """A module `__getattr__` that imports `exports[name]` (a module path) and returns its `name`, or the
    subpackage `package.name` itself."""

    def __getattr__(name: str):
        if name in subpackages:
            return importlib.import_module(f"{package}.{name}")
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__
