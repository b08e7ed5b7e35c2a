"""A small ctypes binding to the CUDA driver API (``libcuda.so.1``), stdlib only.

Why it exists
-------------
Every CUDA *primary context* a process creates costs a few hundred MiB on its GPU.
A worker owns one GPU, but code that ran in it earlier (a library that calls
``torch.cuda.current_device()`` before ``set_device``, a user's import-time CUDA call,
a probe of every device) can leave primary contexts on other GPUs. With N workers
that is N stale contexts on GPU 0, enough to make the real owner of GPU 0 run out of
memory. torch has no API to drop the primary context of another device; the driver
API does (``cuDevicePrimaryCtxRelease``), so :mod:`gpuexec.worker.stale_contexts`
uses this binding to find and release them.

Why no torch
------------
The worker selects and cleans its devices before it imports the user's worker class,
so before torch may be imported at all; the same code serves workers that use JAX or
CuPy, and CI drives it against a fake ``libcuda`` built from ``tests/fake_libcuda.c``.
ctypes needs none of that.

Never use this in the driver (parent) process
---------------------------------------------
``cuInit`` in a parent leaves driver state that forked children cannot use (they fail
with ``CUDA_ERROR_NOT_INITIALIZED`` or hang), and even loading ``libcuda.so.1`` there
maps it into ``/proc/self/maps``, which is exactly the signal the start-method policy
reads to decide that ``fork`` is unsafe. Only workers call :func:`load_driver` (and
``gpuexec doctor``, a process of its own, to list the GPUs).

Shape
-----
One declarative table, :data:`_FUNCTIONS`, lists every entry point as
``(name, restype, argtypes, fallback)``; one checking method, :meth:`CudaDriver._call`,
turns every ``CUresult`` other than ``CUDA_SUCCESS`` into
:class:`~gpuexec.errors.CudaDriverError` with the function, the code and the driver's
own name and text (``cuGetErrorName`` / ``cuGetErrorString``).

Versioned symbols: where the table names a ``_v2`` symbol (the one ``cuda.h`` maps the
plain name to), a library that lacks it is bound to the unversioned symbol instead,
silently; :attr:`CudaDriver.symbols` says which one was bound, and errors name it.

Missing symbols (decision): :func:`load_driver` never fails for a missing symbol. The
library is bound as far as it goes, and calling a function it does not export raises
``CudaDriverError(function=<symbol>, code=-1, name="SYMBOL_NOT_FOUND", text=...)``
through the same checking path as any driver error. That keeps an old or partial driver
usable for what it has (a driver without ``cuDevicePrimaryCtxReset`` can still release)
and makes the failure a per-device report entry instead of a failed worker start.
Without ``cuGetErrorName`` / ``cuGetErrorString`` errors read ``CUDA_ERROR_UNKNOWN`` /
``unknown error (code N)``.

Checkpoint entry points (driver 570 and newer)
----------------------------------------------
``cuCheckpointProcessLock/Checkpoint/Restore/Unlock/GetState(pid, args)`` act on *another*
process's CUDA state; gpuexec calls them only from its checkpoint controller
(:mod:`gpuexec.worker.checkpoint_controller`), never from a worker on itself. Their
argument structs are 64 bytes each, laid out as in ``cuda.h`` (CUDA 12.8+):
``CUcheckpointLockArgs {unsigned timeoutMs; unsigned reserved0; cuuint64_t reserved1[7]}``,
``CUcheckpointCheckpointArgs {cuuint64_t reserved[8]}``,
``CUcheckpointRestoreArgs {CUcheckpointGpuPair *gpuPairs; unsigned gpuPairsCount;
char reserved[52 - sizeof(void *)]; cuuint64_t reserved1}`` and
``CUcheckpointUnlockArgs {cuuint64_t reserved[8]}``; reserved bytes must be zero, which a
fresh ctypes struct is. A driver without them binds as usual and reports
:attr:`CudaDriver.supports_checkpoint` False.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import NamedTuple

from gpuexec.errors import CudaDriverError

__all__ = [
    "CHECKPOINT_FUNCTIONS",
    "CUDA_SUCCESS",
    "DEFAULT_LIBRARY",
    "LIBCUDA_ENV",
    "PROCESS_STATES",
    "SYMBOL_NOT_FOUND",
    "CudaDriver",
    "load_driver",
]

DEFAULT_LIBRARY = "libcuda.so.1"
"""What :func:`load_driver` opens by default: the driver's soname, found by the dynamic loader."""

