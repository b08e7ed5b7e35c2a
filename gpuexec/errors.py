"""Every exception a gpuexec user catches, under one root: :class:`GpuexecError`.

Each subclass carries typed fields (rank, pid, exit code, CUresult...) rather than
a formatted string, and its message says what most likely happened and what to do.
A worker's own exception never travels as a bare string: :class:`RemoteError`
keeps the remote type name, message and traceback, and chains the traceback text
as ``__cause__`` (CPython's ``concurrent.futures`` does the same with
``_RemoteTraceback``) so that it prints under the local one.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence

__all__ = [
    "CallRefusedError",
    "ConfigError",
    "CudaDriverError",
    "ExecutorClosedError",
    "GpuexecError",
    "InflightLimitError",
    "IntegrationError",
    "ProtocolError",
    "RemoteError",
    "RpcTimeoutError",
    "StartMethodError",
    "WorkerDiedError",
    "WorkerStartupError",
]


class GpuexecError(Exception):
    """Root of every error gpuexec raises on purpose."""


class ConfigError(GpuexecError, ValueError):
    """An argument of :class:`~gpuexec.Executor` is invalid.

    Raised by the constructor before any process starts, so nothing needs cleaning up.
    """


class StartMethodError(ConfigError):
    """The requested start method cannot give working workers in this process.

    Typical causes: ``fork`` while CUDA is initialised in the driver, or ``spawn`` /
    ``forkserver`` from a script without an ``if __name__ == "__main__":`` guard.
    """


class ProtocolError(GpuexecError):
    """A peer speaks another protocol version (a worker from another gpuexec install)."""


class _RemoteTraceback(Exception):
    """Carries a worker's traceback text so that it prints as the ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class RemoteError(GpuexecError):
    """A method raised inside a worker. The worker is still alive and usable.

    Attributes: ``rank``, ``type_name`` (the remote exception's qualified type name),
    ``remote_message`` and ``remote_traceback`` (the formatted traceback text, also
    chained as ``__cause__``).
    """

    def __init__(self, rank: int, type_name: str, remote_message: str, remote_traceback: str,
                 method: str = "") -> None:
        self.rank = rank
        self.type_name = type_name
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        self.method = method
        where = f" in {method!r}" if method else ""
        super().__init__(f"worker rank {rank} raised {type_name}{where}: {remote_message}")
        self.__cause__ = _RemoteTraceback(remote_traceback)

    def __reduce__(self) -> tuple[type[RemoteError], tuple[int, str, str, str, str]]:
        return (
            type(self),
            (self.rank, self.type_name, self.remote_message, self.remote_traceback, self.method),
        )


def signal_name(exitcode: int | None) -> str | None:
    """``SIGKILL`` for an exit code of -9 (how ``multiprocessing`` reports signals)."""
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


_DEATH_HINTS = {
    "SIGKILL": "killed with SIGKILL: often the kernel's out-of-memory killer (check `dmesg`)",
    "SIGSEGV": "segmentation fault in native code (a C extension, CUDA, or ctypes)",
    "SIGABRT": "aborted by native code (a failed C assertion or std::terminate)",
    "SIGBUS": "bus error: often /dev/shm is full or a mapped file was truncated",
    "SIGTERM": "terminated by SIGTERM from another process",
}


class WorkerDiedError(GpuexecError):
    """A worker process is gone. Every pending and later call fails with this error.

    Attributes: ``rank``, ``pid``, ``exitcode`` (negative: killed by a signal),
    ``signal_name`` (``"SIGKILL"``...) and ``stderr_tail`` (its last stderr lines,
    when they could be captured). The executor is failed: shut it down and build a new one.
    """

    def __init__(
        self, rank: int, pid: int | None, exitcode: int | None, stderr_tail: str = ""
    ) -> None:
        self.rank = rank
        self.pid = pid
        self.exitcode = exitcode
        self.signal_name = signal_name(exitcode)
        self.stderr_tail = stderr_tail
        if self.signal_name is not None:
            how = f"was killed by {self.signal_name}"
            hint = _DEATH_HINTS.get(self.signal_name)
            if hint:
                how += f" ({hint})"
        elif exitcode is None:
            how = "stopped answering"
        else:
            how = f"exited with code {exitcode}"
        msg = f"worker rank {rank} (pid {pid}) {how}"
        if stderr_tail:
            msg += "\n--- last stderr lines of the worker ---\n" + stderr_tail.rstrip()
        super().__init__(msg)


