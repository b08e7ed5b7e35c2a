"""The worker's shutdown hook (:meth:`gpuexec.Worker.on_shutdown`), run exactly once.

Two ways lead here, both on the worker's main thread:

=================  ===========================================  ===========================
how                when                                         bound
=================  ===========================================  ===========================
graceful           the driver's Shutdown message ended the loop  the driver's own grace
                                                                 (``shutdown_timeout``),
                                                                 then its SIGTERM
SIGTERM            the signal handler, at any point of the loop  ``shutdown_timeout``: the
                   or of a call                                  hook runs in a thread the
                                                                 handler joins that long
=================  ===========================================  ===========================

A SIGTERM that arrives while the hook already runs (the driver escalates because the
graceful hook hangs) does not run it again: the worker exits at once. The flag needs no
lock: both paths run on the main thread (Python runs signal handlers there, between
bytecodes), so they never interleave inside ``_begin``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("gpuexec.worker")


class ShutdownHook:
    """``fn`` (the worker's ``on_shutdown``), run at most once."""

    def __init__(self, fn: Callable[[], None], timeout: float) -> None:
        self._fn = fn              # set once
        self._timeout = timeout    # seconds the SIGTERM path waits for the hook
        self._started = False      # main thread only (see the module docstring)

    def _begin(self) -> bool:
        if self._started:
            return False
        self._started = True
        return True

    def _call(self) -> None:
        try:
            self._fn()
        except Exception:
            log.exception("gpuexec: the worker's on_shutdown() raised")

    def run(self) -> None:
        """Graceful shutdown: run the hook here (unless it ran already)."""
        if self._begin():
            self._call()

    def run_bounded(self) -> None:
        """SIGTERM: run the hook in a thread and wait for it at most ``timeout`` s (not
        at all when it is already running); the caller exits afterwards either way."""
        if not self._begin():
            return
        thread = threading.Thread(target=self._call, name="gpuexec-on-shutdown", daemon=True)
        thread.start()
        thread.join(self._timeout)
        if thread.is_alive():
            log.warning("gpuexec: on_shutdown() still running after %.1f s; exiting",
                        self._timeout)
