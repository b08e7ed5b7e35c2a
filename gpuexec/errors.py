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
from collections.abc import Mapping, Sequence
from concurrent.futures import CancelledError
from typing import Any

__all__ = [
    "CallCancelled",
    "CallCancelledError",
    "CallRefusedError",
    "CheckpointError",
    "CheckpointTimeoutError",
    "CheckpointUnsupportedError",
    "ConfigError",
    "CudaDriverError",
    "ExecutorClosedError",
    "ForeignProcessError",
    "GpuexecError",
    "HeldCallTimeoutError",
    "InflightLimitError",
    "IntegrationError",
    "InvalidArgumentError",
    "MissingDependencyError",
    "ProtocolError",
    "RemoteError",
    "RespawnError",
    "RpcTimeoutError",
    "StartMethodError",
    "ValueNotCarriedError",
    "WorkerDiedError",
    "WorkerStartupError",
    "ZygoteError",
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


class MissingDependencyError(GpuexecError, ImportError):
    """A feature needs an optional package that is not installed (torch, ray...).

    The core runs without them; this names the feature that asked, the package and the
    extra that installs it (``pip install 'gpuexec[torch]'``). Attributes: ``feature``,
    ``package``, ``extra``.
    """

    def __init__(self, feature: str, package: str, extra: str) -> None:
        self.feature = feature
        self.package = package
        self.extra = extra
        super().__init__(f"{feature} needs {package}, which is not installed here: "
                         f"pip install 'gpuexec[{extra}]' (or install {package} yourself)",
                         name=package)


class _RemoteTraceback(Exception):
    """Carries a worker's traceback text so that it prints as the ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


# Every failed rank's own error, as a call on that rank alone would have raised it.
RankErrors = dict[int, "RemoteError | ValueNotCarriedError"]


def _others_note(others: Mapping[int, object]) -> str:
    """The part of a call error's message that points at the other failed ranks."""
    if not others:
        return ""
    ranks = ", ".join(str(r) for r in sorted(others))
    return f" (rank{'s' if len(others) > 1 else ''} {ranks} failed too: see .errors)"


def _rank_errors(own: RemoteError | ValueNotCarriedError, rank: int | None,
                 others: Mapping[int, RemoteError | ValueNotCarriedError] | None) -> RankErrors:
    errors: RankErrors = dict(others or {})
    if rank is not None:
        errors[rank] = own
    return dict(sorted(errors.items()))


class RemoteError(GpuexecError):
    """A method raised inside a worker. The worker is still alive and usable.

    Attributes: ``rank``, ``type_name`` (the remote exception's qualified type name),
    ``remote_message`` (the exception's message exactly as the worker had it),
    ``remote_traceback`` (the formatted traceback text, also chained as ``__cause__``)
    and ``errors``: every rank that failed in this call, by rank, each with its own
    error (a :class:`RemoteError`, or a :class:`ValueNotCarriedError` where that rank's
    value could not travel). When several ranks fail, the exception raised is the lowest
    rank's (``errors[rank] is`` the exception itself) and its message names the others.
    """

    def __init__(self, rank: int, type_name: str, remote_message: str, remote_traceback: str,
                 method: str = "",
                 others: Mapping[int, RemoteError | ValueNotCarriedError] | None = None
                 ) -> None:
        self.rank = rank
        self.type_name = type_name
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        self.method = method
        self.errors = _rank_errors(self, rank, others)
        where = f" in {method!r}" if method else ""
        super().__init__(f"worker rank {rank} raised {type_name}{where}: {remote_message}"
                         f"{_others_note(others or {})}")
        self.__cause__ = _RemoteTraceback(remote_traceback)

    def __reduce__(self) -> tuple[type[RemoteError], tuple[int, str, str, str, str, RankErrors]]:
        others = {r: e for r, e in self.errors.items() if e is not self}
        return (
            type(self),
            (self.rank, self.type_name, self.remote_message, self.remote_traceback, self.method,
             others),
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
    "SIGKILL": "often the kernel's out-of-memory killer: check `dmesg`",
    "SIGSEGV": "segmentation fault in native code (a C extension, CUDA, or ctypes)",
    "SIGABRT": "aborted by native code (a failed C assertion or std::terminate)",
    "SIGBUS": "bus error: often /dev/shm is full or a mapped file was truncated",
    "SIGTERM": "sent by another process",
}


class WorkerDiedError(GpuexecError):
    """A worker process is gone. Every pending and later call fails with this error.

    Attributes: ``rank``, ``pid``, ``exitcode`` (negative: killed by a signal),
    ``signal_name`` (``"SIGKILL"``...), ``stderr_tail`` (its last stderr lines,
    when they could be captured) and ``reason`` (non-empty when gpuexec killed it: a
    cancelled call that did not stop within ``cancel_grace``). The executor is failed:
    shut it down and build a new one.
    """

    def __init__(
        self, rank: int, pid: int | None, exitcode: int | None, stderr_tail: str = "",
        reason: str = "",
    ) -> None:
        self.rank = rank
        self.pid = pid
        self.exitcode = exitcode
        self.signal_name = signal_name(exitcode)
        self.stderr_tail = stderr_tail
        self.reason = reason  # set when gpuexec killed it on purpose, and why
        if reason:
            how = f"was killed by gpuexec: {reason}"
        elif self.signal_name is not None:
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

    ``stacks`` maps each rank that did not answer to what it was doing, taken when the
    deadline passed (bounded to about a second, before this error was raised): a first
    paragraph naming the method the rank was running, for how long, and the innermost
    frames of the thread that runs calls; then, after a blank line, every thread's Python
    stack as ``faulthandler`` prints it. The message repeats each first paragraph. When a
    full shared-memory ring kept the call from being sent, every target rank's stacks are
    there (they show why the ring is not drained). Empty when the call waited for a slot
    or at the gate (nothing was sent: ``InflightLimitError``, ``HeldCallTimeoutError``).
    """

    def __init__(self, method: str, timeout: float, ranks: Sequence[int],
                 stacks: Mapping[int, str] | None = None) -> None:
        self.method = method
        self.timeout = timeout
        self.ranks = tuple(ranks)
        self.stacks: dict[int, str] = dict(stacks or {})
        summary = "".join("\n" + text.split("\n\n", 1)[0]
                          for _, text in sorted(self.stacks.items()))
        super().__init__(
            f"{method!r} timed out after {timeout:g} s; ranks that did not answer: "
            f"{list(self.ranks)}" + summary
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.method, self.timeout, self.ranks, self.stacks))


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


class ValueNotCarriedError(GpuexecError, TypeError):
    """A value of a call cannot arrive with the same type and an equal value, so the call
    fails instead of delivering something else.

    gpuexec never converts a value silently (a dataclass into a dict, a tuple into a list,
    an enum into its value): a value arrives as it was sent, or the call fails with this
    error. Attributes:

    * ``path``: where the value sat, as Python would index it: ``args[0]['k'][2]``,
      ``kwargs['batch']``, ``result[1]`` (a worker's return value);
    * ``type_name``: the value's type (qualified name);
    * ``reason``: why, in words (needs pickle and the executor refuses pickle, pickling
      it raised, unpickling it on the other side raised: a class missing there...);
    * ``rank``: None when this process refused the value before sending anything (an
      argument of the call); otherwise the worker involved: it could not rebuild the
      arguments, could not send its result, or its result could not be rebuilt here.
      A worker stays usable either way.
    * ``remote_traceback``: the worker's traceback text when the failure happened there
      (also chained as ``__cause__``), else "".
    * ``errors``: as :attr:`RemoteError.errors`, every rank that failed in this call with
      its own error (empty when this process refused the value before sending it).
    """

    def __init__(self, path: str, type_name: str, reason: str, rank: int | None = None,
                 method: str = "", remote_traceback: str = "",
                 others: Mapping[int, RemoteError | ValueNotCarriedError] | None = None
                 ) -> None:
        self.path = path
        self.type_name = type_name
        self.reason = reason
        self.rank = rank
        self.method = method
        self.remote_traceback = remote_traceback
        self.errors = _rank_errors(self, rank, others)
        where = f" of {method!r}" if method else ""
        who = "" if rank is None else f"worker rank {rank}: "
        super().__init__(f"{who}{path}{where} ({type_name}) cannot be carried faithfully: "
                         f"{reason}{_others_note(others or {})}")
        if remote_traceback:
            self.__cause__ = _RemoteTraceback(remote_traceback)

    def __reduce__(self) -> tuple[type[ValueNotCarriedError],
                                  tuple[str, str, str, int | None, str, str, RankErrors]]:
        others = {r: e for r, e in self.errors.items() if e is not self}
        return (type(self), (self.path, self.type_name, self.reason, self.rank, self.method,
                             self.remote_traceback, others))


class ExecutorClosedError(GpuexecError):
    """The executor was shut down; build a new one to make more calls."""


class InvalidArgumentError(GpuexecError, ValueError, TypeError):
    """An argument of a call (``collective_rpc``, ``check_health``...) is invalid; nothing
    was sent to any worker.

    Both a ``ValueError`` and a ``TypeError``, so that code written against the plain
    built-in errors these checks once raised keeps catching them.
    """


class ForeignProcessError(GpuexecError):
    """The executor belongs to another process: this one is a fork of its owner.

    An executor's workers, sockets, shared-memory rings and zygote belong to the process
    that built it. A forked child (``os.fork``, a ``multiprocessing`` fork child, a web
    server's worker processes) inherits a copy of the object but must not use it: the
    parent is still using all of it. Build an executor in the child instead. Attributes:
    ``owner_pid`` (the process that built it) and ``pid`` (this process).
    """

    def __init__(self, owner_pid: int, pid: int) -> None:
        self.owner_pid = owner_pid
        self.pid = pid
        super().__init__(
            f"this executor belongs to process {owner_pid}, which built it; it cannot be "
            f"used in process {pid}, a fork of it (its workers, sockets and shared memory "
            "are the owner's): build a new Executor in this process")

    def __reduce__(self) -> tuple[type[ForeignProcessError], tuple[int, int]]:
        return (type(self), (self.owner_pid, self.pid))


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


class CheckpointUnsupportedError(GpuexecError):
    """``suspend()`` cannot work for this executor; nothing was touched.

    Raised before any worker is locked: CPU workers (no GPU state to park), Ray actors, a
    driver without the checkpoint API (NVIDIA driver 570 or newer), or a worker whose
    device report says it is not checkpointable. ``reasons`` maps rank to why (``-1`` for
    the whole executor).
    """

    def __init__(self, reasons: dict[int, str]) -> None:
        self.reasons = dict(reasons)
        lines = [reason if rank < 0 else f"rank {rank}: {reason}"
                 for rank, reason in sorted(reasons.items())]
        super().__init__("suspend is not possible here: " + "; ".join(lines))

    def __reduce__(self) -> tuple[type[CheckpointUnsupportedError], tuple[dict[int, str]]]:
        return (type(self), (self.reasons,))


class CheckpointError(GpuexecError):
    """A ``suspend()`` or ``resume()`` failed on at least one rank.

    ``operation`` is ``"suspend"`` or ``"resume"``; ``failures`` maps each failing rank to
    the driver's error (:class:`CudaDriverError`: function, CUresult code, name and text);
    ``states`` maps every rank to its checkpoint state after the rollback (``"running"``
    where it succeeded). ``reason`` is set instead of ``failures`` when the controller
    process itself failed. After a failed suspend, ranks the driver let go back run again;
    if any rank is not ``"running"``, the executor stays suspended (calls held) and
    ``resume()`` may be retried; ``shutdown()`` always works.
    """

    def __init__(self, operation: str, failures: dict[int, CudaDriverError],
                 states: dict[int, str], reason: str = "") -> None:
        self.operation = operation
        self.failures = dict(failures)
        self.states = dict(states)
        self.reason = reason
        parts = [f"rank {rank}: {e.function} failed: {e.name} ({e.code}): {e.text}"
                 for rank, e in sorted(failures.items())]
        if reason:
            parts.append(reason)
        by_state: dict[str, list[int]] = {}
        for rank, state in sorted(states.items()):
            by_state.setdefault(state, []).append(rank)
        now = ", ".join(f"{state}: ranks {ranks}" for state, ranks in by_state.items())
        super().__init__(f"{operation} failed: " + "; ".join(parts) +
                         (f" (afterwards {now})" if now else ""))

    def __reduce__(self) -> tuple[type[CheckpointError],
                                  tuple[str, dict[int, CudaDriverError], dict[int, str], str]]:
        return (type(self), (self.operation, self.failures, self.states, self.reason))


class CheckpointTimeoutError(CheckpointError, TimeoutError):
    """``suspend()``/``resume()`` ran out of its ``timeout``: the driver's lock timed out
    or the time was gone after the lock (the ranks were rolled back as after any
    :class:`CheckpointError`; ``states`` says where each one is), or another suspend or
    resume was still under way (then nothing was touched and ``states`` is empty)."""


class HeldCallTimeoutError(RpcTimeoutError):
    """The call was held, unsent, while the executor was suspended, and its timeout passed.

    Nothing reached any worker, so retrying is safe. ``ranks`` is empty.
    """

    def __init__(self, method: str, timeout: float) -> None:
        super().__init__(method, timeout, ())
        self.args = (f"{method!r} was not sent: the executor stayed suspended for the whole "
                     f"timeout of {timeout:g} s (call resume(), or give a longer timeout)",)

    def __reduce__(self) -> tuple[type[HeldCallTimeoutError], tuple[str, float]]:
        return (type(self), (self.method, self.timeout))


class IntegrationError(GpuexecError, ImportError):
    """An engine adapter (``gpuexec.integrations``) cannot work with the engine installed:
    the engine is missing, or its version does not have the interface the adapter was
    written for. The message names the version found and the versions supported."""


class ZygoteError(GpuexecError):
    """The zygote (``start_method="zygote"``) could not be started or is not safe to
    fork from."""


class RespawnError(GpuexecError):
    """``Executor.respawn`` refused, or could not finish: a rank that is alive without
    ``kill=True``, a backend or state where ranks cannot be replaced (Ray actors, a
    suspended executor), or a replacement that failed to start (then ``__cause__`` is its
    :class:`WorkerStartupError`, the rank stays dead and respawn may be tried again).
    ``ranks``: the ranks concerned."""

    def __init__(self, message: str, ranks: Sequence[int] = ()) -> None:
        self.ranks = list(ranks)
        super().__init__(message)

    def __reduce__(self) -> tuple[type[RespawnError], tuple[str, list[int]]]:
        return (type(self), (str(self), self.ranks))


class CallCancelledError(GpuexecError, CancelledError):
    """The call was cancelled before every rank answered: by a Ctrl-C in the waiting
    thread, by a :meth:`~gpuexec.Executor.check_health` that found its ranks silent, or
    by another thread's ``Future.cancel()``. A ``concurrent.futures.CancelledError``.

    ``method`` and ``ranks`` (those that had not answered, where the call was interrupted)
    and ``reason`` (why it was cancelled). The executor stays usable.
    """

    def __init__(self, method: str, ranks: Sequence[int], reason: str) -> None:
        self.method = method
        self.ranks = tuple(ranks)
        self.reason = reason
        super().__init__(f"{method!r} was cancelled ({reason}); ranks interrupted: "
                         f"{list(self.ranks)}")

    def __reduce__(self) -> tuple[type[CallCancelledError], tuple[str, tuple[int, ...], str]]:
        return (type(self), (self.method, self.ranks, self.reason))


class CallCancelled(BaseException):
    """Raised *inside a worker's method* when its call is cancelled (see
    :mod:`gpuexec.worker.cancel`): at the next bytecode, or out of the blocking wait the
    method is in (``time.sleep``, ``Event.wait``, ``select``, a socket read, a
    ``subprocess`` wait). A ``BaseException``, like ``KeyboardInterrupt``, so that
    ``except Exception`` in user code does not swallow it; ``finally`` blocks and
    context managers run as it unwinds. Catch it only to clean up, then re-raise.

    The one exception of this module outside :class:`GpuexecError`: it is raised into
    user code, never out of gpuexec's API. ``call_id`` and ``method`` name the call.
    """

    def __init__(self, call_id: int, method: str) -> None:
        self.call_id = call_id
        self.method = method
        super().__init__(f"the call to {method!r} was cancelled by the driver")

    def __reduce__(self) -> tuple[type[CallCancelled], tuple[int, str]]:
        return (type(self), (self.call_id, self.method))
