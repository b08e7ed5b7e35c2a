"""The arrival forecast that lets a worker sleep through regular gaps and spin across
the expected arrival (gpuexec.ipc.forecast), and a ring reader using it."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import forecast_spy

from gpuexec.ipc.forecast import MAX_DUTY, MIN_MARGIN, ArrivalForecast
from gpuexec.ipc.shm_ring import RingReader, RingWriter


def feed(f: ArrivalForecast, gaps: list[float], start: float = 100.0) -> float:
    t = start
    f.observe(t)
    for g in gaps:
        t += g
        f.observe(t)
    return t


def test_no_forecast_without_history() -> None:
    f = ArrivalForecast()
    assert f.window() is None
    f.observe(1.0)
    assert f.window() is None  # one arrival says nothing about the gap


def test_regular_stream_is_forecast_around_the_expected_arrival() -> None:
    f = ArrivalForecast()
    last = feed(f, [5e-3] * 20)
    window = f.window()
    assert window is not None
    wake_at, spin_until = window
    assert wake_at < last + 5e-3 < spin_until
    assert last + 5e-3 - wake_at >= MIN_MARGIN * 0.99
    assert spin_until - wake_at <= 2 * MAX_DUTY * 5e-3 + 1e-9  # the spin budget holds


def test_oversleep_moves_the_wake_up_earlier() -> None:
    f = ArrivalForecast()
    feed(f, [5e-3] * 20)
    before = f.window()
    for _ in range(30):
        f.woke(1.0, 1.0 + 40e-6)
    after = f.window()
    assert before is not None and after is not None
    assert after[0] < before[0] - 30e-6
    assert after[1] == before[1]


def test_a_few_late_wake_ups_still_move_the_wake_up_earlier() -> None:
    # Every worker of a call must be awake in time: the lead covers all but the latest
    # wake-up of the history, not just 90% of them.
    f = ArrivalForecast()
    feed(f, [5e-3] * 20)
    for late in [40e-6] * 29 + [150e-6] * 3:
        f.woke(1.0, 1.0 + late)
    window = f.window()
    on_time = ArrivalForecast()
    feed(on_time, [5e-3] * 20)
    for _ in range(32):
        on_time.woke(1.0, 1.0 + 40e-6)
    usual = on_time.window()
    assert window is not None and usual is not None
    assert window[0] <= usual[0] - 100e-6  # 150 us early, not 40


def test_a_driver_that_waits_after_each_reply_is_forecast_from_the_reply() -> None:
    # The driver sleeps 5 ms after each call returns; calls take 50 or 450 us, so the
    # gaps between requests spread over 400 us (beyond the spin budget) while the time
    # from each reply to the next request stays 5 ms.
    f = ArrivalForecast()
    t = 100.0
    for i in range(20):
        f.observe(t)
        replied = t + (50e-6 if i % 2 else 450e-6)
        f.replied(replied)
        t = replied + 5e-3
    window = f.window()
    assert window is not None
    assert window[0] < replied + 5e-3 < window[1]
    assert window[1] - window[0] <= 2 * MAX_DUTY * 5e-3 + 1e-9
    only_requests = ArrivalForecast()  # the same arrivals, replies not reported
    t = 100.0
    for i in range(20):
        only_requests.observe(t)
        t += (50e-6 if i % 2 else 450e-6) + 5e-3
    assert only_requests.window() is None


def test_irregular_or_sparse_streams_are_not_forecast() -> None:
    irregular = ArrivalForecast()
    feed(irregular, [1e-3, 9e-3] * 20)
    assert irregular.window() is None  # jitter too large for the spin budget
    few = ArrivalForecast()
    feed(few, [5e-3] * 2)
    assert few.window() is None  # not enough history
    tight = ArrivalForecast()
    feed(tight, [100e-6] * 20)
    assert tight.window() is None  # back to back: the plain spin after a message covers it
    idle = ArrivalForecast()
    feed(idle, [5.0] * 5)
    assert idle.window() is None
    backwards = ArrivalForecast()
    feed(backwards, [5e-3] * 4 + [-1.0] + [5e-3] * 4)
    assert backwards.window() is not None  # a clock oddity is ignored, not learned


def test_outliers_do_not_spoil_a_regular_stream() -> None:
    f = ArrivalForecast()
    feed(f, ([5e-3] * 7 + [40e-3]) * 4 + [5e-3])  # one call in eight is late
    window = f.window()
    assert window is not None and window[1] - window[0] < 1e-3


@pytest.mark.usefixtures("ring_core")
def test_reader_with_forecast_gets_every_message_of_a_periodic_stream() -> None:
    w = RingWriter(1, n_slots=4, slot_size=256)
    f = ArrivalForecast()
    r = RingReader(w.spec, 0, spin=50e-6, forecast=f)
    got: list[bytes] = []

    def read() -> None:
        for _ in range(40):
            view = r.read(timeout=5)
            assert view is not None
            got.append(bytes(view))
            view.release()
            r.release()

    t = threading.Thread(target=read)
    t.start()
    sent = []
    for i in range(40):
        time.sleep(2e-3 if i % 7 else 6e-3)  # mostly regular, with outliers
        sent.append(b"m%d" % i)
        assert w.write(sent[-1], timeout=5)
    t.join(10)
    assert not t.is_alive()
    assert got == sent
    r.close()
    w.close()


def test_timer_slack_is_set_for_the_calling_thread() -> None:
    import os
    import subprocess
    import sys

    from gpuexec.ipc import futex

    if not futex.available():  # pragma: no cover - Linux x86_64/aarch64 only
        pytest.skip("no futex/prctl here")
    code = ("from gpuexec.ipc import futex; assert futex.set_timer_slack(1000); "
            "print(open('/proc/self/timerslack_ns').read().strip())")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env)
    assert out.stdout.strip() == "1000"


def test_the_early_wake_up_is_cut_to_the_spin_budget() -> None:
    from gpuexec.ipc.forecast import SPIN_BUDGET

    f = ArrivalForecast()
    last = feed(f, [5e-3] * 20)
    for _ in range(32):
        f.woke(1.0, 1.0 + 2e-3)  # a host that oversleeps by 2 ms: not worth following
    window = f.window()
    assert window is not None
    assert last + 5e-3 - window[0] <= SPIN_BUDGET * 5e-3 + 1e-9  # spin within budget


def test_read_frame_teaches_the_forecast_after_the_answer_or_at_the_next_read() -> None:
    """A request read_frame takes in one core call (no window to sleep through) is
    learned once it is answered (off the request's path) or, unanswered, before the next
    read waits: every arrival once, in order, each answer after its arrival; a periodic
    stream is then forecast."""

    w = RingWriter(1, n_slots=4, slot_size=256)
    f = forecast_spy()
    r = RingReader(w.spec, 0, spin=50e-6, forecast=f)
    for i in range(8):
        time.sleep(2e-3)
        assert w.put_one(b"m%d" % i)
        assert r.read_frame(timeout=5) == b"m%d" % i
        if i < 4:  # no window yet (too few gaps): the fast path, learned after the answer
            assert [k for k, _ in f.seen].count("arrived") == i
        if i % 2:
            r.answered(time.monotonic())
            assert [k for k, _ in f.seen][-2:] == ["arrived", "answered"]
    assert r.read_frame(timeout=0) is None  # nothing waiting: the last arrival is learned
    kinds = [k for k, _ in f.seen]
    assert kinds.count("arrived") == 8 and kinds.count("answered") == 4
    arrivals = [t for k, t in f.seen if k == "arrived"]
    assert arrivals == sorted(arrivals) and len(set(arrivals)) == 8
    assert f.regular  # gaps of 2 ms or more, learned: a stream the forecast may time
    r.close()
    w.close()
