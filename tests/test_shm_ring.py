"""The shared-memory ring: broadcast, wrap-around, backpressure, overflow, sleeping
readers, concurrency across processes, cleanup of /dev/shm."""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import random
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import forecast_spy

from gpuexec.ipc import futex, ringcore_py
from gpuexec.ipc.shm_ring import TAKEN_MAX, RingReader, RingSpec, RingTimeout, RingWriter

pytestmark = pytest.mark.usefixtures("ring_core")  # every test on both ring cores

SEED = int(os.environ.get("GPUEXEC_TEST_SEED", random.randrange(1 << 30)))


@pytest.mark.parametrize("weak_order", [False, True])  # True: the fences ARM takes
def test_broadcast_wraparound_and_in_place_reads(weak_order: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ringcore_py, "WEAK_ORDER", weak_order)  # the pure-Python core's
    w = RingWriter(3, n_slots=4, slot_size=256)
    readers = [RingReader(w.spec, i) for i in range(3)]
    w.unlink()
    assert not os.path.exists(w.spec.path)  # mappings live on without the name
    for k in range(25):  # six times around the ring
        assert w.write(f"message {k}".encode())
        for r in readers:
            view = r.read(timeout=1)
            assert view is not None and bytes(view) == f"message {k}".encode()
            view.release()
            r.release()
    assert all(not r.poll() for r in readers)
    for r in readers:
        r.close()
    w.close()


def test_oversized_message_is_refused_for_another_path() -> None:
    w = RingWriter(1, n_slots=2, slot_size=128)
    r = RingReader(w.spec, 0)
    assert w.max_message == 112  # 128 less the slot header
    assert not w.write(b"x" * 113)
    assert w.write(b"y" * 112)
    view = r.read(timeout=1)
    assert view is not None and bytes(view) == b"y" * 112
    view.release()
    r.close()
    w.close()


def test_backpressure_from_a_slow_reader() -> None:
    w = RingWriter(2, n_slots=2, slot_size=64)
    fast, slow = RingReader(w.spec, 0), RingReader(w.spec, 1)
    for k in range(2):
        assert w.write(bytes([k]))
    t = time.monotonic()
    with pytest.raises(RingTimeout, match="slow reader"):
        w.write(b"\x02", timeout=0.1)  # both slots still held by the slow reader
    assert 0.08 < time.monotonic() - t < 2
    for r in (fast, slow):
        for _ in range(2):
            assert r.read(timeout=1) is not None
            r.release()
    assert w.write(b"\x02", timeout=1)
    with pytest.raises(RingTimeout, match="gone"):
        w.write(b"\x03", timeout=1)
        w.write(b"\x04", timeout=5, alive=lambda: False)
    for r in (fast, slow):
        r.close()
    w.close()


@pytest.mark.parametrize("n_readers", [1, 70])  # 70: the flags fill more than one line
def test_read_timeout_and_sleeping_reader_is_woken(n_readers: int) -> None:
    w = RingWriter(n_readers, n_slots=4, slot_size=64)
    r = RingReader(w.spec, n_readers - 1, spin=0)  # the last flag, on the last line
    t = time.monotonic()
    assert r.read(timeout=0.1) is None
    assert 0.08 < time.monotonic() - t < 1
    import threading

    got: list[tuple[bytes, float]] = []

    def reader() -> None:
        view = r.read(timeout=5)
        got.append((bytes(view) if view is not None else b"", time.monotonic()))

    th = threading.Thread(target=reader)
    th.start()
    time.sleep(0.2)  # asleep in the futex by now
    sent = time.monotonic()
    w.write(b"wake up")
    th.join(5)
    assert got and got[0][0] == b"wake up"
    assert got[0][1] - sent < 0.04  # woken, not a timed nap (naps are 50 ms)
    r.close()
    w.close()


