"""The hang report (``Executor(..., hang_report_after=s)``): a call some rank is still
running ``s`` seconds after it was sent is logged once, with those ranks' stacks, and
left running (a report, not a cancellation).

A thread of its own, started only when asked for: it sleeps on an event until the
earliest moment a pending call could become due (or ``s``/2 when nothing is pending, to
see calls sent meanwhile without a hook on the hot path), then reads the call table under
its lock, and collects the stacks with no lock held (bounded to a second, so the thread
never stalls). Fields: ``_reported`` (call ids already logged, pruned to the pending
ones) is this thread's only; ``_stop`` is set once by :meth:`HangReporter.close`.
"""

from __future__ import annotations

import logging
import threading
import time

from .calls import CallTable
from .forensics import Forensics

log = logging.getLogger("gpuexec")

_STACKS_S = 1.0  # the bound on one collection of stacks


class HangReporter:
    """See the module docstring."""

    def __init__(self, forensics: Forensics, table: CallTable, after: float) -> None:
        self._forensics = forensics
        self._table = table
        self._after = after
        self._reported: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpuexec-hang-report",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=_STACKS_S + 1.0)

    def _loop(self) -> None:
        wait = self._after / 2
        while not self._stop.wait(wait):
            wait = self._round()

    def _round(self) -> float:
        """Report the calls due now; the seconds until the next one can be due."""
        table, after = self._table, self._after
        now = time.monotonic()
        due: list[tuple[str, float, list[int]]] = []
        nearest = after / 2
        with table.lock:
            self._reported &= table.pending.keys()
            for call_id, call in table.pending.items():
                if call_id in self._reported or not call.owed:
                    continue
                left = call.started + after - now
                if left > 0:
                    nearest = min(nearest, left)
                    continue
                self._reported.add(call_id)
                due.append((call.method, now - call.started, sorted(call.owed)))
        for method, running, ranks in due:
            stacks = self._forensics.stacks(ranks, _STACKS_S)
            log.warning("gpuexec: %r is still running on ranks %s after %.1f s "
                        "(hang_report_after=%g; the call goes on):\n%s", method, ranks,
                        running, after, "\n\n".join(stacks[r] for r in sorted(stacks)))
        return max(nearest, 0.001)
