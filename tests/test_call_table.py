"""The call table's hot steps (a blocking call's entry, its end when every rank answered
at once) give the same table on both forms: compiled (``_calltable.c``, with the compiled
core) and Python (the general methods); and each steps aside to the general path where
that must act (a held lock, a refusal, no free slot, a slot awaited, a fold due, a call
that is not simply waiting for all of its ranks)."""

from __future__ import annotations

import gc
import signal
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from gpuexec.errors import ExecutorClosedError, InflightLimitError
from gpuexec.executor.calls import CallTable, PendingCall, compiled_steps, make_lock
from gpuexec.executor.metrics import LATENCY_BUCKETS
from gpuexec.ipc import ringcore


@pytest.fixture(params=["compiled", "python"])
def steps(request: pytest.FixtureRequest) -> Iterator[str]:
    """Tables built while this process runs the ``compiled`` or the ``python`` core."""
    name: str = request.param
    before = ringcore.current().NAME
    ringcore.select(name)
    try:
        yield name
    finally:
        ringcore.select(before)


def made_by(steps: str, call: Any) -> None:
    assert isinstance(call, PendingCall) == (steps == "python")


def test_the_steps_follow_the_core_this_process_runs(steps: str) -> None:
    assert (compiled_steps() is not None) == (steps == "compiled")


def test_a_blocking_call_enters_and_ends_as_the_general_methods_do_it(steps: str) -> None:
    table = CallTable(8, world_size=2)
    before = time.monotonic()
    first = table.new_call("noop", [1, 0], None, 2.5, None)
    made_by(steps, first)
    assert (first.method, first.ranks, first.owed, first.values, first.segments) == \
        ("noop", [1, 0], {0, 1}, {}, [])
    assert (first.slot, first.done, first.ping, first.future, first.event) == \
        (True, False, False, None, None)
    assert (first.unique_reply_rank, first.failures, first.value, first.error) == \
        (None, None, None, None)
    assert before <= first.started <= time.monotonic()
    assert first.deadline == first.started + 2.5 and first.timeout == 2.5
    assert table.pending == {first.call_id: first} and table.inflight == 1
    assert table.stats.calls == 1
    first.nbytes = 10
    table.answered_all(first, None)  # the method's first call: its stats are made
    assert first.outcome() == [None, None] and first.done and not first.slot
    second = table.new_call("noop", [0, 1], None, None, None)
    assert second.call_id == first.call_id + 1 and second.deadline is None
    second.nbytes = 5
    table.answered_all(second, {1: "b", 0: "a"})
    assert second.outcome() == ["a", "b"] and not second.owed
    assert table.pending == {} and table.inflight == 0 and table.stats.calls == 2
    metrics = table.metrics
    assert metrics.replies == [2, 2] and metrics.last_reply[0] >= second.started
    stats = metrics.methods["noop"]
    assert len(stats.raw) == 2 and all(0 <= t < 1 for t in stats.raw)
    assert stats.request_bytes == 15 and stats.errors == {}


def test_every_latency_is_folded_into_the_histogram(steps: str) -> None:
    table = CallTable(8, world_size=1)
    n = 2 * table.metrics.fold_at + 7
    for _ in range(n):
        table.answered_all(table.new_call("noop", [0], None, None, None), None)
    stats = table.metrics.methods["noop"]
    stats.fold()
    assert stats.calls == n and sum(stats.buckets) == n
    assert len(stats.buckets) == len(LATENCY_BUCKETS) + 1
    assert table.metrics.replies == [n] and table.stats.calls == n


def test_a_held_lock_is_waited_for(steps: str) -> None:
    table = CallTable(8, world_size=1)
    table.answered_all(table.new_call("noop", [0], None, None, None), None)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with table.lock:
            held.set()
            release.wait(5)
            table.stats.calls += 100  # what the holder wrote is kept

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    threading.Timer(0.2, release.set).start()
    t0 = time.monotonic()
    call = table.new_call("noop", [0], None, None, None)
    assert time.monotonic() - t0 >= 0.15  # it waited for the holder
    assert table.stats.calls == 102 and table.pending == {call.call_id: call}
    holder.join()
    release.clear()
    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    threading.Timer(0.2, release.set).start()
    table.answered_all(call, None)
    holder.join()
    assert call.outcome() == [None] and table.pending == {} and table.inflight == 0
    assert table.stats.calls == 202 and table.metrics.replies == [2]