def test_claim_and_publish_fill_a_slot_in_place() -> None:
    w = RingWriter(1, n_slots=2, slot_size=64)
    r = RingReader(w.spec, 0)
    assert w.claim(49) is None  # over max_message (48): for another path
    slot = w.claim(5)
    assert slot is not None
    slot[:] = b"first"
    with pytest.raises(RuntimeError, match="nothing claimed"):
        w.publish()
        w.publish()
    assert r.try_read() is not None
    r.release()
    abandoned = w.claim(3)  # an exception while filling: never published ...
    assert abandoned is not None and r.try_read() is None
    slot = w.claim(6)  # ... and the next claim takes the same slot again
    assert slot is not None
    with pytest.raises(ValueError, match="released"):
        abandoned[0] = 1  # the stale claim can no longer write into the slot
    slot[:] = b"second"
    w.publish()
    view = r.try_read()
    assert view is not None and bytes(view) == b"second"
    view.release()
    r.release()
    assert r.try_read() is None
    r.close()
    w.close()


def test_wrong_spec_and_index_are_refused() -> None:
    w = RingWriter(2, n_slots=2, slot_size=64)
    with pytest.raises(ValueError, match="out of range"):
        RingReader(w.spec, 2)
    bad = RingSpec(w.spec.path, 4, 64, 2)
    with pytest.raises(ValueError, match="is not the ring"):
        RingReader(bad, 0)
    w.close()
    with pytest.raises(FileNotFoundError):
        RingReader(w.spec, 0)


def _consume(spec: RingSpec, index: int, count: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    r = RingReader(spec, index, spin=20e-6)
    total = 0
    rng = random.Random(index)
    for k in range(count):
        view = r.read(timeout=10)
        assert view is not None
        data = bytes(view)
        view.release()
        assert data[:4] == k.to_bytes(4, "little"), (k, data[:4])
        assert data[4:] == bytes([k % 251]) * (len(data) - 4)
        total += len(data)
        if rng.random() < 0.05:
            time.sleep(0.001)  # now and then a slow reader
        r.release()
    r.close()
    out.put((index, total))


def test_many_readers_in_other_processes_see_every_message_in_order() -> None:
    print(f"seed {SEED}")
    rng = random.Random(SEED)
    n_readers, count = 3, 2000
    w = RingWriter(n_readers, n_slots=4, slot_size=4096)
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_consume, args=(w.spec, i, count, out))
             for i in range(n_readers)]
    for p in procs:
        p.start()
    expected = 0
    for k in range(count):
        size = rng.randrange(0, 4000)
        msg = k.to_bytes(4, "little") + bytes([k % 251]) * size
        assert w.write(msg, timeout=20)
        expected += len(msg)
    totals = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    assert totals == {i: expected for i in range(n_readers)}
    w.close()
    assert not os.path.exists(w.spec.path)


def test_futex_is_available_on_linux_x86_and_arm() -> None:
    import platform
    import sys

    if sys.platform.startswith("linux") and platform.machine() in ("x86_64", "aarch64"):
        assert futex.available()


def test_packets_single_frame_fast_path_and_general_walk_agree() -> None:
    from gpuexec.ipc import packets

    w = RingWriter(1, n_slots=4, slot_size=256)
    r = RingReader(w.spec, 0)
    cases: list[tuple[list[bytes], list[int] | None]] = [
        ([b"one frame"], None), ([b""], None), ([b"head", b"buffer"], None), ([b"x"], [0])]
    for frames, targets in cases:
        assert packets.put(w, frames, targets)
        view = r.try_read()
        assert view is not None
        kind, walked = packets.unpack(view)
        assert kind == packets.INLINE and [bytes(f) for f in walked] == frames
        fast = packets.single_frame(view)
        if len(frames) == 1 and targets is None:
            assert fast is not None and bytes(fast) == frames[0]
        else:
            assert fast is None  # several frames or a target mask: the general walk
        del walked, fast
        view.release()
        r.release()
    packet = packets.measure([b"abc"], None)[0] + b"abc"
    assert packets.single_frame(memoryview(packet)) is not None
    bad = bytearray(packet)
    bad[5] += 1  # the declared length no longer matches the slot: truncated
    with pytest.raises(ValueError, match="truncated"):
        packets.single_frame(memoryview(bytes(bad)))
    r.close()
    w.close()


