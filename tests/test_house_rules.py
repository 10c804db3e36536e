"""The limits the project set itself, checked: no module over 400 lines, no function over 80, and the engine's
scheduler and device side touched by nothing outside `llama_jax/inference/`."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "llama_jax"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_is_over_the_line_limit():
    long = {
        str(p.relative_to(PACKAGE)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert not long, f"modules over {MAX_FILE_LINES} lines: {long}"


def test_no_function_is_over_the_line_limit():
    long = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_only_the_inference_package_reaches_behind_the_engine():
    """Outside code sees the engine's settings and the values of `inference/types.py`, never its scheduler,
    slots or compiled programs."""
    private = re.compile(r"inference\.(scheduler|backend|slots|compiled|packing|programs)\b|\bengine\._\w+")
    reaching = [
        str(path.relative_to(PACKAGE))
        for path in modules()
        if path.parent.name != "inference" and private.search(path.read_text())
    ]
    assert not reaching, f"modules that reach behind the engine: {reaching}"
