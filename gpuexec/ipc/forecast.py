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
    ``wake_at``          ``expected - margin - oversleep``
    spin until           poll the ring until ``expected + margin``
    ``spin_until``
    sleep                futex sleep without a forecast, as before
    ===================  ===============================================================

``margin`` covers the gap's jitter (3x its running mean absolute deviation, at least
``MIN_MARGIN``); ``oversleep`` is how late the timed sleeps actually ended (running mean).
A forecast is offered only when the spin it costs (``2 * margin + oversleep error``) stays
within ``MAX_DUTY`` of the gap, so irregular traffic degrades to plain sleeping (the idle
CPU target holds whatever the traffic) and never to spinning.
"""

from __future__ import annotations

MIN_MARGIN = 25e-6      # seconds of spin either side of the expected arrival, at least
MAX_DUTY = 0.03         # spin at most this share of the gap
MAX_GAP = 1.0           # gaps longer than this are not forecast (idle, not serving)
_ALPHA = 0.125          # weight of a new sample in the running means


class ArrivalForecast:
    """Running estimates of one stream's inter-arrival gap, its jitter and the reader's
    oversleep. Not thread-safe: one reader owns it."""

    def __init__(self) -> None:
        self._last: float | None = None   # publish time of the latest message
        self._gap: float | None = None    # running mean of the gap
        self._jitter = 0.0                # running mean absolute deviation of the gap
        self._oversleep = 0.0             # running mean of (woke - asked to wake)

    def observe(self, published: float) -> None:
        """A message published at ``published`` (time.monotonic seconds) arrived."""
        last, self._last = self._last, published
        if last is None:
            return
        gap = published - last
        if gap <= 0:
            return
        if self._gap is None:
            self._gap = gap
            return
        self._jitter += _ALPHA * (abs(gap - self._gap) - self._jitter)
        self._gap += _ALPHA * (gap - self._gap)

    def woke(self, asked: float, woke: float) -> None:
        """A timed sleep meant to end at ``asked`` ended at ``woke``."""
        self._oversleep += _ALPHA * (max(0.0, woke - asked) - self._oversleep)

    def window(self) -> tuple[float, float] | None:
        """``(wake_at, spin_until)`` for the next message, or None when the stream is not
        regular enough to forecast within the spin budget."""
        if self._last is None or self._gap is None or self._gap > MAX_GAP:
            return None
        margin = max(MIN_MARGIN, 3.0 * self._jitter)
        if 2.0 * margin > MAX_DUTY * self._gap:
            return None
        expected = self._last + self._gap
        return expected - margin - self._oversleep, expected + margin
