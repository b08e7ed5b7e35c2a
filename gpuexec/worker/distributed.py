"""The torch.distributed default process group of a worker (``distributed_backend``).

    driver: MASTER_ADDR / MASTER_PORT chosen ──▶ WorkerSpec.distributed
    worker: environment (RANK, WORLD_SIZE, MASTER_*) ──▶ init_device ──▶ init_process_group
            (env:// rendezvous: rank 0 hosts the TCP store, the others connect to it)
            ──▶ import worker class ──▶ __init__ ... serve ... ──▶ destroy_process_group

When the driver replaces a dead rank (``Executor.respawn``) the survivors re-form the
group without waiting on the dead peer::

    driver ── ABORT_SIGNAL ──▶ abort thread (sigwait): group.abort(); a collective the
                               main thread is blocked in returns with an error
           ── Regroup ───────▶ main loop: abort what is left, join the new group at the
                               fresh rendezvous (the new rank joins it from its start-up),
                               Worker.on_peers_replaced(ranks) ── Reply ──▶ driver

The abort thread exists only with a backend; the signal is blocked in every other thread
(it is blocked in the main thread before any thread starts), so only that thread takes
it. NCCL is aborted through its communicators; gloo has no abort that releases a waiting
collective, so the TCP connections the group opened (those that appeared while it was
made: gloo's pairs and the store's client) are shut down, and a wait on any of them
fails. The driver sends exactly one signal before each Regroup and the Regroup waits
for that abort to finish, so the abort never touches the new group.

The group is made before the user's worker class is imported, so its ``__init__`` can
already use collectives (load a sharded checkpoint, broadcast a config). torch is
imported only here and only when a backend was asked for: a worker without one never
pays for it. A rendezvous that fails (an occupied port, an unreachable address, a peer
that never came) raises within ``timeout`` with the rank, backend and address in the
message; the driver turns it into ``WorkerStartupError`` and stops the other ranks,
which may still be blocked in the rendezvous (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import datetime
import inspect
import logging
import os
import signal
import socket
import stat
import threading
import time
from typing import Any

import msgspec

from ..ipc.messages import DistributedSpec, WorkerSpec
from ..ipc.signals import ABORT_SIGNAL
from ..optional import require_torch
from .device import torch_device

log = logging.getLogger("gpuexec.worker")

_ABORT_WAIT_S = 10.0  # a Regroup waits this long for the abort its signal started
_aborted = threading.Semaphore(0)  # released by the abort thread after each abort
_group_sockets: list[int] = []  # the TCP sockets the group opened (main thread writes
#                                 them before any abort can come; the abort thread reads)


def distributed_environment(spec: WorkerSpec) -> dict[str, str]:
    """``MASTER_ADDR`` and ``MASTER_PORT`` for the ``env://`` rendezvous (empty when no
    backend was asked for); ``RANK`` and ``WORLD_SIZE`` are always set by the worker."""
    d = spec.distributed
    if d is None:
        return {}
    return {"MASTER_ADDR": d.master_addr, "MASTER_PORT": str(d.master_port)}


def start_abort_thread(spec: WorkerSpec) -> None:
    """With a backend: block ``ABORT_SIGNAL`` here (the main thread, before any other
    thread starts: they inherit the mask) and take it in a daemon thread that aborts the
    group each time it comes (see the module docstring)."""
    if spec.distributed is None:
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {ABORT_SIGNAL})
    threading.Thread(target=_abort_loop, name="gpuexec-abort", daemon=True).start()


def _abort_loop() -> None:
    while True:
        signal.sigwait({ABORT_SIGNAL})
        try:
            abort_in_flight()
        except Exception as e:  # the Regroup that follows aborts it again, or reports
            log.warning("gpuexec: aborting the process group failed: %s", e)
        finally:
            _aborted.release()


def abort_in_flight() -> None:
    """Make a collective the main thread is blocked in return: NCCL's communicators are
    aborted (``ncclCommAbort``); the TCP connections the group opened (gloo's pairs, the
    store's client) are shut down, so a wait on any of them fails at once. From the
    abort thread (ABORT_SIGNAL), and from the cancel watcher (:mod:`.group_abort`) when
    a cancelled call waits in a collective."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    group = dist.group.WORLD
    if group is not None and dist.get_backend(group) == "nccl":
        group.abort()
    for fd in _group_sockets:
        try:
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _tcp_sockets() -> set[int]:
    """This process's connected TCP sockets (descriptor numbers)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            with socket.socket(fileno=os.dup(fd)) as sock:
                if sock.family in (socket.AF_INET, socket.AF_INET6) and \
                        sock.type == socket.SOCK_STREAM and \
                        not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    found.add(fd)  # connected, not listening (gloo ends on a failed accept)
        except OSError:
            continue
    return found


def abort_process_group() -> None:
    """Leave the group without waiting on any peer (the dead one never answers). A
    Regroup follows the driver's ABORT_SIGNAL: the abort thread's work is waited for
    first, so that it never touches the new group."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    if not _aborted.acquire(timeout=_ABORT_WAIT_S):
        log.warning("gpuexec: the process group's abort did not come; aborting here")
    if not dist.is_initialized():
        return
    try:
        distributed_c10d._abort_process_group()
    except Exception as e:  # an abort the backend refuses: destroy (gloo does not wait)
        log.warning("gpuexec: aborting the process group failed (%s); destroying it", e)
        dist.destroy_process_group()


def regroup(spec: WorkerSpec, distributed: DistributedSpec) -> WorkerSpec:
    """Abort the group and join the new one at ``distributed``; the spec that now holds."""
    abort_process_group()
    spec = msgspec.structs.replace(spec, distributed=distributed)
    os.environ.update(distributed_environment(spec))
    init_process_group(spec)
    return spec


def init_process_group(spec: WorkerSpec) -> None:
    """Join the default process group; raise ``RuntimeError`` naming this rank on failure.

    NCCL gets ``device_id`` (where this torch accepts it), which binds the communicator to
    this worker's GPU at once instead of guessing it at the first collective.
    """
    d = spec.distributed
    if d is None:
        return
    torch = require_torch(f"distributed_backend={d.backend!r}")
    import torch.distributed as dist

    kwargs: dict[str, Any] = {}
    if d.backend == "nccl" and \
            "device_id" in inspect.signature(dist.init_process_group).parameters:
        kwargs["device_id"] = torch.device(torch_device(spec))
    before = _tcp_sockets()
    try:
        if spec.rank != 0:
            _wait_for_store(d)
        dist.init_process_group(
            d.backend, init_method="env://", rank=spec.rank, world_size=spec.world_size,
            timeout=datetime.timedelta(seconds=d.timeout), **kwargs)
        _group_sockets[:] = sorted(_tcp_sockets() - before)
    except Exception as e:
        raise RuntimeError(
            f"rank {spec.rank} of {spec.world_size}: torch.distributed {d.backend} "
            f"rendezvous at {d.master_addr}:{d.master_port} failed (distributed_timeout="
            f"{d.timeout:g} s): {type(e).__name__}: {e}") from e


def _wait_for_store(d: DistributedSpec) -> None:
    """Wait until rank 0's store listens (bounded by the rendezvous timeout; past it, the
    rendezvous itself reports). torch's store client, when its first connection is
    refused, retries after a random back-off of up to several seconds: a rank that comes
    before rank 0 (the survivors when rank 0 is the one replaced, a replacement that
    starts before the survivors' rank 0 has re-formed) would lose those seconds."""
    deadline = time.monotonic() + d.timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((d.master_addr, d.master_port), timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.002)


def destroy_process_group(spec: WorkerSpec) -> None:
    """Leave the default process group at shutdown (a no-op when none was made or the user
    already destroyed it); a failure is logged, never raised: the worker is exiting."""
    if spec.distributed is None:
        return
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception as e:
        log.warning("gpuexec: destroying the torch.distributed process group failed: %s", e)
