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

from .executor.executor import Executor
from .worker.base import Worker


def send_raw(executor: Executor, frames: Sequence[bytes]) -> None:
    """Send ``frames`` to every worker exactly as given (no encoder), by the transport in
    use: a packet in the request ring over shared memory, one multipart message over
    ZeroMQ. Workers drop and count what they cannot decode (``stats().worker_malformed``
    after :meth:`~gpuexec.Executor.check_health`)."""
    executor._owner.check()
    executor._channel.send_raw(list(frames))


def call_unchecked(executor: Executor, method: str, fn: bytes | None = None,
                   args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                   *, timeout: float = 30.0) -> list[Any]:
    """Call ``method`` on every worker past the driver's own checks: ``fn`` is a pickled
    callable sent even where the executor refuses callables (``allow_callables=False``),
    so a test can show that the workers refuse it too. Returns the results in rank order;
    raises what :meth:`~gpuexec.Executor.collective_rpc` raises."""
    executor._owner.check()
    channel = executor._channel
    call = channel.submit(method, fn, list(args), dict(kwargs or {}),
                          list(range(executor.world_size)), None, timeout, False)
    return channel.wait(call)  # type: ignore[no-any-return]


def worker_wire(worker: Worker) -> tuple[bytes | None, bytes | None, bool]:
    """How ``worker`` (inside a worker process: pass it from a callable) talks to the
    driver: its own CURVE public key and the driver's it trusts (both None on ``ipc``),
    and whether it uses the shared-memory rings."""
    spec = worker._gpuexec_ctx.spec
    curve = spec.curve
    return (curve.public if curve else None, curve.server_public if curve else None,
            spec.shm is not None)
