"""User scripts run as programs: no __main__ guard, the demo."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
NO_GUARD = '''
from gpuexec import Executor, Worker

class W(Worker):
    def hello(self):
        return "hello from %d" % self.rank

ex = Executor(W, 2, device="cpu", start_method={method!r})
print(ex.collective_rpc("hello"))
ex.shutdown()
'''


def _script(tmp_path: Path, method: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / f"noguard_{method}.py"
    path.write_text(NO_GUARD.format(method=method))
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                          timeout=60, env=subprocess_env())


@pytest.mark.parametrize("method", ["auto", "zygote", "subprocess", "fork"])
def test_script_without_guard_works_where_main_is_not_reimported(tmp_path: Path,
                                                                method: str) -> None:
    r = _script(tmp_path, method)
    assert r.returncode == 0, r.stderr
    assert "['hello from 0', 'hello from 1']" in r.stdout


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_script_without_guard_gets_exact_fix(tmp_path: Path, method: str) -> None:
    t = time.monotonic()
    r = _script(tmp_path, method)
    assert time.monotonic() - t < 30
    assert r.returncode != 0
    assert 'if __name__ == "__main__":' in r.stderr
    assert "gpuexec.errors.StartMethodError: worker rank" in r.stderr
    # Said once, by the driver: no traceback per worker, no SIGTERM notice for the others.
    assert r.stderr.count("gpuexec.errors.StartMethodError:") == 1
    assert r.stderr.count("Traceback") == 1
    assert "SIGTERM" not in r.stderr


def test_demo_runs_and_checks_its_computation() -> None:
    r = subprocess.run([sys.executable, "-m", "gpuexec", "demo", "--calls", "200"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env=subprocess_env(CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 0, r.stderr
    assert "start method: zygote" in r.stdout
    assert r.stdout.count("matches the driver's reference") == 2
    assert "p50" in r.stdout and "p99" in r.stdout


def test_doctor_without_gpu_reports_the_rest() -> None:
    r = subprocess.run([sys.executable, "-m", "gpuexec", "doctor"], capture_output=True,
                       text=True, timeout=60, cwd=ROOT,
                       env=subprocess_env(CUDA_VISIBLE_DEVICES="",
                                          GPUEXEC_LIBCUDA="/nonexistent.so"))
    assert r.returncode == 0, r.stderr
    assert "this process: CUDA is not initialised in this process" in r.stdout
    assert "start_method='auto' would choose: zygote" in r.stdout
    assert "visible GPUs: 0" in r.stdout
    assert "CUDA driver: not found" in r.stdout
