"""Start-method policy: CUDA detection from /proc/self/maps, fork refusal, auto fallback."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fakecuda import build_fake_libcuda

from gpuexec.executor.start_method import cuda_state

ROOT = Path(__file__).resolve().parent.parent


def test_cuda_state_reads_maps(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libcuda.so.570.1\n"
        "7f02-7f03 r-xp 00000000 08:01 2 /site-packages/torch/lib/libtorch_cuda.so\n"
        "7f04-7f05 r-xp 00000000 08:01 3 /usr/lib/libc.so.6\n")
    state = cuda_state(str(maps))
    assert state.initialized and state.libcuda_mapped
    assert state.libcuda_path.endswith("libcuda.so.570.1")
    assert state.loaded_by == ["torch"]
    assert "libcuda.so.570.1 is mapped" in state.describe() and "torch" in state.describe()
    maps.write_text("7f04-7f05 r-xp 00000000 08:01 3 /usr/lib/libc.so.6\n")
    clean = cuda_state(str(maps))
    assert not clean.initialized and clean.loaded_by == []


def test_this_test_process_has_no_cuda() -> None:
    assert not cuda_state().initialized


def _run(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT / "tests",
                          capture_output=True, text=True, timeout=timeout,
                          env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def fake_libcuda(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fake_libcuda(tmp_path_factory.mktemp("fakecuda"), name="libcuda.so.1")


def test_explicit_fork_with_libcuda_mapped_is_refused(fake_libcuda: Path) -> None:
    r = _run(f"""
        import ctypes
        ctypes.CDLL({str(fake_libcuda)!r})  # any library named libcuda counts
        from gpuexec import Executor, StartMethodError
        try:
            Executor(world_size=1, device="cpu", start_method="fork")
        except StartMethodError as e:
            print("REFUSED:", e)
    """)
    assert r.returncode == 0, r.stderr
    assert "REFUSED:" in r.stdout
    assert "libcuda.so" in r.stdout and "is mapped" in r.stdout
    assert "start_method='spawn'" in r.stdout


def test_auto_with_libcuda_mapped_uses_spawn_with_one_warning(fake_libcuda: Path) -> None:
    r = _run(f"""
        import ctypes
        ctypes.CDLL({str(fake_libcuda)!r})
        from gpuexec import Executor
        if __name__ == "__main__":
            for _ in range(2):
                with Executor("workers:EchoWorker", 2, device="cpu") as ex:
                    print("METHOD", ex.start_method, ex.collective_rpc("add", args=(1,)))
                    print("REASON", ex.start_method_reason)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("METHOD spawn [1, 2]") == 2
    assert "is mapped" in r.stdout
    assert r.stderr.count("starting workers with 'spawn'") == 1