@pytest.fixture
def reader_core(ring_core: str) -> Iterator[Callable[[str], None]]:
    """Choose the core later rings are read with (a ring's reader binds the core current
    when it is made): the writer on ``ring_core``, each reader on either."""
    from gpuexec.ipc import ringcore

    yield ringcore.select
    ringcore.select(ring_core)


def test_put_one_writes_the_packet_put_would(reader_core: Callable[[str], None]) -> None:
    """The hot path's one-call send: the slot holds what the general path writes, read
    back by either core; a message over a slot is refused for another path."""
    from gpuexec.ipc import packets

    w = RingWriter(1, n_slots=4, slot_size=128)
    for core in ("compiled", "python"):
        reader_core(core)
        r = RingReader(w.spec, 0)
        for frame in (b"abc", b"", b"x" * 40):  # wraps around the four slots
            assert w.put_one(frame)
            view = r.try_read()
            assert view is not None
            assert view.tobytes() == packets.measure([frame], None)[0] + frame
            view.release()
            r.release()
        assert not w.put_one(b"y" * 120)  # over a slot: for another path, nothing sent
        assert not r.poll()
        r.close()
    w.close()


def test_collect_takes_the_awaited_replies_by_their_bytes_then_short_frames(
        reader_core: Callable[[str], None]) -> None:
    """The driver's wait for a call's replies in one core call: each wanted ring's reply
    that is exactly the expected bytes is released as it comes; it returns when every
    wanted ring gave that or holds another message (once its spin is over, when any
    holds another message), at its deadline, when the doorbell is poked, and when a
    publish rings the doorbell it sleeps on. Then every other
    message of one frame up to ``max_len`` is copied out and released (in ring order);
    anything else (several frames, a longer frame) is left in place and reported;
    unwanted rings are not touched."""
    import threading

    from gpuexec.ipc import packets, ringcore
    from gpuexec.ipc.doorbell import Doorbell

    for core in ("compiled", "python"):
        reader_core("python" if core == "compiled" else "compiled")  # writers: the other
        bell = Doorbell.create()
        writers = [RingWriter(1, n_slots=4, slot_size=128) for _ in range(3)]
        reader_core(core)
        readers = [RingReader(w.spec, 0) for w in writers]
        for w in writers:
            w.ring_on_publish(bell.view, bell.base)
        befores, afters = (b"<0|", b"<1|", b"<2|"), (b"|0>", b"|1>", b"|2>")
        collect = functools.partial(
            ringcore.current().collect, tuple(r.address[0] for r in readers),
            tuple(r.address[1] for r in readers), bell.view, bell.base, *readers[0].shape,
            32, befores, afters)

        def now_collect(want: int, middle: bytes = b"17") -> tuple[object, ...]:
            got = collect(bell.epoch(), 0.0, time.monotonic() + 0.05, middle, want)
            return (*got[:3], list(got[3]))

        assert now_collect(0b111) == (0, 0, 0, [])  # nothing came: the deadline
        assert writers[0].put_one(b"<0|17|0>")
        assert writers[1].put_one(b"<1|17|1>")
        assert writers[2].put_one(b"<2|17|2> and more")  # a value, not the None reply
        assert now_collect(0b001) == (0b001, 0, 0, [])  # only ring 0 wanted: 1 untouched
        readers[0].catch_up()
        assert not readers[0].poll() and readers[1].poll()
        assert now_collect(0b110) == (0b010, 0b100, 0, [b"<2|17|2> and more"])
        readers[1].catch_up()
        readers[2].catch_up()
        assert not readers[1].poll() and not readers[2].poll()
        assert writers[0].put_one(b"<0|18|0>")  # another call's reply: a frame
        assert packets.put(writers[1], [b"<1|", b"17|1>"], None)  # two frames: left
        assert writers[2].put_one(b"x" * 33)  # longer than max_len: left
        assert now_collect(0b111) == (0, 0b001, 0b110, [b"<0|18|0>"])
        readers[0].catch_up()
        view = readers[1].try_read()
        assert view is not None
        view.release()
        readers[1].release()
        assert readers[2].take_frame() == b"x" * 33  # left in place, whole
        epoch = bell.epoch()
        bell.poke()  # a death or a close: the wait ends at once, nothing taken
        assert collect(epoch, 0.0, time.monotonic() + 60, b"17", 0b001)[:3] == (0, 0, 0)

        def reply_later() -> None:
            time.sleep(0.2)  # the collect below is asleep on the doorbell by then
            writers[2].put_one(b"<2|19|2>")

        th = threading.Thread(target=reply_later)
        th.start()
        started = time.monotonic()
        assert collect(bell.epoch(), 0.0, started + 60, b"19", 0b100)[:3] == (0b100, 0, 0)
        assert time.monotonic() - started < 30  # woken by the publish, not the deadline
        th.join()
        readers[2].catch_up()
        # Once its spin is over, another message in any wanted ring ends the wait: a
        # failure must reach the driver while the other ranks still run the call.
        assert writers[0].put_one(b"<0|20|0> failed")
        started = time.monotonic()
        got = collect(bell.epoch(), started + 0.2, started + 60, b"20", 0b011)
        assert (*got[:3], list(got[3])) == (0, 0b001, 0, [b"<0|20|0> failed"])
        assert 0.2 <= time.monotonic() - started < 30  # after its spin, not its deadline
        readers[0].catch_up()
        with pytest.raises(ValueError, match="a part for each"):
            now_collect(0b1000)  # a ring it was not given
        for r in readers:
            assert not r.poll()
            r.close()
        for w in writers:
            w.close()
        bell.unlink()
        bell.close()