def test_a_closed_table_refuses_the_call_and_keeps_nothing(steps: str) -> None:
    table = CallTable(8, world_size=1)
    assert table.close_pending() == []
    with pytest.raises(ExecutorClosedError, match="shut down"):
        table.new_call("noop", [0], None, None, None)
    assert table.pending == {} and table.inflight == 0 and table.stats.calls == 0


def test_a_call_waits_for_a_slot_and_a_waiter_gets_the_one_given_back(steps: str) -> None:
    table = CallTable(1, world_size=1)
    first = table.new_call("noop", [0], None, None, None)
    with pytest.raises(InflightLimitError):
        table.new_call("noop", [0], None, 0.05, None)
    assert table.inflight == 1 and list(table.pending) == [first.call_id]
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(table.new_call("noop", [0], None, 5, None)))
    waiter.start()
    while not table.slot_waiters:
        time.sleep(0.001)
    table.answered_all(first, None)  # gives its slot to the waiter
    waiter.join(5)
    assert first.outcome() == [None] and len(got) == 1 and got[0].slot
    assert table.inflight == 1 and list(table.pending) == [got[0].call_id]
    assert table.stats.inflight_waits == 2


def test_the_counters_python_sets_are_the_ones_the_steps_read(steps: str) -> None:
    """The compiled steps keep the table's counters in a C struct that Python reads and
    writes as attributes: a limit lowered from Python binds them, and a counter deleted
    from Python is an AttributeError there too, with nothing entered."""
    table = CallTable(8, world_size=1)
    table.max_inflight = 1
    first = table.new_call("noop", [0], None, None, None)
    assert table.inflight == 1
    with pytest.raises(InflightLimitError):
        table.new_call("noop", [0], None, 0.05, None)
    first.nbytes = 1
    table.answered_all(first, None)
    assert first.outcome() == [None] and table.inflight == 0 and table.pending == {}
    table.inflight = 1  # (as a slot taken by another step)
    with pytest.raises(InflightLimitError):
        table.new_call("noop", [0], None, 0.05, None)
    table.inflight = 0
    del table.inflight
    with pytest.raises(AttributeError, match="inflight"):
        table.new_call("noop", [0], None, None, None)
    assert table.pending == {} and table.stats.calls == 1


def test_answers_that_are_not_one_of_each_rank_are_counted_as_the_walk_counts_them(
        steps: str) -> None:
    table = CallTable(8, world_size=2)
    table.answered_all(table.new_call("pid", [0, 1], None, None, None), {0: 1, 1: 2})
    halfway = table.new_call("pid", [0, 1], None, None, None)
    table.deliver_values(halfway, [0], "a")
    table.answered_all(halfway, {0: "again", 1: "b"})  # rank 0 twice: late, kept
    assert halfway.outcome() == ["a", "b"] and table.stats.late_replies == 1
    table.answered_all(halfway, None)  # after the end: both late
    assert table.stats.late_replies == 3
    other = table.new_call("pid", [0, 1], None, None, None)
    table.answered_all(other, {0: "a", 5: "x"})  # a rank it was not sent to: late
    assert not other.done and other.owed == {1} and table.stats.late_replies == 4
    table.answered_all(other, {1: "b"})
    assert other.outcome() == ["a", "b"]
    assert table.metrics.replies == [3, 3] and table.pending == {} and table.inflight == 0