LIBCUDA_ENV = "GPUEXEC_LIBCUDA"
"""Documented override of the library path, read when :func:`load_driver` is called."""

CUDA_SUCCESS = "CUDA_SUCCESS"
"""Name of CUresult 0, used in reports for calls that succeeded."""

SYMBOL_NOT_FOUND = "SYMBOL_NOT_FOUND"
"""``CudaDriverError.name`` when the library does not export the function (``code`` is -1)."""

_UNKNOWN_NAME = "CUDA_ERROR_UNKNOWN"
_UUID_LEN = 16
_NAME_LEN = 256
_CC_MAJOR, _CC_MINOR = 75, 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1  # range of a CUresult (a C int)

CUresult = ctypes.c_int
CUdevice = ctypes.c_int


class CUuuid(ctypes.Structure):
    """``CUuuid``: 16 raw bytes. ``c_ubyte`` rather than ``c_char``, which would stop at a NUL."""

    _fields_ = [("bytes", ctypes.c_ubyte * _UUID_LEN)]


class CUcheckpointLockArgs(ctypes.Structure):
    """Arguments of ``cuCheckpointProcessLock``: ``timeoutMs`` 0 waits without limit."""

    _fields_ = [("timeoutMs", ctypes.c_uint), ("reserved0", ctypes.c_uint),
                ("reserved1", ctypes.c_uint64 * 7)]


class CUcheckpointCheckpointArgs(ctypes.Structure):
    """Arguments of ``cuCheckpointProcessCheckpoint`` (all reserved, zero)."""

    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


class CUcheckpointGpuPair(ctypes.Structure):
    """One GPU remapping for a restore: the uuid checkpointed from, the uuid restored to."""

    _fields_ = [("oldUuid", CUuuid), ("newUuid", CUuuid)]


class CUcheckpointRestoreArgs(ctypes.Structure):
    """Arguments of ``cuCheckpointProcessRestore``; no pairs: restore to the same GPUs."""

    _fields_ = [("gpuPairs", ctypes.POINTER(CUcheckpointGpuPair)),
                ("gpuPairsCount", ctypes.c_uint),
                ("reserved", ctypes.c_char * (52 - ctypes.sizeof(ctypes.c_void_p))),
                ("reserved1", ctypes.c_uint64)]


class CUcheckpointUnlockArgs(ctypes.Structure):
    """Arguments of ``cuCheckpointProcessUnlock`` (all reserved, zero)."""

    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


PROCESS_STATES = ("running", "locked", "checkpointed", "failed")
"""``CUprocessState`` by value: ``CU_PROCESS_STATE_RUNNING`` (0) ... ``FAILED`` (3)."""

CHECKPOINT_FUNCTIONS = (
    "cuCheckpointProcessLock",
    "cuCheckpointProcessCheckpoint",
    "cuCheckpointProcessRestore",
    "cuCheckpointProcessUnlock",
    "cuCheckpointProcessGetState",
)
"""The entry points :attr:`CudaDriver.supports_checkpoint` needs (libcuda of driver 570+)."""


class _Function(NamedTuple):
    """One table row: symbol, C return type, C argument types, older symbol to fall back to."""

    name: str
    restype: type[ctypes.c_int]
    argtypes: tuple[type[ctypes._CData], ...]
    fallback: str | None = None


_c_int_p = ctypes.POINTER(ctypes.c_int)
_c_uint_p = ctypes.POINTER(ctypes.c_uint)
_c_char_pp = ctypes.POINTER(ctypes.c_char_p)