def test_read_frame_copies_out_a_one_frame_packet_and_hands_any_other_as_a_view(
        reader_core: Callable[[str], None]) -> None:
    """A worker's read of the next request: a packet of one frame for every reader comes
    out as bytes with its slot released (each reader its own, on either core), anything
    else as the held view :meth:`read` gives, one whose lengths disagree too (the general
    path drops it)."""
    import struct

    from gpuexec.ipc import packets

    w = RingWriter(2, n_slots=4, slot_size=128)
    readers = []
    for core in ("compiled", "python"):
        reader_core(core)
        readers.append(RingReader(w.spec, len(readers)))
    assert readers[0].read_frame(0) is None  # nothing yet: the timeout passes
    for frame in (b"abc", b"", b"z" * 103):  # 103: the largest a slot holds
        assert w.put_one(frame)
        assert [r.read_frame() for r in readers] == [frame, frame]
    assert packets.put(w, [b"a", b"b"], None)  # two frames: the packet, held
    assert packets.put(w, [b"c"], [1])         # for rank 1 only: the packet, held
    # one frame for everyone, its length field saying more than the slot holds
    assert w.write(struct.pack("<BHHI", packets.INLINE, 0, 1, 50) + b"abc")
    big = RingWriter(1, n_slots=2, slot_size=TAKEN_MAX + 64)
    big_reader = RingReader(big.spec, 0)
    for n in (TAKEN_MAX, TAKEN_MAX + 1):  # copied out up to TAKEN_MAX, else read in place
        assert big.put_one(b"q" * n)
        got = big_reader.read_frame()
        if n <= TAKEN_MAX:
            assert got == b"q" * n
        else:
            assert isinstance(got, memoryview)
            frame = packets.single_frame(got)
            assert frame is not None and frame.nbytes == n
            del frame
            got.release()
            big_reader.release()
    big_reader.close()
    big.close()
    for r in readers:
        for frames in ([b"a", b"b"], [b"c"], None):
            got = r.read_frame()
            assert isinstance(got, memoryview)
            if frames is None:
                with pytest.raises(ValueError, match="truncated"):
                    packets.single_frame(got)
            else:
                assert [bytes(f) for f in packets.unpack(got)[1]] == frames
            got.release()
            r.release()
        r.close()
    w.close()


