"""Build the fake libcuda (``tests/fake_libcuda.c``) and script it from tests.

CI has no GPU, so the libcuda binding is tested against a C library that exports the
same symbols with a scriptable model behind them (see the comment at the top of the C
file). Two things to know when using it:

- The dynamic loader maps one file once per process, so every ``CDLL`` of one path
  shares one global fake state: reset it between tests (:meth:`FakeCuda.reset`).
- Variants built with ``defines`` (``OMIT_<symbol>`` to drop a symbol) go to their own
  directory, so each variant is a distinct file with its own state.

Tests skip, rather than fail, when gcc is not installed.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

__all__ = ["FAKE_SOURCE", "FakeCuda", "build_fake_libcuda"]

FAKE_SOURCE = Path(__file__).with_name("fake_libcuda.c")


def build_fake_libcuda(
    tmp_dir: Path, name: str = "libfakecuda.so.1", defines: Sequence[str] = ()
) -> Path:
    """Compile the fake into ``tmp_dir/<variant>/<name>`` and return that path.

    The default name is deliberately *not* ``libcuda.so*``: the binding loads any path,
    and a library named libcuda mapped into the pytest process would (rightly) make
    gpuexec refuse ``fork`` in every later test. Tests of that policy pass
    ``name="libcuda.so.1"`` and load it in a subprocess.

    ``defines`` are macro names without ``-D`` (``"OMIT_cuDevicePrimaryCtxRelease_v2"``).
    A build already in ``tmp_dir`` that is newer than the source is reused: pass a
    session-scoped directory to compile each variant once per test session. A compile
    error fails the test (it is a bug in the fake); a missing gcc skips it.
    """
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: cannot build the fake libcuda")
    key = hashlib.sha256("\0".join(sorted(defines)).encode()).hexdigest()[:12]
    out = Path(tmp_dir) / f"fakecuda-{key}" / name
    if out.exists() and out.stat().st_mtime >= FAKE_SOURCE.stat().st_mtime:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{name}.{os.getpid()}.tmp")
    command = [gcc, "-shared", "-fPIC", "-O1", "-Wall", "-Wextra"]
    command += [f"-D{define}" for define in defines]
    command += ["-o", str(partial), str(FAKE_SOURCE)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"building the fake libcuda failed: {command}\n{done.stderr}")
    os.replace(partial, out)  # atomic: a concurrent reader never sees half a library
    return out


class FakeCuda:
    """ctypes handle to the fake's control API (``fake_*``), for one built library file."""

    def __init__(self, path: Path) -> None:
        self.path = path  # the library file; pass str(path) to load_driver
        self._lib = ctypes.CDLL(str(path))  # same file -> same mapping as the driver's CDLL
        lib = self._lib
        lib.fake_reset.argtypes = []
        lib.fake_reset.restype = None
        for setter in ("fake_set_device_count", "fake_set_driver_version", "fake_set_handle_base"):
            getattr(lib, setter).argtypes = [ctypes.c_int]
            getattr(lib, setter).restype = None
        for setter in ("fake_set_active", "fake_set_refcount"):
            getattr(lib, setter).argtypes = [ctypes.c_int, ctypes.c_int]
            getattr(lib, setter).restype = None
        lib.fake_set_flags.argtypes = [ctypes.c_int, ctypes.c_uint]
        lib.fake_set_flags.restype = None
        lib.fake_get_refcount.argtypes = [ctypes.c_int]
        lib.fake_get_refcount.restype = ctypes.c_int
        lib.fake_set_error.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.fake_set_error.restype = ctypes.c_int
        lib.fake_calls.argtypes = [ctypes.c_char_p]
        lib.fake_calls.restype = ctypes.c_long
        lib.fake_device_calls.argtypes = [ctypes.c_int]
        lib.fake_device_calls.restype = ctypes.c_long
        lib.fake_is_initialized.argtypes = []
        lib.fake_is_initialized.restype = ctypes.c_int

    def reset(self) -> None:
        """Defaults: 2 devices, driver 12080, handles == ordinals, nothing active, no errors."""
        self._lib.fake_reset()

    def set_device_count(self, n: int) -> None:
        self._lib.fake_set_device_count(n)

    def set_driver_version(self, version: int) -> None:
        self._lib.fake_set_driver_version(version)

    def set_handle_base(self, base: int) -> None:
        """``cuDeviceGet(ordinal)`` returns ``base + ordinal`` from now on."""
        self._lib.fake_set_handle_base(base)

    def set_active(self, dev: int, active: bool = True) -> None:
        """Active: at least one retain; inactive: no retain."""
        self._lib.fake_set_active(dev, int(active))

    def set_refcount(self, dev: int, n: int) -> None:
        """``n`` retains: it takes ``n`` releases (or one reset) to make it inactive."""
        self._lib.fake_set_refcount(dev, n)

    def refcount(self, dev: int) -> int:
        return int(self._lib.fake_get_refcount(dev))

    def set_flags(self, dev: int, flags: int) -> None:
        self._lib.fake_set_flags(dev, flags)

    def set_error(self, function: str, code: int, *, count: int = -1, device: int = -1) -> None:
        """Make ``function`` (exact symbol) return ``code`` for the next ``count`` calls.

        ``count < 0``: every call; ``device >= 0``: only calls naming that ordinal.
        """
        if self._lib.fake_set_error(function.encode(), code, count, device) != 0:
            raise ValueError(f"the fake does not know {function!r} (or its error table is full)")

    def calls(self, function: str) -> int:
        """How many times the exact symbol ``function`` was called since the last reset."""
        n = int(self._lib.fake_calls(function.encode()))
        if n < 0:
            raise ValueError(f"the fake does not know {function!r}")
        return n

    def device_calls(self, dev: int) -> int:
        """How many calls of any symbol named ordinal ``dev`` (by ordinal or handle)."""
        return int(self._lib.fake_device_calls(dev))

    def is_initialized(self) -> bool:
        return bool(self._lib.fake_is_initialized())
