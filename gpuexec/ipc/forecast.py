"""When will the next request come? A forecast that lets an idle reader sleep through a
regular gap and be spinning, not asleep, when the request arrives.

Why: a worker woken from a futex sleep pays the kernel's wake-up and, on a server whose
idle cores drop into deep C-states, their exit latency: measured on an H200 host, calls
5 ms apart took 250-310 us (p50) against 11-29 us back to back. Spinning through the whole
gap would give the latency back at 100% of a core per worker (vLLM's MessageQueue does
that). Serving traffic is mostly periodic (a decode step every few ms), so the reader
learns the gap between requests from the writer's publish times (stamped in each ring
slot, CLOCK_MONOTONIC is one clock for every process) and:

    ===================  ===============================================================
    phase                what the reader does
    ===================  ===============================================================
    sleep until          futex sleep (a request that comes early still wakes it) until
    ``wake_at``          the window opens, less the expected oversleep
    spin until           poll the ring until the window closes
    ``spin_until``
    sleep                futex sleep without a forecast, as before
    ===================  ===============================================================

The window spans the middle three quarters of the last ``HISTORY`` gaps (order
statistics, so one late call or a pause does not blow it up), widened by ``MIN_MARGIN``
each side, and opened earlier by how late timed sleeps actually end (measured: about 80
us on an idle H200 host even with a 1 us timer slack, the cost of leaving a deep C-state;
the second-latest of the last ``HISTORY`` wake-ups, about the 97th percentile: a call
waits for every worker, so a miss rate per worker grows with the world size — with the
90th percentile, 4 and 8 workers each on time together only 66% and 43% of the time, and
the p50 of a 5 ms-spaced call at 4 and 8 workers stayed at the unforecast ~300 us on one
host).
Gaps are counted from two anchors (the previous request's publish time, and this reader's
reply to it; see :class:`ArrivalForecast`) and the tighter series is used. A forecast is
offered only when the expected spin (half the window: from its opening to
the typical arrival) stays within ``MAX_DUTY`` of the gap, so irregular traffic degrades
to plain sleeping (the idle CPU target holds whatever the traffic) and never to
spinning; and the early wake-up is cut where it would take the expected spin, lead
included, past ``SPIN_BUDGET`` of the gap (the 5% idle-CPU target, with the wake-ups' own
cost, comes before latency). Back-to-back traffic (gaps under ``MIN_GAP``) is left to the
plain spin after each message.
"""

from __future__ import annotations

from collections import deque

MIN_MARGIN = 20e-6      # seconds of spin either side of the window, at least
MAX_DUTY = 0.03         # expected spin at most this share of the gap
SPIN_BUDGET = 0.045     # ... and with the early wake-up (lead) added, at most this share
MIN_GAP = 500e-6        # shorter gaps: the plain spin after a message covers them
MAX_GAP = 1.0           # gaps longer than this are not forecast (idle, not serving)
HISTORY = 32            # gaps remembered


class _Gaps:
    """The last ``HISTORY`` gaps of one series and what they say about the next one."""

    def __init__(self) -> None:
        self.gaps: deque[float] = deque(maxlen=HISTORY)
        # Enough gaps, the last one within MIN_GAP..MAX_GAP: the series may be forecast
        # (back-to-back traffic never is, and is told so without sorting anything).
        self.candidate = False

    def add(self, gap: float) -> None:
        if gap > 0:  # a clock oddity is ignored, not learned
            self.gaps.append(gap)
            self.candidate = len(self.gaps) >= 4 and MIN_GAP <= gap <= MAX_GAP

    def window(self) -> tuple[float, float, float] | None:
        """``(lo, hi, typical)`` after the anchor, or None when the series is not regular
        enough to forecast within the spin budget."""
        if not self.candidate:
            return None
        gaps = self.gaps
        ordered = sorted(gaps)
        cut = len(ordered) // 8
        lo, hi = ordered[cut] - MIN_MARGIN, ordered[-1 - cut] + MIN_MARGIN
        typical = ordered[len(ordered) // 2]
        if hi - lo > 2.0 * MAX_DUTY * typical:
            return None
        return lo, hi, typical


class ArrivalForecast:
    """The last gaps of one stream and the reader's oversleep. Not thread-safe: one
    reader owns it.

    Two series of gaps, two anchors: from one request's publish time to the next (a
    driver on a fixed rhythm), and from this worker's reply to the next request (a
    driver that waits a fixed time after each call returns: there the first series
    carries the calls' own latency, so one slow call widens the next gap and a missed
    forecast breeds the next miss). The window comes from the tighter series.
    """

    def __init__(self) -> None:
        self._last: float | None = None     # publish time of the latest message
        self._replied: float | None = None  # when the reply to it was sent, if it was
        self._since_request = _Gaps()
        self._since_reply = _Gaps()
        self._late: deque[float] = deque(maxlen=HISTORY)  # woke - asked to wake
        self._lead = 0.0                  # how much earlier to wake
        # Whether either series may be forecast (else :meth:`window` is None): read by
        # the reader before it asks, so back-to-back traffic makes no call for it.
        self.regular = False

    def observe(self, published: float) -> None:
        """A message published at ``published`` (time.monotonic seconds) arrived."""
        last, self._last = self._last, published
        replied, self._replied = self._replied, None
        if last is not None:
            self._since_request.add(published - last)
            if replied is not None:
                self._since_reply.add(published - replied)
            self.regular = self._since_request.candidate or self._since_reply.candidate

    def replied(self, when: float) -> None:
        """The reader answered the latest message at ``when`` (time.monotonic)."""
        if self._last is not None and when >= self._last:
            self._replied = when

    def woke(self, asked: float, woke: float) -> None:
        """A timed sleep meant to end at ``asked`` ended at ``woke``."""
        self._late.append(max(0.0, woke - asked))
        ordered = sorted(self._late)
        self._lead = ordered[-2] if len(ordered) >= 2 else ordered[-1]

    def window(self) -> tuple[float, float] | None:
        """``(wake_at, spin_until)`` for the next message, or None when neither series is
        regular enough to forecast within the spin budget."""
        if not self.regular:
            return None  # back-to-back traffic (the hot path): nothing to sort
        found = [(anchor, w) for anchor, gaps in ((self._last, self._since_request),
                                                  (self._replied, self._since_reply))
                 if anchor is not None and (w := gaps.window()) is not None]
        if not found:
            return None
        anchor, (lo, hi, typical) = min(found, key=lambda f: f[1][1] - f[1][0])
        # The idle-CPU target comes first: a lead that would make the expected spin (from
        # waking to the typical arrival) exceed SPIN_BUDGET of the gap is cut to fit.
        lead = min(self._lead, max(0.0, SPIN_BUDGET * typical - (typical - lo)))
        return anchor + lo - lead, anchor + hi