def test_doorbell_wakes_a_sleeping_waiter_and_costs_nothing_without_one() -> None:
    import threading

    from gpuexec.ipc.doorbell import Doorbell

    bell = Doorbell.create()
    other = Doorbell(bell.path)  # a worker's view of the same doorbell
    for _ in range(1000):
        other.ring()  # nobody waits: nothing to wake (the waiter below still is woken)
    published = threading.Event()
    woke: list[float] = []

    def waiter() -> None:
        bell.wait(published.is_set, 5.0)
        woke.append(time.monotonic())

    th = threading.Thread(target=waiter)
    th.start()
    time.sleep(0.2)  # asleep on the futex by now
    sent = time.monotonic()
    published.set()  # what the waiter waits for, then the ring (as a worker does)
    other.ring()
    th.join(5)
    assert woke and woke[0] - sent < 0.5  # woken, not the 5 s timeout
    other.close()
    bell.unlink()
    bell.close()


def test_a_reply_ring_publish_rings_the_doorbell_only_for_a_sleeper(ring_core: str) -> None:
    """A worker's reply ring rings the driver's doorbell in the publish itself (one
    fence): the counter moves only when the waiter sleeps, and the sleeper wakes."""
    import struct
    import threading

    from gpuexec.ipc.doorbell import Doorbell

    bell = Doorbell.create()
    w = RingWriter(1, n_slots=4, slot_size=64)
    r = RingReader(w.spec, 0)
    w.ring_on_publish(bell.view, bell.base)
    before = bell.epoch()
    for _ in range(3):  # nobody sleeps on the doorbell: it is not touched
        assert w.write(b"x")
        assert r.read(0) is not None
        r.release()
    assert bell.epoch() == before
    woke = threading.Event()

    def waiter() -> None:
        if bell.wait(r.poll, 60.0):
            woke.set()

    th = threading.Thread(target=waiter)
    th.start()
    while not struct.unpack_from("<I", bell.view, ringcore_py.BELL_SLEEPING)[0]:
        time.sleep(0.001)  # until the waiter has announced its sleep
    assert w.write(b"reply")
    th.join(60)
    assert woke.is_set() and bell.epoch() == before + 1  # rung once, by the publish
    r.close()
    w.close()
    bell.unlink()
    bell.close()


class _Interrupted(Exception):
    pass


def test_a_signal_handler_runs_while_a_reader_waits() -> None:
    """The core gives the GIL back while it waits and takes it to run signal handlers: a
    handler's exception ends the wait at once (Ctrl-C in a waiting caller)."""
    import signal

    w = RingWriter(1, n_slots=2, slot_size=64)
    r = RingReader(w.spec, 0, spin=0.001)

    def handler(signum: int, frame: object) -> None:
        raise _Interrupted

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(_Interrupted):
            r.read(timeout=5)  # asleep on the futex; None after 5 s if never interrupted
        assert w.write(b"after")  # the ring is still usable
        view = r.read(timeout=1)
        assert view is not None and bytes(view) == b"after"
        view.release()
        r.release()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        r.close()
        w.close()


def test_fork_while_another_thread_waits_in_the_core() -> None:
    """No lock and no thread of the core crosses a fork: a child forked while another
    thread sleeps in a read (GIL released) builds and uses rings of its own."""
    import threading

    w = RingWriter(1, n_slots=2, slot_size=64)
    r = RingReader(w.spec, 0, spin=0.001)
    got: list[bytes] = []

    def waiter() -> None:
        view = r.read(timeout=10)
        if view is not None:
            got.append(bytes(view))
            view.release()
            r.release()

    th = threading.Thread(target=waiter)
    th.start()
    time.sleep(0.1)  # the waiter is in the core's futex wait now
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's exit status is the check
        code = 1
        try:
            cw = RingWriter(1, n_slots=2, slot_size=64)
            cr = RingReader(cw.spec, 0, spin=0.001)
            cw.write(b"child")
            view = cr.read(timeout=5)
            code = 0 if view is not None and bytes(view) == b"child" else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    w.write(b"parent")
    th.join(10)
    assert os.waitstatus_to_exitcode(status) == 0
    assert got == [b"parent"]
    r.close()
    w.close()


