"""Start-method policy: CUDA detection from /proc/self/maps, fork refusal, auto fallback."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import subprocess_env
from fakecuda import build_fake_libcuda

from gpuexec import StartMethodError
from gpuexec.cuda_state import CudaState, cuda_state
from gpuexec.executor.start_method import resolve_start_method

ROOT = Path(__file__).resolve().parent.parent


LIBCUDA = "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libcuda.so.570.1\n"
TORCH = "7f02-7f03 r-xp 00000000 08:01 2 /site-packages/torch/lib/libtorch_cuda.so\n"
LIBC = "7f04-7f05 r-xp 00000000 08:01 3 /usr/lib/libc.so.6\n"
CTL = "7f06-7f07 rw-s 00000000 00:05 4 /dev/nvidiactl\n"
GPU1 = "7f08-7f09 rw-s 00000000 00:05 5 /dev/nvidia1\n"


def _state(tmp_path: Path, text: str) -> CudaState:
    maps = tmp_path / "maps"
    maps.write_text(text)
    return cuda_state(str(maps))


def test_cuda_state_reads_maps(tmp_path: Path) -> None:
    loaded = _state(tmp_path, LIBCUDA + TORCH + LIBC)
    assert loaded.libcuda_mapped and not loaded.initialized
    assert loaded.libcuda_path.endswith("libcuda.so.570.1")
    assert loaded.loaded_by == ["torch"]
    assert "loaded but not initialised" in loaded.describe()
    for device in (CTL, GPU1):
        init = _state(tmp_path, LIBCUDA + TORCH + device + LIBC)
        assert init.initialized and init.driver_initialized
        assert "cuInit ran" in init.describe() and "torch" in init.describe()
    clean = _state(tmp_path, LIBC)
    assert not clean.initialized and not clean.libcuda_mapped and clean.loaded_by == []
    assert clean.describe() == "CUDA is not initialised in this process"
    # A device file without the driver library is someone else's (e.g. a display server).
    assert not _state(tmp_path, LIBC + CTL).initialized


def test_policy_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = _state(tmp_path, LIBCUDA + LIBC)
    init = _state(tmp_path, LIBCUDA + CTL)
    assert resolve_start_method("auto", loaded)[0] == "zygote"
    assert resolve_start_method("auto", init)[0] == "zygote"
    assert resolve_start_method("fork", loaded)[0] == "fork"
    import gpuexec.executor.start_method as sm

    monkeypatch.setattr(sm, "zygote_available", lambda: False)  # an old kernel
    assert resolve_start_method("auto", loaded)[0] == "fork"
    assert resolve_start_method("auto", init)[0] == "subprocess"
    with pytest.raises(StartMethodError, match="not available"):
        resolve_start_method("zygote", loaded)
    assert resolve_start_method("spawn", init) == ("spawn", "spawn requested (start_method)")
    with pytest.raises(StartMethodError, match="would give workers whose CUDA is dead"):
        resolve_start_method("fork", init)


def test_this_test_process_has_no_cuda() -> None:
    assert not cuda_state().initialized


def _run(code: str, prefix: str = "", timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", prefix + textwrap.dedent(code)],
                          cwd=ROOT / "tests",
                          capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env())


@pytest.fixture(scope="module")
def fake_libcuda(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fake_libcuda(tmp_path_factory.mktemp("fakecuda"), name="libcuda.so.1")


# In a subprocess: the maps file this process reads is swapped for its own real one plus
# the lines cuInit would add, which a machine without a GPU cannot produce for real.
INITIALISED = f"""
import gpuexec.executor.start_method as sm
_real = sm.cuda_state
def _initialised(maps_path="/proc/self/maps"):
    import tempfile
    with open(maps_path) as f, tempfile.NamedTemporaryFile("w", delete=False) as out:
        out.write(f.read() + {CTL!r})
    return _real(out.name)
sm.cuda_state = _initialised
"""
NO_ZYGOTE = "sm.zygote_available = lambda: False  # an old kernel without pidfds\n"


def test_libcuda_loaded_but_not_initialised_still_forks(fake_libcuda: Path) -> None:
    r = _run(f"""
        import ctypes
        ctypes.CDLL({str(fake_libcuda)!r})  # any library named libcuda counts
        from gpuexec import Executor
        from gpuexec.cuda_state import cuda_state
        print("STATE", cuda_state().describe())
        for method in ("auto", "fork"):
            with Executor("workers:EchoWorker", 2, device="cpu", start_method=method) as ex:
                print("METHOD", ex.start_method, ex.collective_rpc("add", args=(1,)))
    """)
    assert r.returncode == 0, r.stderr
    assert "METHOD zygote [1, 2]" in r.stdout and "METHOD fork [1, 2]" in r.stdout
    assert "loaded but not initialised" in r.stdout


def test_explicit_fork_with_cuda_initialised_is_refused(fake_libcuda: Path) -> None:
    r = _run(f"""
        import ctypes
        ctypes.CDLL({str(fake_libcuda)!r})
        from gpuexec import Executor, StartMethodError
        try:
            Executor(world_size=1, device="cpu", start_method="fork")
        except StartMethodError as e:
            print("REFUSED:", e)
    """, prefix=INITIALISED)
    assert r.returncode == 0, r.stderr
    assert "REFUSED:" in r.stdout
    assert "libcuda.so" in r.stdout and "cuInit ran" in r.stdout
    assert "start_method='spawn'" in r.stdout


@pytest.mark.parametrize("zygote", [True, False], ids=["zygote", "no-zygote"])
def test_auto_with_cuda_initialised_never_forks_the_driver(fake_libcuda: Path,
                                                           zygote: bool) -> None:
    r = _run(f"""
        import ctypes
        ctypes.CDLL({str(fake_libcuda)!r})
        from gpuexec import Executor
        if __name__ == "__main__":
            for _ in range(2):
                with Executor("workers:EchoWorker", 2, device="cpu", keep_zygote=True) as ex:
                    print("METHOD", ex.start_method, ex.collective_rpc("add", args=(1,)))
                    print("REASON", ex.start_method_reason)
    """, prefix=INITIALISED + ("" if zygote else NO_ZYGOTE))
    assert r.returncode == 0, r.stderr
    if zygote:  # the zygote never had CUDA: its forks are clean
        assert r.stdout.count("METHOD zygote [1, 2]") == 2
        assert "warm zygote" in r.stdout
    else:
        assert r.stdout.count("METHOD subprocess [1, 2]") == 2
        assert "cuInit ran" in r.stdout
        assert r.stderr.count("starting workers with 'subprocess'") == 1