_FUNCTIONS: tuple[_Function, ...] = (
    _Function("cuInit", CUresult, (ctypes.c_uint,)),
    _Function("cuDriverGetVersion", CUresult, (_c_int_p,)),
    _Function("cuDeviceGetCount", CUresult, (_c_int_p,)),
    _Function("cuDeviceGet", CUresult, (ctypes.POINTER(CUdevice), ctypes.c_int)),
    _Function("cuDeviceGetName", CUresult, (ctypes.c_char_p, ctypes.c_int, CUdevice)),
    _Function("cuDeviceTotalMem_v2", CUresult, (ctypes.POINTER(ctypes.c_size_t), CUdevice),
              "cuDeviceTotalMem"),
    _Function("cuDeviceGetAttribute", CUresult, (_c_int_p, ctypes.c_int, CUdevice)),
    _Function(
        "cuDeviceGetUuid_v2", CUresult, (ctypes.POINTER(CUuuid), CUdevice), "cuDeviceGetUuid"
    ),
    _Function("cuDevicePrimaryCtxGetState", CUresult, (CUdevice, _c_uint_p, _c_int_p)),
    _Function("cuDevicePrimaryCtxRelease_v2", CUresult, (CUdevice,), "cuDevicePrimaryCtxRelease"),
    _Function("cuDevicePrimaryCtxReset_v2", CUresult, (CUdevice,), "cuDevicePrimaryCtxReset"),
    _Function("cuCheckpointProcessLock", CUresult,
              (ctypes.c_int, ctypes.POINTER(CUcheckpointLockArgs))),
    _Function("cuCheckpointProcessCheckpoint", CUresult,
              (ctypes.c_int, ctypes.POINTER(CUcheckpointCheckpointArgs))),
    _Function("cuCheckpointProcessRestore", CUresult,
              (ctypes.c_int, ctypes.POINTER(CUcheckpointRestoreArgs))),
    _Function("cuCheckpointProcessUnlock", CUresult,
              (ctypes.c_int, ctypes.POINTER(CUcheckpointUnlockArgs))),
    _Function("cuCheckpointProcessGetState", CUresult, (ctypes.c_int, _c_int_p)),
    _Function("cuGetErrorName", CUresult, (CUresult, _c_char_pp)),
    _Function("cuGetErrorString", CUresult, (CUresult, _c_char_pp)),
)

_CFunction = Callable[..., int]


def _bind(lib: ctypes.CDLL, row: _Function) -> tuple[str, _CFunction | None]:
    """Resolve one table row: ``(symbol bound, function)``, or ``(row.name, None)`` if absent.

    A fresh prototype per row (rather than setting ``argtypes`` on ``lib.<name>``) keeps the
    declarations local to this binding even when another ``CDLL`` object shares the library.
    """
    prototype = ctypes.CFUNCTYPE(row.restype, *row.argtypes)
    for symbol in (row.name, row.fallback):
        if symbol is None:
            continue
        try:
            function: _CFunction = prototype((symbol, lib))
        except AttributeError:
            continue
        return symbol, function
    return row.name, None


