"""What a worker process runs on its way out, for executors built inside it.

A worker may host an executor of its own (an engine whose worker drives sub-workers).
Its process ends with ``os._exit`` (it is a fork or a zygote's child: interpreter exit
and its ``atexit`` hooks do not run), after taking its children along, the inner
executor's workers and their guardians included, so nobody would remove that
executor's private directories. The executor's side registers here how to shut every
live executor down (:mod:`gpuexec.executor.process_hooks`, only once the executor is
imported); the worker's side runs it before it exits (:mod:`gpuexec.worker.process`).
The two rooms meet here, in ``ipc``, without importing each other.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("gpuexec")

_hooks: list[Callable[[float], None]] = []  # fn(grace seconds); appended at import time


def register(fn: Callable[[float], None]) -> None:
    """Run ``fn(grace)`` when a worker process that imported it exits."""
    _hooks.append(fn)


def run(grace: float, bound: float) -> None:
    """Run the hooks in a thread and wait for them at most ``bound`` seconds (the worker
    may have been interrupted by a signal holding a lock a hook needs: it then exits
    anyway)."""
    if not _hooks:
        return

    def run_all() -> None:
        for fn in list(_hooks):
            try:
                fn(grace)
            except Exception:
                log.exception("gpuexec: shutting down an executor built in this worker failed")

    thread = threading.Thread(target=run_all, name="gpuexec-nested-shutdown", daemon=True)
    thread.start()
    thread.join(bound)
