"""examples/recover_rank.py end to end: a tensor-parallel model served across a SIGKILL."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent


def test_recover_rank_example_keeps_serving() -> None:
    pytest.importorskip("torch")
    r = subprocess.run([sys.executable, "examples/recover_rank.py", "--device", "cpu",
                        "--world-size", "2", "--requests", "6", "--auto", "--kill-rank", "0"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=subprocess_env(CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "outputs after recovery identical to before: yes" in r.stdout
    assert re.search(r"recovered: [\d.]+ ms from SIGKILL", r.stdout)
    assert "steps per rank: [6, 10]" in r.stdout  # rank 0 started again, rank 1 went on
    assert r.stdout.rstrip().endswith("ok")


def test_recover_rank_example_refuses_bad_values() -> None:
    r = subprocess.run([sys.executable, "examples/recover_rank.py", "--world-size", "2",
                        "--kill-rank", "2"], capture_output=True, text=True, timeout=60,
                       cwd=ROOT, env=subprocess_env(CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 2 and "--kill-rank must be a rank in 0..1" in r.stderr