class WorkerStartupError(GpuexecError):
    """A worker failed before it became ready; the constructor stopped every worker.

    Attributes: ``rank`` and ``reason``; when the worker raised, ``remote_traceback``
    holds its traceback (also chained as ``__cause__``).
    """

    def __init__(self, rank: int, reason: str, remote_traceback: str = "") -> None:
        self.rank = rank
        self.reason = reason
        self.remote_traceback = remote_traceback
        super().__init__(f"worker rank {rank} failed to start: {reason}")
        if remote_traceback:
            self.__cause__ = _RemoteTraceback(remote_traceback)


class RpcTimeoutError(GpuexecError, TimeoutError):
    """A call's deadline passed before every rank answered.

    ``ranks`` lists the ranks that did not answer. Their late replies are dropped by
    call id, so the executor stays usable; the workers may still be busy with the call.
    """

    def __init__(self, method: str, timeout: float, ranks: Sequence[int]) -> None:
        self.method = method
        self.timeout = timeout
        self.ranks = tuple(ranks)
        super().__init__(
            f"{method!r} timed out after {timeout:g} s; ranks that did not answer: "
            f"{list(self.ranks)}"
        )


class InflightLimitError(RpcTimeoutError):
    """The call waited its whole timeout for a free slot and was never sent.

    An executor runs at most ``max_inflight_calls`` calls at once (a bound on the
    memory of queued requests and replies); a further call waits for one to finish.
    Nothing reached any worker, so retrying is safe. ``ranks`` is empty; ``limit`` is
    the executor's ``max_inflight_calls``.
    """

    def __init__(self, method: str, timeout: float, limit: int) -> None:
        super().__init__(method, timeout, ())
        self.limit = limit
        self.args = (f"{method!r} was not sent: max_inflight_calls={limit} calls were still "
                     f"running after {timeout:g} s (raise the limit or the timeout, or wait "
                     f"for earlier calls)",)

    def __reduce__(self) -> tuple[type[InflightLimitError], tuple[str, float, int]]:
        return (type(self), (self.method, self.timeout, self.limit))


class CallRefusedError(GpuexecError, PermissionError):
    """The executor's security settings refuse this call; nothing was sent.

    Raised for a callable passed to ``collective_rpc`` by an executor built with
    ``allow_callables=False``: pass the name of a method of the worker class instead
    (or build the executor with ``allow_callables=True``, the default).
    """


class ExecutorClosedError(GpuexecError):
    """The executor was shut down; build a new one to make more calls."""


class CudaDriverError(GpuexecError):
    """A CUDA driver API call returned an error.

    Attributes: ``function`` (for example ``"cuDevicePrimaryCtxRelease_v2"``), ``code``
    (the CUresult number), ``name`` (``"CUDA_ERROR_INVALID_DEVICE"``) and ``text``
    (the driver's own description from ``cuGetErrorString``).
    """

    def __init__(self, function: str, code: int, name: str, text: str) -> None:
        self.function = function
        self.code = code
        self.name = name
        self.text = text
        super().__init__(f"{function} failed: {name} ({code}): {text}")

    def __reduce__(self) -> tuple[type[CudaDriverError], tuple[str, int, str, str]]:
        return (type(self), (self.function, self.code, self.name, self.text))


class IntegrationError(GpuexecError, ImportError):
    """An engine adapter (``gpuexec.integrations``) cannot work with the engine installed:
    the engine is missing, or its version does not have the interface the adapter was
    written for. The message names the version found and the versions supported."""
