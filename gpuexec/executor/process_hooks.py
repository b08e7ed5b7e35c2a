"""The driver process's hooks: interpreter exit, SIGTERM, a second Ctrl-C and fork.

Every live executor is in :data:`live` (weakly: garbage collection still shuts one
down). At interpreter exit each one is shut down and the zygotes closed. SIGTERM to the
driver becomes ``SystemExit(143)`` in the main thread (so ``__exit__`` and the atexit
shutdown run), installed only over the default action. In a child forked by other code
the registry is emptied (the parent's executors are not the child's to stop; see
:mod:`.ownership`) and SIGTERM gets its default action back. In a worker process, which
exits without interpreter exit, the executors it built are shut down through
:mod:`gpuexec.ipc.exit_hooks`.

Touched by the thread that builds or shuts down an executor (``live``: a WeakSet, whose
add/discard are atomic), and by the main thread (signals).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing.util  # noqa: F401 - imported before our atexit hook (see below)
import os
import signal
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Protocol

from ..ipc import exit_hooks
from .zygote_client import close_zygotes

log = logging.getLogger("gpuexec")


class Live(Protocol):
    """What the hooks need of an executor."""

    def shutdown(self, timeout: float | None = None) -> None: ...

    def disown_in_fork(self) -> None: ...


live: weakref.WeakSet[Live] = weakref.WeakSet()


def _shutdown_all() -> None:
    for ex in list(live):
        ex.shutdown()
    close_zygotes()


def _shutdown_nested(grace: float) -> None:
    """This process is a worker exiting (see :mod:`gpuexec.ipc.exit_hooks`): shut down
    the executors it built and left running, with ``grace`` for their workers."""
    for ex in list(live):
        ex.shutdown(timeout=grace)


exit_hooks.register(_shutdown_nested)


def _forget_live_in_child() -> None:
    """A fork's copy of the registry lists the parent's executors: exiting the child must
    not shut them down (see :mod:`.ownership`)."""
    global live
    for ex in list(live):
        ex.disown_in_fork()
    live = weakref.WeakSet()


os.register_at_fork(after_in_child=_forget_live_in_child)


# atexit runs hooks last-registered first: ours must run before multiprocessing's (which
# would wait for the workers ours is about to stop), so it is registered after
# multiprocessing.util (which registers its hook when imported) is surely imported.
atexit.register(_shutdown_all)


def add(ex: Live) -> None:
    """``ex`` started: shut it down at exit; SIGTERM exits through ``SystemExit``."""
    live.add(ex)
    _install_sigterm_handler()


def discard(ex: Live) -> None:
    live.discard(ex)


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM to the driver: exit (code 143) through ``SystemExit``.

    The handler runs in the main thread at whatever point it was interrupted, possibly
    inside a call holding an executor's locks, so it must not shut executors down
    itself: unwinding runs ``__exit__`` and then the atexit shutdown of every executor.
    A second SIGTERM kills at once (the default action is restored).
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if os.getpid() != _sigterm_owner:  # a child forked by other code inherited it
        os.kill(os.getpid(), signum)
        return
    log.warning("gpuexec: SIGTERM: exiting; shutting down %d executor(s)", len(live))
    raise SystemExit(128 + signum)


_sigterm_owner = 0  # pid of the process that installed _on_sigterm


def _install_sigterm_handler() -> None:
    """Install :func:`_on_sigterm`, only in the main thread and only over the default
    action: an application's own SIGTERM handler is left alone (it runs its own
    shutdown, and interpreter exit still shuts executors down through atexit). Children
    forked by other code inherit the handler; in them it acts as the default action."""
    global _sigterm_owner
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        if not _sigterm_owner:
            os.register_at_fork(after_in_child=_default_sigterm_in_child)
        _sigterm_owner = os.getpid()
        signal.signal(signal.SIGTERM, _on_sigterm)


def _default_sigterm_in_child() -> None:
    """A child forked by any code gets SIGTERM's default action back: a Python-level
    handler only runs between bytecodes, so a child stuck in a C-level wait (a
    multiprocessing Pool worker on a lock) would never die of ``Pool.terminate()``."""
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def uninstall_sigterm_handler() -> None:
    """Give SIGTERM its default action back once no executor is left."""
    if not live and threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def second_interrupt_exits(kill_workers: Callable[[], None]) -> Iterator[None]:
    """While an executor shuts down after a Ctrl-C (or any shutdown on the main thread),
    a further Ctrl-C ends the process at once, quietly: one line on stderr, the
    workers SIGKILLed (their guardians take their children along), exit code 130; no
    second traceback through the shutdown's internals. Only on the main thread and over
    Python's default SIGINT handler: an application's own handler is left alone."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return

    def exit_now(signum: int, frame: object) -> None:
        try:
            kill_workers()
        finally:
            os.write(2, b"gpuexec: interrupted again during shutdown; exiting now\n")
            os._exit(128 + signum)

    signal.signal(signal.SIGINT, exit_now)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
