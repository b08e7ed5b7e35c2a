"""Scripts that tests embed as text (run in a subprocess, often only on a GPU machine)
compile: a broken one would otherwise be found only where that test runs."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _embedded() -> list[tuple[str, str]]:
    """``(file:line, text)`` of every ``textwrap.dedent("...")`` of a literal in tests/."""
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("textwrap.dedent",
                                                                         "dedent") \
                    and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                found.append((f"{path.relative_to(TESTS)}:{node.lineno}", node.args[0].value))
    return found


SCRIPTS = _embedded()


def test_some_scripts_are_found() -> None:
    assert any(where.startswith("test_suspend_cuda.py:") for where, _ in SCRIPTS)


@pytest.mark.parametrize("where, text", SCRIPTS, ids=[w for w, _ in SCRIPTS])
def test_embedded_script_compiles(where: str, text: str) -> None:
    compile(textwrap.dedent(text), where, "exec")
