"""What the driver counts about calls, per rank and per method, and its Prometheus view.

Recording (the hot path) is a few integer increments and one list append under the call
table's lock, which the reply path takes anyway: no histogram object, no label lookup, no
bucket search per call. A method's latencies are kept raw and folded into a fixed bucket
array 1,024 at a time (one numpy ``searchsorted``) and at scrape time. The Prometheus
families (``prometheus_client``, the ``gpuexec[metrics]`` extra, imported only when a
collector is asked for) are built from these aggregates at scrape time.

Every field of :class:`CallMetrics` is written and read under the call table's ``lock``
(see :mod:`.calls`), by whichever thread finishes the call or receives the reply, the
monitor for deaths, and the executor for suspend/resume; a scrape copies under it.

Families (all start with ``gpuexec_``):

====================================  =========  =========================================
family                                labels     what
====================================  =========  =========================================
gpuexec_calls_total                   rank       replies received (calls a rank completed)
gpuexec_errors_total                  rank, kind  calls a rank answered with an exception
                                                 (``kind``: its type name)
gpuexec_timeouts_total                rank       calls that timed out with this rank silent
gpuexec_cancellations_total           rank       calls cancelled while this rank still ran
gpuexec_worker_deaths_total           rank       this rank's process died
gpuexec_method_calls_total            method     calls finished, by method
gpuexec_method_errors_total           method,    calls that failed, by the error raised to
                                      kind       the caller
gpuexec_call_latency_seconds          method     histogram: send to last reply
gpuexec_request_bytes_total           method     request bytes sent (once per call)
gpuexec_late_replies_total                       replies dropped after their call ended
gpuexec_inflight_calls                           calls in flight now
gpuexec_suspend_seconds /             (summary)  time spent in suspend() / resume()
gpuexec_resume_seconds
gpuexec_worker_resident_bytes         rank       RSS of the worker process (at scrape)
gpuexec_worker_cpu_seconds_total      rank       CPU time of the worker process (at scrape)
====================================  =========  =========================================
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

# Upper bounds of the latency buckets, seconds (the last bucket is +Inf).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_BOUNDS = np.asarray(LATENCY_BUCKETS)


_FOLD = 1024  # latencies kept raw before they are folded into the buckets
_ABANDONED_KEPT = 1024  # ended calls remembered per rank until its late reply


class MethodStats:
    """One method's aggregates. The hot path only appends a call's latency to ``raw``
    (a list append); :meth:`fold` sorts them into the buckets in one vectorised step,
    when ``raw`` is full and at scrape time."""

    __slots__ = ("buckets", "calls", "errors", "raw", "request_bytes", "seconds")

    def __init__(self) -> None:
        self.raw: list[float] = []                 # latencies not folded yet
        self.calls = 0                             # folded calls
        self.seconds = 0.0                         # their total latency
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.errors: dict[str, int] = {}
        self.request_bytes = 0

    def fold(self) -> None:
        raw, self.raw = self.raw, []
        if not raw:
            return
        values = np.asarray(raw)
        counts = np.bincount(np.searchsorted(_BOUNDS, values, side="left"),
                             minlength=len(self.buckets))
        self.buckets = [a + int(b) for a, b in zip(self.buckets, counts, strict=True)]
        self.calls += len(raw)
        self.seconds += float(values.sum())


_BY_ALL = struct.Struct("=Qd")  # CallMetrics.answered_by_all: calls, last time (native)


class CallMetrics:
    """The driver's counters; see the module docstring (every field under the table lock)."""

    fold_at = _FOLD  # (read by the compiled call table steps, which leave the fold to
                     # finished())

    def __init__(self, world_size: int) -> None:
        self._replies = [0] * world_size         # calls each rank completed
        self._last_reply = [0.0] * world_size    # time.monotonic() of its last answer, 0: none
        # Calls every rank answered at once that the compiled call table step ended, not
        # in the two lists above yet: their count and the time of the last (_BY_ALL), so
        # that such a call costs the step one write, not one per rank; folded into the
        # lists whenever they are read (under the table lock, as every field).
        self.answered_by_all = bytearray(_BY_ALL.size)
        self.errors: list[dict[str, int]] = [{} for _ in range(world_size)]
        self.timeouts = [0] * world_size
        self.cancellations = [0] * world_size
        self.deaths = [0] * world_size
        # Calls that ended (timed out, cancelled) while a rank still ran them: rank ->
        # call id -> (method, sent at); dropped when the rank's late reply arrives. Workers
        # run calls in order, so the rank is busy with the oldest until then.
        self.abandoned: list[dict[int, tuple[str, float]]] = [{} for _ in range(world_size)]
        self.methods: dict[str, MethodStats] = {}
        self.suspend = [0, 0.0]                  # [count, seconds]
        self.resume = [0, 0.0]

    @property
    def replies(self) -> list[int]:
        self._fold()
        return self._replies

    @replies.setter
    def replies(self, value: list[int]) -> None:
        self._fold()
        self._replies = value

    @property
    def last_reply(self) -> list[float]:
        self._fold()
        return self._last_reply

    def _fold(self) -> None:
        """The calls every rank answered at once (``answered_by_all``) into the lists."""
        count, at = _BY_ALL.unpack_from(self.answered_by_all)
        if count:
            self.answered_by_all[:] = bytes(_BY_ALL.size)
            replies, last = self._replies, self._last_reply
            for rank in range(len(replies)):
                replies[rank] += count
                if at > last[rank]:
                    last[rank] = at

    def finished(self, method: str, seconds: float, nbytes: int, error: str | None) -> None:
        """A call ended (its latency, its request size, the type name of the error raised
        to the caller).
        The hot path: an append and an addition once the method has been seen."""
        stats = self.methods.get(method)
        if stats is None:
            stats = self.methods[method] = MethodStats()
        raw = stats.raw
        raw.append(seconds)
        stats.request_bytes += nbytes
        if error is not None:
            stats.errors[error] = stats.errors.get(error, 0) + 1
        if len(raw) >= _FOLD:
            stats.fold()

    def failed(self, rank: int, kind: str) -> None:
        """``rank`` answered a call with an exception of type ``kind``."""
        errors = self.errors[rank]
        errors[kind] = errors.get(kind, 0) + 1

    def silent(self, call_id: int, method: str, started: float, ranks: set[int],
               cancelled: bool) -> None:
        """A call ended by timeout (or was cancelled: ``cancelled``) while ``ranks`` ran it."""
        counts = self.cancellations if cancelled else self.timeouts
        for rank in ranks:
            counts[rank] += 1
            still = self.abandoned[rank]
            if len(still) < _ABANDONED_KEPT:
                still[call_id] = (method, started)

    def late(self, rank: int, call_id: int, now: float) -> None:
        """A reply came for a call that had ended: ``rank`` has finished it."""
        if 0 <= rank < len(self.abandoned) and \
                self.abandoned[rank].pop(call_id, None) is not None:
            self.last_reply[rank] = now