def test_a_call_ends_with_its_error_while_another_call_is_failing(steps: str) -> None:
    from gpuexec import RemoteError
    from gpuexec.ipc.messages import Failure, Reply

    table = CallTable(8, world_size=2)
    failing = table.new_call("noop", [0, 1], None, None, None)
    table.deliver([Reply(failing.call_id, 0, error=Failure.of(ValueError("rank 0 broke")))])
    assert list(table.failing) == [failing.call_id]
    ok = table.new_call("noop", [0, 1], None, None, None)
    table.answered_all(ok, None)
    assert ok.outcome() == [None, None] and list(table.failing) == [failing.call_id]
    table.answered_all(failing, {1: None})  # the last rank: the call fails
    with pytest.raises(RemoteError, match="rank 0 broke"):
        failing.outcome()
    assert table.failing == {} and table.pending == {} and table.inflight == 0


def test_the_compiled_call_is_the_same_record() -> None:
    steps = compiled_steps() if ringcore.current().NAME == "compiled" else None
    if steps is None:
        pytest.skip("the compiled core does not run in this process")
    made, general = (kind(3, "m", [0, 2], 2, 1.5, None)
                     for kind in (steps.PendingCall, PendingCall))
    names = [n for n in PendingCall.__slots__ if n not in ("started", "deadline")]
    assert [getattr(made, n) for n in names] == [getattr(general, n) for n in names]
    assert made.deadline == made.started + 1.5
    error = KeyError("gone")
    made.error = error
    with pytest.raises(KeyError) as info:
        made.outcome()
    assert info.value is error
    made.error, made.value = None, [1, 2]
    assert made.outcome() == [1, 2]
    del made.event
    with pytest.raises(AttributeError):
        made.event  # reading it raises
    with pytest.raises(TypeError):
        steps.PendingCall(1, "m", [0])

    class Marker:
        pass

    marker = Marker()
    gone = weakref.ref(marker)
    cycle = steps.PendingCall(4, "m", [0], None, None, None)
    cycle.value = [cycle, marker]  # a cycle through the call: the collector frees it
    del cycle, marker
    gc.collect()
    assert gone() is None


def test_the_compiled_calls_containers_are_made_when_read() -> None:
    """A compiled call's ``owed``, ``values`` and ``segments`` exist once read (then the
    same objects on every read, and settable as before); a call ended by the compiled
    step without them owes nothing; the round trip's results in rank order end a call to
    the ranks in order there, and any other call through the general step, by rank."""
    steps = compiled_steps() if ringcore.current().NAME == "compiled" else None
    if steps is None:
        pytest.skip("the compiled core does not run in this process")
    made = steps.PendingCall(3, "m", [0, 2], None, None, None)
    owed = made.owed
    assert owed == {0, 2} and made.owed is owed and made.values is made.values
    made.segments = [5]
    assert made.segments == [5]
    with pytest.raises(AttributeError):
        del made.owed
    table = CallTable(8, world_size=2)
    table.answered_all(table.new_call("m", [0, 1], None, None, None), None)  # (its stats)
    ended = table.new_call("m", [0, 1], None, None, None)
    table.answered_all(ended, ["a", "b"])
    assert ended.outcome() == ["a", "b"] and ended.owed == set() and ended.done
    reversed_ranks = table.new_call("m", [1, 0], None, None, None)
    table.answered_all(reversed_ranks, ["a", "b"])  # values[i]: rank i's
    assert reversed_ranks.outcome() == ["b", "a"] and reversed_ranks.owed == set()
    assert table.pending == {} and table.inflight == 0


def test_a_future_and_a_one_rank_value_are_entered_and_end_by_the_general_steps(
        steps: str) -> None:
    from concurrent.futures import Future

    table = CallTable(8, world_size=2)
    future: Future[Any] = Future()
    deferred = table.new_call("pid", [0, 1], None, None, future)
    one = table.new_call("pid", [0, 1], 1, None, None)
    made_by(steps, deferred)
    assert (deferred.future, one.unique_reply_rank) == (future, 1)
    assert table.n_async == 1 and table.inflight == 2 and table.stats.calls == 2
    table.answered_all(deferred, {0: "a", 1: "b"})
    table.answered_all(one, {0: "a", 1: "b"})
    assert deferred.outcome() == ["a", "b"] and one.outcome() == "b"
    assert list(table.unsettled) == [deferred] and not future.done()
    table.settle()
    assert future.result(0) == ["a", "b"]
    assert table.n_async == 0 and table.inflight == 0 and table.pending == {}