class CudaDriver:
    """The driver API calls gpuexec needs, each checked; build it with :func:`load_driver`.

    Device arguments named ``dev`` are ``CUdevice`` handles from :meth:`device`, not
    ordinals (the real driver happens to use equal numbers; the API does not promise it).
    Not meant to be shared between threads beyond :meth:`init`, which is locked.
    """

    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        self.path: str = path  # the library name or path that was loaded, as given to dlopen
        self._lib = lib  # keeps the library mapped while function pointers into it exist
        self._rows = {row.name: row for row in _FUNCTIONS}  # table name -> its row
        self._functions: dict[str, _CFunction | None] = {}  # table name -> bound function
        symbols: dict[str, str | None] = {}  # table name -> symbol bound (None: missing)
        for row in _FUNCTIONS:
            symbol, function = _bind(lib, row)
            self._functions[row.name] = function
            symbols[row.name] = symbol if function is not None else None
        self._symbols: Mapping[str, str | None] = MappingProxyType(symbols)
        self._init_lock = threading.Lock()
        self._initialized = False  # cuInit(0) succeeded once; guarded by _init_lock

    def __repr__(self) -> str:
        return f"CudaDriver(path={self.path!r})"

    @property
    def symbols(self) -> Mapping[str, str | None]:
        """Which symbol each table entry is bound to, ``None`` where the library has neither.

        For example ``{"cuDevicePrimaryCtxRelease_v2": "cuDevicePrimaryCtxRelease", ...}``
        on a driver that predates the ``_v2`` names.
        """
        return self._symbols

    # -- the one checking path -----------------------------------------------------------

    def _call(self, name: str, *args: object) -> None:
        """Call table entry ``name``; raise :class:`CudaDriverError` unless it returns 0."""
        function = self._functions[name]
        if function is None:
            fallback = self._rows[name].fallback
            also = f" (nor {fallback})" if fallback else ""
            raise CudaDriverError(
                name, -1, SYMBOL_NOT_FOUND, f"{self.path} does not export {name}{also}"
            )
        code = function(*args)
        if code != 0:
            symbol = self._symbols[name] or name
            raise CudaDriverError(symbol, code, self.error_name(code), self.error_string(code))

    def _lookup(self, name: str, code: int) -> str | None:
        """cuGetErrorName / cuGetErrorString without raising: ``None`` when the driver can't say."""
        function = self._functions[name]
        if function is None or not _INT_MIN <= code <= _INT_MAX:  # ctypes would truncate it
            return None
        text = ctypes.c_char_p()
        if function(code, ctypes.byref(text)) != 0 or text.value is None:
            return None
        return text.value.decode("utf-8", "replace")

    def error_name(self, code: int) -> str:
        """The name of CUresult ``code`` (101: ``"CUDA_ERROR_INVALID_DEVICE"``).

        ``"CUDA_ERROR_UNKNOWN"`` when the driver does not know the code or cannot say.
        Never raises: it runs while another error is being reported.
        """
        return self._lookup("cuGetErrorName", code) or _UNKNOWN_NAME

    def error_string(self, code: int) -> str:
        """The driver's description of ``code``; ``"unknown error (code N)"`` if it can't say."""
        return self._lookup("cuGetErrorString", code) or f"unknown error (code {code})"

    # -- the driver API ------------------------------------------------------------------

    def init(self) -> None:
        """``cuInit(0)``, once: later calls return at once. A failure is raised, not cached."""
        with self._init_lock:
            if self._initialized:
                return
            self._call("cuInit", 0)
            self._initialized = True

    def driver_version(self) -> int:
        """The driver's CUDA version as an int, 12080 for CUDA 12.8 (works before :meth:`init`)."""
        version = ctypes.c_int()
        self._call("cuDriverGetVersion", ctypes.byref(version))
        return version.value

    def describe(self) -> str:
        """``"CUDA 12.8 (libcuda.so.1)"``: the driver version and what was loaded, for reports."""
        version = self.driver_version()
        return f"CUDA {version // 1000}.{version % 1000 // 10} ({self.path})"

    def device_count(self) -> int:
        """Number of devices this process can see (after ``CUDA_VISIBLE_DEVICES``)."""
        count = ctypes.c_int()
        self._call("cuDeviceGetCount", ctypes.byref(count))
        return count.value

    def device(self, ordinal: int) -> int:
        """The ``CUdevice`` handle of ``ordinal``."""
        handle = CUdevice()
        self._call("cuDeviceGet", ctypes.byref(handle), ordinal)
        return handle.value

    def device_name(self, dev: int) -> str:
        """The product name, e.g. ``"NVIDIA H100 80GB HBM3"``."""
        buffer = ctypes.create_string_buffer(_NAME_LEN)
        self._call("cuDeviceGetName", buffer, _NAME_LEN, dev)
        return buffer.value.decode("utf-8", "replace")

    def device_memory(self, dev: int) -> int:
        """The device's total memory in bytes."""
        total = ctypes.c_size_t()
        self._call("cuDeviceTotalMem_v2", ctypes.byref(total), dev)
        return total.value

    def compute_capability(self, dev: int) -> tuple[int, int]:
        """``(major, minor)``: ``(9, 0)`` for an H100 or H200."""
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._call("cuDeviceGetAttribute", ctypes.byref(major), _CC_MAJOR, dev)
        self._call("cuDeviceGetAttribute", ctypes.byref(minor), _CC_MINOR, dev)
        return major.value, minor.value

    def device_uuid(self, dev: int) -> str:
        """The uuid as nvidia-smi prints it: ``"GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"``."""
        uuid = CUuuid()
        self._call("cuDeviceGetUuid_v2", ctypes.byref(uuid), dev)
        h = bytes(uuid.bytes).hex()
        return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def primary_ctx_state(self, dev: int) -> tuple[int, bool]:
        """``(flags, active)`` of the device's primary context in this process."""
        flags = ctypes.c_uint()
        active = ctypes.c_int()
        self._call("cuDevicePrimaryCtxGetState", dev, ctypes.byref(flags), ctypes.byref(active))
        return flags.value, bool(active.value)

    def primary_ctx_release(self, dev: int) -> None:
        """Drop one retain of the primary context; it is destroyed when none are left."""
        self._call("cuDevicePrimaryCtxRelease_v2", dev)

    def primary_ctx_reset(self, dev: int) -> None:
        """Destroy every allocation and all state of the primary context, whoever retains it."""
        self._call("cuDevicePrimaryCtxReset_v2", dev)

    # -- checkpoint entry points: act on another process by pid ---------------------------

    @property
    def supports_checkpoint(self) -> bool:
        """Every entry point of :data:`CHECKPOINT_FUNCTIONS` is exported (driver 570+)."""
        return all(self._functions[name] is not None for name in CHECKPOINT_FUNCTIONS)

    def checkpoint_lock(self, pid: int, timeout_ms: int = 0) -> None:
        """RUNNING -> LOCKED: block ``pid``'s new CUDA calls and wait for its submitted work.

        ``timeout_ms`` 0 waits without limit; otherwise the driver gives up (an error)."""
        args = CUcheckpointLockArgs(timeoutMs=max(0, min(timeout_ms, 2**32 - 1)))
        self._call("cuCheckpointProcessLock", pid, ctypes.byref(args))

    def checkpoint_checkpoint(self, pid: int) -> None:
        """LOCKED -> CHECKPOINTED: copy ``pid``'s device memory to host memory, free the GPU."""
        args = CUcheckpointCheckpointArgs()
        self._call("cuCheckpointProcessCheckpoint", pid, ctypes.byref(args))

    def checkpoint_restore(self, pid: int) -> None:
        """CHECKPOINTED -> LOCKED: device memory back, at the same addresses, same GPUs."""
        args = CUcheckpointRestoreArgs()
        self._call("cuCheckpointProcessRestore", pid, ctypes.byref(args))

    def checkpoint_unlock(self, pid: int) -> None:
        """LOCKED -> RUNNING: ``pid``'s CUDA calls proceed."""
        args = CUcheckpointUnlockArgs()
        self._call("cuCheckpointProcessUnlock", pid, ctypes.byref(args))

    def process_state(self, pid: int) -> str:
        """``pid``'s checkpoint state: one of :data:`PROCESS_STATES`, or ``"state N"``."""
        state = ctypes.c_int(-1)
        self._call("cuCheckpointProcessGetState", pid, ctypes.byref(state))
        value = state.value
        return PROCESS_STATES[value] if 0 <= value < len(PROCESS_STATES) else f"state {value}"


def load_driver(path: str | None = None) -> CudaDriver | None:
    """Open the CUDA driver library and bind it; ``None`` when it cannot be loaded.

    ``path`` defaults to ``$GPUEXEC_LIBCUDA`` when set and non-empty (read now, not at
    import), else :data:`DEFAULT_LIBRARY`. No driver installed is a normal outcome on a
    CPU machine, hence ``None`` rather than an exception. Nothing is called in the driver
    here: call :meth:`CudaDriver.init` next. Never call this in the driver process (see the
    module docstring).
    """
    if path is None:
        path = os.environ.get(LIBCUDA_ENV) or DEFAULT_LIBRARY
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    return CudaDriver(lib, path)