Sample = tuple[str, dict[str, str], float]


def families(metrics: CallMetrics, late_replies: int, inflight: int,
             processes: Callable[[], list[tuple[int, int | None, float | None]]]
             ) -> Iterator[Any]:
    """The Prometheus metric families of ``metrics`` (a copy taken by the caller);
    ``processes()``: ``(rank, rss bytes, cpu seconds)`` per live rank, read at scrape."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        SummaryMetricFamily,
    )

    def per_rank(name: str, doc: str, values: list[int]) -> Any:
        family = CounterMetricFamily(name, doc, labels=["rank"])
        for rank, value in enumerate(values):
            family.add_metric([str(rank)], value)
        return family

    yield per_rank("gpuexec_calls", "Calls each rank completed (replies received).",
                   metrics.replies)
    errors = CounterMetricFamily("gpuexec_errors", "Calls a rank answered with an "
                                 "exception, by its type.", labels=["rank", "kind"])
    for rank, kinds in enumerate(metrics.errors):
        for kind, n in sorted(kinds.items()):
            errors.add_metric([str(rank), kind], n)
    yield errors
    yield per_rank("gpuexec_timeouts", "Calls that timed out while this rank had not "
                   "answered.", metrics.timeouts)
    yield per_rank("gpuexec_cancellations", "Calls cancelled while this rank "
                   "had not answered.", metrics.cancellations)
    yield per_rank("gpuexec_worker_deaths", "Deaths of this rank's worker process.",
                   metrics.deaths)
    calls = CounterMetricFamily("gpuexec_method_calls", "Calls finished, by method.",
                                labels=["method"])
    failed = CounterMetricFamily("gpuexec_method_errors", "Calls that failed, by method and "
                                 "the error raised to the caller.", labels=["method", "kind"])
    latency = HistogramMetricFamily("gpuexec_call_latency_seconds", "Time from sending a "
                                    "call to its last reply.", labels=["method"])
    sent = CounterMetricFamily("gpuexec_request_bytes", "Request bytes sent, by method.",
                               labels=["method"])
    for method, stats in sorted(metrics.methods.items()):
        calls.add_metric([method], stats.calls)
        for kind, n in sorted(stats.errors.items()):
            failed.add_metric([method, kind], n)
        cumulative, buckets = 0, []
        for bound, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), stats.buckets, strict=True):
            cumulative += n
            buckets.append((bound, cumulative))
        latency.add_metric([method], buckets, stats.seconds)
        sent.add_metric([method], stats.request_bytes)
    yield from (calls, failed, latency, sent)
    yield CounterMetricFamily("gpuexec_late_replies", "Replies dropped because their call "
                              "had ended (timed out or abandoned).", value=late_replies)
    yield GaugeMetricFamily("gpuexec_inflight_calls", "Calls in flight now.", value=inflight)
    for name, (count, seconds) in (("suspend", metrics.suspend), ("resume", metrics.resume)):
        yield SummaryMetricFamily(f"gpuexec_{name}_seconds", f"Time spent in {name}().",
                                  count_value=int(count), sum_value=seconds)
    rss = GaugeMetricFamily("gpuexec_worker_resident_bytes", "Resident memory of the "
                            "worker process.", labels=["rank"])
    cpu = CounterMetricFamily("gpuexec_worker_cpu_seconds", "CPU time of the worker "
                              "process.", labels=["rank"])
    for rank, rss_bytes, cpu_s in processes():
        if rss_bytes is not None:
            rss.add_metric([str(rank)], rss_bytes)
        if cpu_s is not None:
            cpu.add_metric([str(rank)], cpu_s)
    yield rss
    yield cpu
