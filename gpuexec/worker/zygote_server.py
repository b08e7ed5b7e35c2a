"""The zygote: a clean, pre-warmed, CUDA-free process that forks workers on request.

``python -m gpuexec.worker.zygote_server <control fd> <driver pid> <module>...`` is started by
the driver as a fresh interpreter (it never imports the user's ``__main__``), imports
the preload modules (torch by default), and then checks that forking it is safe: CUDA
not initialised (``cuInit`` never ran: see :mod:`gpuexec.executor.start_method`) and a
single Python thread. Native thread pools that libraries start at import (OpenBLAS
under numpy and torch starts one here) are reported but allowed: they are idle, hold
no Python state, and those libraries rebuild their pools after a fork (at-fork
handlers), which is what makes ``fork`` after ``import numpy`` work everywhere.

It reports all that in :class:`~gpuexec.ipc.messages.ZygoteHello` and then forks one
child per :class:`~gpuexec.ipc.messages.SpawnWorker`: the child takes the driver's
current environment, working directory, stdout and stderr (passed as descriptors with
the request) and runs the worker main loop, so a
worker costs a ``fork`` instead of an interpreter start and an ``import torch``.

The zygote runs no Python thread of its own on purpose (a fork copies only the calling thread, and
a lock held by another thread would stay locked in the child forever): it waits with
one ``poll`` on the control socket, a pidfd of the driver (it exits when the driver
does) and a SIGCHLD wake-up pipe (it reaps its children and reports their exit codes).
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import sys
import threading
import traceback

import msgspec

from ..ipc.fdwait import readable
from ..ipc.framing import recv_message, send_message
from ..ipc.messages import (
    PROTOCOL_VERSION,
    SpawnWorker,
    StopZygote,
    ToZygote,
    WorkerExited,
    WorkerForked,
    ZygoteHello,
)


def _preload(modules: list[str]) -> tuple[list[str], dict[str, str]]:
    done: list[str] = []
    failed: dict[str, str] = {}
    for name in modules:
        try:
            importlib.import_module(name)
            done.append(name)
        except Exception as e:  # reported to the driver, which decides
            failed[name] = f"{type(e).__name__}: {e}"
    return done, failed


def _native_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _exit_code(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _child(control: socket.socket, closing: list[int], request: SpawnWorker,
           stdio: list[int]) -> None:
    """In the forked child: take the driver's stdout/stderr, become the worker. Never
    returns."""
    code = 1
    try:
        control.close()
        for fd in closing:
            os.close(fd)
        for target, fd in zip((1, 2), stdio, strict=False):
            os.dup2(fd, target)
            os.close(fd)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(request.environ)
        os.chdir(request.cwd)
        from .process import run_worker

        run_worker(request.spec)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(control: socket.socket, driver_pid: int, preload: list[str]) -> None:
    from ..cuda_state import cuda_state

    try:
        driver = os.pidfd_open(driver_pid)
    except ProcessLookupError:
        return
    done, failed = _preload(preload)
    state = cuda_state()
    send_message(control, msgspec.msgpack.encode(ZygoteHello(
        PROTOCOL_VERSION, os.getpid(), done, failed, threading.active_count(),
        _native_threads(), state.describe(), state.initialized)))
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    decoder = msgspec.msgpack.Decoder(ToZygote)
    watched = [control.fileno(), driver, wake_r]
    while True:
        ready = readable(watched, None)
        if driver in ready:
            return  # the driver is gone; each worker's guardian ends that worker
        if wake_r in ready:
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                send_message(control, msgspec.msgpack.encode(
                    WorkerExited(pid, _exit_code(status))))
        if control.fileno() in ready:
            try:
                data, fds = recv_message(control)
            except (EOFError, ConnectionError):
                return
            request = decoder.decode(data)
            if isinstance(request, StopZygote):
                return
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(control, [driver, wake_r, wake_w], request, fds)
            for fd in fds:  # the driver's stdout and stderr, now the child's
                os.close(fd)
            child = os.pidfd_open(pid)
            send_message(control, msgspec.msgpack.encode(WorkerForked(request.request_id, pid)),
                         [child])
            os.close(child)


def main(argv: list[str]) -> None:
    control = socket.socket(fileno=int(argv[0]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    serve(control, int(argv[1]), argv[2:])
    # No interpreter finalisation: with torch imported it takes about a second, which
    # the driver's exit would wait for, or which a dead driver's zygote would outlive it by.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
