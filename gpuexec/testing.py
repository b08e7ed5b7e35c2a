"""Helpers for testing code around an executor: what a hostile or broken peer would send.

Not for serving: these bypass the driver's own checks on purpose, so that a test can
show what the *workers* do with frames the driver never sends (fuzzing, malformed
messages) and with calls the driver refuses (defence in depth)::

    from gpuexec import testing

    testing.send_raw(ex, [b"\\xc1"])                 # a frame that is not msgpack
    ex.stats()  # after check_health(): worker_malformed counts it per rank
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import InvalidArgumentError
from .executor.executor import Executor
from .executor.validate import call_args, call_kwargs, seconds
from .worker.base import Worker


def send_raw(executor: Executor, frames: Sequence[bytes]) -> None:
    """Send ``frames`` to every worker exactly as given (no encoder), by the transport in
    use: a packet in the request ring over shared memory, one multipart message over
    ZeroMQ. Workers drop and count what they cannot decode (``stats().worker_malformed``
    after :meth:`~gpuexec.Executor.check_health`).

    ``frames``: a non-empty list or tuple of bytes-like frames (``bytes``, ``bytearray``,
    ``memoryview``); anything else (no frames at all, a ``str``, a frame that is not
    bytes) raises :class:`~gpuexec.errors.InvalidArgumentError` and sends nothing: it is
    no message any transport can carry."""
    _executor(executor)._owner.check()
    executor._channel.send_raw(_frames(frames))


def call_unchecked(executor: Executor, method: str, fn: bytes | None = None,
                   args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                   *, timeout: float = 30.0) -> list[Any]:
    """Call ``method`` on every worker past the driver's own checks: ``fn`` is a pickled
    callable sent even where the executor refuses callables (``allow_callables=False``),
    so a test can show that the workers refuse it too. Returns the results in rank order;
    raises what :meth:`~gpuexec.Executor.collective_rpc` raises; bad arguments (a method
    that is not a non-empty str, ``fn`` not bytes, ``args``, ``kwargs`` or ``timeout``
    as :meth:`~gpuexec.Executor.collective_rpc` refuses them) raise
    :class:`~gpuexec.errors.InvalidArgumentError` before anything is sent."""
    _executor(executor)._owner.check()
    if type(method) is not str or not method:
        raise InvalidArgumentError(f"method must be a non-empty str, not {method!r}")
    if fn is not None and not isinstance(fn, bytes):
        raise InvalidArgumentError(f"fn must be pickled bytes or None, not "
                                   f"{type(fn).__name__}")
    call_list, call_dict = call_args(args), call_kwargs(kwargs)
    deadline = seconds("timeout", timeout)
    channel = executor._channel
    call = channel.submit(method, fn, call_list, call_dict,
                          list(range(executor.world_size)), None, deadline, False)
    return channel.wait(call)  # type: ignore[no-any-return]


def _executor(executor: object) -> Executor:
    if not isinstance(executor, Executor):
        raise InvalidArgumentError(f"expected an Executor, not {type(executor).__name__}")
    return executor


def _frames(frames: object) -> list[bytes]:
    if not isinstance(frames, (list, tuple)):
        raise InvalidArgumentError(f"frames must be a list or tuple of bytes, not "
                                   f"{type(frames).__name__}")
    if not frames:
        raise InvalidArgumentError("frames must hold at least one frame: a message of no "
                                   "frames is nothing a transport can carry")
    for i, frame in enumerate(frames):
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise InvalidArgumentError(f"frames[{i}] must be bytes, bytearray or a "
                                       f"memoryview, not {type(frame).__name__}")
    return [bytes(frame) for frame in frames]


def worker_wire(worker: Worker) -> tuple[bytes | None, bytes | None, bool]:
    """How ``worker`` (inside a worker process: pass it from a callable) talks to the
    driver: its own CURVE public key and the driver's it trusts (both None on ``ipc``),
    and whether it uses the shared-memory rings."""
    spec = worker._gpuexec_ctx.spec
    curve = spec.curve
    return (curve.public if curve else None, curve.server_public if curve else None,
            spec.shm is not None)