def test_serve_answers_the_calls_it_can_and_leaves_the_rest(
        reader_core: Callable[[str], None]) -> None:
    """A worker's wait that answers calls in the core (either one, against a driver's
    rings on the other). Without a decoder: each known bare call's method runs armed for
    cancellation, its None reply is the encoder's bytes (every length of id); what it
    cannot answer comes back as the loop must see it: an unknown, hidden or
    queued-after-a-cancel call as its frame, untaken; a raise, a value that is not plain
    data, a closed gate, a full reply ring or a reply over the size limit as a Ran;
    another kind of message as a held view. With one: a call by name with arguments runs
    with them, armed, its None or plain value answered as the encoder writes it; what it
    cannot send as a Ran (with the reply's frame when only the ring's room or a slot's
    size stopped it); what it must not run (a bare call of a new name, a dunder, a
    call for one rank's value, a hidden name, a call queued after a cancel) as the
    decoded message; a frame the decoder refuses as its bytes. The forecast learns every
    answered call in order, and the rings' positions are taken up."""
    import types
    from functools import partial

    from gpuexec.ipc import packets
    from gpuexec.ipc.codec import Decoder, Encoder, around_id, none_reply_parts
    from gpuexec.ipc.doorbell import Doorbell
    from gpuexec.ipc.messages import Call, ToWorker
    from gpuexec.ipc.shm_ring import Ran

    enc = Encoder(allow_pickle=False)
    dec = Decoder(ToWorker, allow_pickle=False, copy_buffers=True)
    cancel = types.SimpleNamespace(running=0, method="", armed=False, recheck=0)
    gate = types.SimpleNamespace(closed=False, shared=False)
    armed: list[tuple[int, str, bool]] = []

    class Target:
        hidden = 3

        def noop(self) -> None:
            armed.append((cancel.running, cancel.method, cancel.armed))

        def value(self) -> tuple[int]:
            return (5,)  # not plain msgpack data: the encoder's walk (the loop's) sends it

        def boom(self) -> None:
            raise ValueError("boom")

        def echo(self, *args: object, **kwargs: object) -> object:
            armed.append((cancel.running, cancel.method, cancel.armed))
            return args[0] if args else None

    calls = {around_id(lambda i, n=name: Call(i, n, None, [], {}))[1]: name
             for name in ("noop", "value", "boom", "hidden", "absent")}
    before = around_id(lambda i: Call(i, "noop", None, [], {}))[0]
    for core in ("compiled", "python"):
        reader_core("python" if core == "compiled" else "compiled")  # the driver's
        bell = Doorbell.create()
        requests = RingWriter(1, n_slots=8, slot_size=256)
        replies = RingWriter(1, n_slots=4, slot_size=64)
        replies.ring_on_publish(bell.view, bell.base)
        from_worker = RingReader(replies.spec, 0)
        reader_core(core)
        forecast = forecast_spy()
        reader = RingReader(requests.spec, 0, spin=0.01, forecast=forecast)

        def serve(max_reply: int = -1, decode: bool = False) -> object:
            reader.answer_in_core(replies, before, calls, none_reply_parts(2), max_reply,
                                  Target(), cancel, gate,
                                  dec.decode_header if decode else None,
                                  Call, partial(enc.value_reply, 2))
            return reader.serve()

        ids = [1, 300, 70000, 2**33, 6]  # every form of msgpack int; the 5th: no room
        for call_id in ids:
            assert requests.put_one(enc.bare_call(call_id, "noop"))
        assert serve() == Ran(6, "noop", None, None)  # four answered, then the ring full
        assert armed == [(i, "noop", True) for i in ids]
        assert (cancel.running, cancel.armed) == (6, False)
        assert [from_worker.read_frame() for _ in range(4)] == \
            [enc.none_reply(i, 2) for i in ids[:4]]
        assert [k for k, _ in forecast.seen] == ["arrived", "answered"] * 4
        assert replies.put_one(b"after")  # the writer took up the core's position
        assert from_worker.read_frame() == b"after"
        assert requests.put_one(enc.bare_call(7, "noop"))
        assert serve() is None  # answered; nothing more came within the spin
        assert from_worker.read_frame() == enc.none_reply(7, 2)
        for name in ("other", "hidden", "absent"):  # unknown, not callable, not there
            assert requests.put_one(enc.bare_call(8, name))
            assert serve() == enc.bare_call(8, name)
        cancel.recheck = 1  # a cancel came: the loop looks at the board first
        assert requests.put_one(enc.bare_call(9, "noop"))
        assert serve() == enc.bare_call(9, "noop")
        cancel.recheck = 0
        assert requests.put_one(enc.bare_call(10, "value"))
        assert serve() == Ran(10, "value", (5,), None)
        assert requests.put_one(enc.bare_call(11, "boom"))
        ran = serve()
        assert isinstance(ran, Ran) and isinstance(ran.error, ValueError)
        assert ran.error.__traceback__ is not None and ran.value is None
        gate.closed = True
        assert requests.put_one(enc.bare_call(12, "noop"))
        assert serve() == Ran(12, "noop", None, None)
        gate.closed = False
        assert requests.put_one(enc.bare_call(13, "noop"))
        assert serve(max_reply=4) == Ran(13, "noop", None, None)
        assert packets.put(requests, [enc.bare_call(14, "noop"), b"x"], None)
        view = serve()
        assert isinstance(view, memoryview)  # two frames: read in place
        view.release()
        reader.release()
        assert not from_worker.poll() and not reader.poll()
        armed.clear()

        def call(call_id: int, name: str, *args: object, value_rank: int = -1,
                 **kwargs: object) -> bytes:
            frame = enc.encode(Call(call_id, name, None, list(args), kwargs, value_rank))[0]
            assert requests.put_one(frame)
            return frame

        call(20, "echo", None, k=1)
        call(21, "echo", 5)
        assert serve(decode=True) is None  # both answered here
        assert armed == [(20, "echo", True), (21, "echo", True)]
        assert [from_worker.read_frame() for _ in range(2)] == \
            [enc.none_reply(20, 2), enc.value_reply(2, 21, 5)]
        call(22, "echo", (1, 2))  # a tuple needs the encoder's walk: the loop sends it
        assert serve(decode=True) == Ran(22, "echo", (1, 2), None)
        call(23, "boom", 1)
        ran = serve(decode=True)
        assert isinstance(ran, Ran) and isinstance(ran.error, TypeError)
        gate.closed = True
        call(24, "echo", 1)
        assert serve(decode=True) == Ran(24, "echo", 1, None)
        gate.closed = False
        call(25, "echo", 1)
        assert serve(max_reply=4, decode=True) == Ran(25, "echo", 1, None)
        assert requests.put_one(enc.bare_call(26, "fresh"))
        assert serve(decode=True) == Call(26, "fresh", None, [], {})  # the loop learns it
        for frame in (call(27, "__init__", 1), call(28, "echo", 1, value_rank=0),
                      call(29, "hidden", 1), call(30, "absent", 1)):
            assert serve(decode=True) == dec.decode_header(frame)
        cancel.recheck = 1
        frame = call(31, "echo", 1)
        assert serve(decode=True) == dec.decode_header(frame)
        cancel.recheck = 0
        assert requests.put_one(b"\xc1")  # msgpack's never-used byte: not decoded
        assert serve(decode=True) == b"\xc1"
        big = "x" * 100  # its reply is longer than a reply slot: handed back made
        call(32, "echo", big)
        assert serve(decode=True) == Ran(32, "echo", big, None, enc.value_reply(2, 32, big))
        for call_id in range(33, 38):  # four fill the reply ring, the fifth finds no room
            call(call_id, "echo", call_id)
        assert serve(decode=True) == Ran(37, "echo", 37, None, enc.value_reply(2, 37, 37))
        assert [from_worker.read_frame() for _ in range(4)] == \
            [enc.value_reply(2, i, i) for i in range(33, 37)]
        assert [a[0] for a in armed] == [20, 21, 22, 24, 25, *range(32, 38)]  # all run
        assert not from_worker.poll() and not reader.poll()
        armed.clear()
        for r in (reader, from_worker):
            r.close()
        for w in (requests, replies):
            w.close()
        bell.unlink()
        bell.close()
