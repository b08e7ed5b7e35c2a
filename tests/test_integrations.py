"""The engine adapters' guards, in the default suite (no engine installed here): a
missing engine and an engine whose interface differs fail with a typed, clear error.
The adapters themselves are proven against the real engines in their own suites
(``make test-vllm``)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

FAKE_VLLM = {
    "vllm/__init__.py": "__version__ = '0.99.0'\n",
    "vllm/envs.py": "",
    "vllm/v1/__init__.py": "",
    "vllm/v1/outputs.py": "",
    "vllm/v1/executor/__init__.py": "",
    "vllm/v1/executor/abstract.py":
        "class Executor:\n"
        "    def collective_rpc(self, method, args=(), kwargs=None): ...\n"
        "    def _init_executor(self): ...\n",
    "vllm/v1/worker/__init__.py": "",
    "vllm/v1/worker/worker_base.py": "class WorkerWrapperBase:\n    def shutdown(self): ...\n",
}

IMPORT = """
from gpuexec.errors import IntegrationError
try:
    import gpuexec.integrations.vllm
except IntegrationError as e:
    assert isinstance(e, ImportError)
    print("REFUSED", e)
else:
    print("IMPORTED")
"""


def _import_adapter(path: str = "") -> str:
    env = subprocess_env()
    if path:
        env["PYTHONPATH"] = f"{path}:{env['PYTHONPATH']}"
    proc = subprocess.run([sys.executable, "-c", IMPORT], capture_output=True, text=True,
                          timeout=120, env=env, check=True)
    return proc.stdout


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_adapter_without_vllm_says_how_to_install() -> None:
    out = _import_adapter()
    assert out.startswith("REFUSED gpuexec.integrations.vllm needs vLLM")
    assert "pip install gpuexec[vllm]" in out


def test_vllm_adapter_refuses_a_different_interface(tmp_path: Path) -> None:
    for name, text in FAKE_VLLM.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    out = _import_adapter(str(tmp_path))
    assert out.startswith("REFUSED vLLM 0.99.0 does not have the executor interface")
    assert "Executor.collective_rpc takes (self, method, args, kwargs)" in out
    assert "Executor has no execute_model" in out
    assert "WorkerWrapperBase has no init_worker" in out
    assert "vllm.v1.outputs has no AsyncModelRunnerOutput" in out
    assert "supported: vLLM 0.26 to 0.33" in out