def test_calls_by_name_from_threads_with_futures_in_flight_all_complete(
        ring_core: str) -> None:
    """Blocking calls by name (the compiled core's one-call round trip over shared
    memory) from four threads at once, with futures in flight, values and None results:
    each thread's call either runs its whole round trip or finds a lock taken and goes
    on by the general steps; every call gets its own results, none is lost or late."""
    from workers import EchoWorker

    from gpuexec import Executor

    with Executor(EchoWorker, 2, device="cpu", transport="shm") as ex:
        ex.collective_rpc("whoami")  # (its header is then cached)
        wrong: list[Any] = []

        def caller(k: int) -> None:
            for i in range(150):
                futures = [ex.collective_rpc("noop", non_block=True) for _ in range(i % 3)]
                if ex.collective_rpc("noop") != [None, None]:
                    wrong.append(("noop", k, i))
                if [w["rank"] for w in ex.collective_rpc("whoami")] != [0, 1]:
                    wrong.append(("whoami", k, i))
                if [f.result(60) for f in futures] != [[None, None]] * len(futures):
                    wrong.append(("future", k, i))

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert wrong == []
        stats = ex.stats()
        assert stats.calls == 1 + 4 * (150 * 2 + 150) and stats.late_replies == 0
        assert stats.malformed == 0
        status = ex.status()
        assert [(r.method, r.calls_completed) for r in status] == [(None, 1801)] * 2


@pytest.mark.parametrize("make", [make_lock, threading.Lock], ids=["make_lock", "threading"])
def test_the_tables_lock_behaves_as_threading_lock(make: Any) -> None:
    """The table's and the channel's locks (the compiled steps' where built, which read
    their state with no call) do what threading.Lock does, the same for both."""
    lock = make()
    assert not lock.locked() and lock.acquire() and lock.locked()
    assert lock.acquire(False) is False and lock.acquire(blocking=False) is False
    started = time.monotonic()
    assert lock.acquire(timeout=0.05) is False and time.monotonic() - started >= 0.04
    with pytest.raises(ValueError):
        lock.acquire(False, 1.0)
    with pytest.raises(ValueError):
        lock.acquire(timeout=-2)
    with pytest.raises(ValueError):
        lock.acquire(timeout=float("nan"))
    lock.release()
    assert not lock.locked()
    with pytest.raises(RuntimeError, match="release unlocked lock"):
        lock.release()
    with lock:
        assert lock.locked()
    assert not lock.locked()
    # another thread waits for it, and gets it once given back
    got: list[float] = []
    lock.acquire()
    waiter = threading.Thread(target=lambda: (lock.acquire(timeout=5), got.append(1.0),
                                              lock.release()))
    waiter.start()
    time.sleep(0.05)
    assert got == []
    lock.release()
    waiter.join(5)
    assert got == [1.0] and not lock.locked()
    # a condition over it (the table's ``room``)
    room = threading.Condition(lock)
    with room:
        assert room.wait(0.01) is False and lock.locked()
    assert not lock.locked()


@pytest.mark.parametrize("make", [make_lock, threading.Lock], ids=["make_lock", "threading"])
def test_a_wait_for_the_tables_lock_is_interrupted_by_a_signal(make: Any) -> None:
    """A signal's handler that raises (Ctrl-C's) ends a blocking wait, as it ends one for
    a threading.Lock; a handler that returns lets the wait go on."""

    class Interrupted(Exception):
        pass

    calls: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        calls.append(signum)
        if len(calls) == 2:
            raise Interrupted

    lock = make()
    lock.acquire()
    before = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
        started = time.monotonic()
        with pytest.raises(Interrupted):
            lock.acquire()
        assert calls == [signal.SIGALRM] * 2 and time.monotonic() - started < 5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, before)
    assert lock.locked()  # still the first holder's
    lock.release()
