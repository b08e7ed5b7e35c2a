"""Every ```python block of README.md runs as written on a CPU machine (from the
checkout's root), unless its first line says what else it needs: ``# needs: ...``."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import ROOT, subprocess_env

NEEDS = "# needs: "


def _blocks() -> list[tuple[int, str]]:
    """``(line, code)`` of each ```python block."""
    text = (ROOT / "README.md").read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```$", text, re.M | re.S)]


BLOCKS = _blocks()
RUNNABLE = [(line, code) for line, code in BLOCKS if not code.startswith(NEEDS)]


def test_blocks_are_found_and_each_needs_line_says_what() -> None:
    assert len(RUNNABLE) >= 2
    for line, code in BLOCKS:
        compile(code, f"README.md:{line}", "exec")  # those not run here are Python too
        if code.startswith(NEEDS):
            first = code.splitlines()[0]
            assert len(first) > len(NEEDS) + 3, f"README.md:{line}: {first!r}"


@pytest.mark.parametrize("line, code", RUNNABLE, ids=[f"README.md:{n}" for n, _ in RUNNABLE])
def test_readme_block_runs(line: int, code: str) -> None:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=180, cwd=ROOT, env=subprocess_env(CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 0, f"README.md:{line} failed:\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr


def test_install_section_installs_from_a_checkout_and_says_how_to_get_cpu_torch() -> None:
    text = (ROOT / "README.md").read_text()
    installs = re.findall(r"^pip install (\S+)", text, re.M)
    assert installs[0] == ".", installs  # not published yet: from a checkout first
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in text
    assert text.index("--index-url https://download.pytorch.org/whl/cpu") < \
        text.index("pip install '.[torch]'\n```")
