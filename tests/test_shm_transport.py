"""The executor over shared-memory rings (transport="shm"): failures wake sleeping
waiters, no segment outlives the processes that use it (even a driver killed during
start-up), the fallback to ZeroMQ."""

from __future__ import annotations

import os
import signal
import threading
import time

import msgspec
import pytest
from workers import EchoWorker

from gpuexec import ConfigError, Executor, ExecutorClosedError, WorkerDiedError

pytestmark = pytest.mark.usefixtures("ring_core")  # every test on both ring cores


def _ours() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith("gpuexec-")}


_SEGMENTS = ("memfd:gpuexec-ring", "memfd:gpuexec-bell")


def _holds_segment(pid: int | str) -> bool:
    """Whether process ``pid`` maps a ring or doorbell segment or holds its descriptor."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            if any(s in line for line in f for s in _SEGMENTS):
                return True
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(_SEGMENTS):
                return True
    except OSError:  # gone, or not ours to read
        pass
    return False


def _tree(pid: int) -> set[int]:
    """``pid`` and its live descendants: the processes a test made (a leak check that
    counted every process on the host would blame other test runs' executors)."""
    import psutil

    try:
        return {pid} | {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return {pid}


def test_segments_are_never_named_and_die_with_their_users() -> None:
    before = _ours()
    with Executor(EchoWorker, 2, device="cpu", transport="shm") as ex:
        assert ex.transport == "shm"
        assert _ours() == before  # nothing named in /dev/shm, ever
        assert ex.collective_rpc("add", args=(1,)) == [1, 2]
        # Every worker maps them; the driver gave up its descriptors once all had.
        assert all(_holds_segment(w.pid) for w in ex.workers)
        made = set().union(*(_tree(w.pid) for w in ex.workers))
        assert not any(os.readlink(f"/proc/self/fd/{fd}").startswith(_SEGMENTS)
                       for fd in os.listdir("/proc/self/fd")
                       if os.path.exists(f"/proc/self/fd/{fd}"))
    assert [p for p in made if _holds_segment(p)] == []
    assert _ours() == before


KILLED_IN_START_UP = """
import os, sys
from gpuexec import Executor
from workers import SlowInit
Executor(SlowInit, 2, device="cpu", transport="shm", worker_args=(60,))
"""


def test_driver_killed_during_start_up_leaves_no_segment() -> None:
    import subprocess
    import sys

    import psutil
    from conftest import subprocess_env, wait_gone

    named_before = _ours()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_IN_START_UP], env=subprocess_env())
    try:
        deadline = time.monotonic() + 60
        workers: list[int] = []
        while len(workers) < 2 and time.monotonic() < deadline:  # both inside __init__
            workers = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)
                       if _holds_segment(c.pid)]
            time.sleep(0.05)
        assert len(workers) == 2, "the workers never mapped the rings"
        assert _holds_segment(proc.pid)  # the driver still holds the paths
        made = _tree(proc.pid) - {proc.pid}
        proc.kill()
        proc.wait(10)
        assert wait_gone(workers, timeout=10) == []  # their watchdog saw the driver go
        assert [p for p in made if _holds_segment(p)] == []
        assert _ours() == named_before
    finally:
        if proc.poll() is None:
            proc.kill()


def test_worker_death_wakes_a_caller_asleep_on_the_doorbell() -> None:
    with Executor(EchoWorker, 2, device="cpu", transport="shm") as ex:
        victim = ex.workers[1].pid
        threading.Timer(0.3, os.kill, (victim, signal.SIGKILL)).start()
        t = time.monotonic()
        with pytest.raises(WorkerDiedError) as info:
            ex.collective_rpc("sleep", args=(30,))
        assert time.monotonic() - t < 2.0
        assert info.value.signal_name == "SIGKILL"


def test_shutdown_from_another_thread_wakes_the_caller() -> None:
    ex = Executor(EchoWorker, 2, device="cpu", transport="shm", shutdown_timeout=0.2)
    threading.Timer(0.3, ex.shutdown).start()
    t = time.monotonic()
    with pytest.raises(ExecutorClosedError):
        ex.collective_rpc("sleep", args=(30,))
    assert time.monotonic() - t < 3.0


def test_large_messages_overflow_to_zeromq_in_order() -> None:
    import numpy as np

    with Executor(EchoWorker, 2, device="cpu", transport="shm") as ex:
        big = np.arange(600_000, dtype=np.float64)  # 4.6 MiB: more than a slot
        futs = [ex.collective_rpc(lambda w, a, i: (i, float(a.sum())), args=(big if i % 2
                                  else big[:10], i), non_block=True) for i in range(10)]
        got = [f.result(timeout=30) for f in futs]
        assert [g[0][0] for g in got] == list(range(10))
        assert got[1][0][1] == float(big.sum()) and got[0][0][1] == float(big[:10].sum())


def _big_after(worker: EchoWorker, seconds: float) -> tuple[int, bytes]:
    time.sleep(seconds)
    return worker.rank, bytes([worker.rank]) * (3 << 20)


def test_a_large_reply_announced_in_a_ring_the_call_does_not_await_is_still_read() -> None:
    """Large replies travel by the one reply socket and are announced by a marker in
    their rank's ring; a marker takes whichever message comes next on the socket. Here
    rank 1's reply to an earlier call comes first, taken at rank 0's marker while the
    caller awaits rank 0 only: rank 0's reply is then announced by rank 1's marker, in a
    ring the call does not await, and must be read all the same (not a hang)."""
    with Executor(EchoWorker, 2, device="cpu", transport="shm") as ex:
        for _ in range(3):
            early = ex.collective_rpc(_big_after, args=(0.2,), ranks=[1], non_block=True)
            assert ex.collective_rpc(_big_after, args=(0.6,), ranks=[0], timeout=20) == \
                [(0, b"\0" * (3 << 20))]
            assert early.result(timeout=20) == [(1, b"\1" * (3 << 20))]


def test_a_worker_dying_while_its_large_reply_is_on_zeromq_fails_the_calls(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The reply announced in the ring never comes whole (the worker exits while ZeroMQ
    is still sending 64 MiB): the waiting thread (here the monitor, pumping for futures)
    stops waiting at the death, and every call ends with WorkerDiedError instead of the
    monitor dying on a ZeroMQ timeout and the futures waiting forever."""
    crashed: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", crashed.append)
    with Executor(EchoWorker, 2, device="cpu", transport="shm", rpc_timeout=120) as ex:
        big = ex.collective_rpc(lambda w: b"x" * (64 << 20), ranks=[0], non_block=True)
        die = ex.collective_rpc(lambda w: os._exit(3), ranks=[0], non_block=True)
        with pytest.raises(WorkerDiedError) as info:
            die.result(timeout=60)
        assert info.value.rank == 0 and info.value.exitcode == 3
        try:  # the reply may have arrived whole before the exit: then it is a result
            assert big.result(timeout=60) == [b"x" * (64 << 20)]
        except WorkerDiedError:
            assert ex.stats().malformed_by_reason.get("overflow_lost") == 1
        assert ex.is_failed
    assert crashed == []


def test_the_monitor_survives_a_pump_that_raises(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Defence in depth: an unexpected error while the monitor pumps is logged once and
    the monitor goes on (futures still complete, deaths are still seen)."""
    from gpuexec.executor.shm_transport import ShmTransport

    real, raised = ShmTransport.pump, []

    def flaky(self: ShmTransport, timeout_ms: int) -> list[int]:
        if len(raised) < 3:
            raised.append(1)
            raise RuntimeError("injected")
        return real(self, timeout_ms)

    monkeypatch.setattr(ShmTransport, "pump", flaky)
    with Executor(EchoWorker, 2, device="cpu", transport="shm") as ex:
        assert ex.collective_rpc("add", args=(1, 2), non_block=True).result(timeout=30) == \
            [3, 4]  # a + b + rank
        os.kill(ex.workers[1].pid, signal.SIGKILL)
        with pytest.raises(WorkerDiedError):
            ex.collective_rpc("sleep", args=(30,), non_block=True).result(timeout=30)
    assert len(raised) == 3
    assert [r.getMessage() for r in caplog.records].count(
        "gpuexec: the monitor's pump raised; it goes on watching for deaths and deadlines "
        "(further errors not logged)") == 1


@pytest.mark.parametrize("start_method",
                         ["fork", "spawn", "forkserver", "subprocess", "zygote"])
def test_shm_under_every_start_method(start_method: str) -> None:
    """The rings are mapped however the workers were started (inherited, or opened
    through the driver's /proc entry): small calls, an overflow to ZeroMQ, a targeted
    call, and a worker's death noticed while a caller sleeps on the doorbell."""
    import numpy as np

    with Executor(EchoWorker, 2, device="cpu", transport="shm", start_method=start_method,
                  preload=()) as ex:
        assert (ex.transport, ex.start_method) == ("shm", start_method)
        assert ex.collective_rpc("add", args=(1,)) == [1, 2]
        big = np.arange(300_000, dtype=np.float64)  # 2.3 MiB: more than a slot
        echoed = ex.collective_rpc("echo", args=(big,), unique_reply_rank=1)
        assert np.array_equal(echoed["args"][0], big)
        assert ex.collective_rpc("add", args=(5,), ranks=[1]) == [6]
        victim = ex.workers[0].pid
        fut = ex.collective_rpc("sleep", args=(60,), non_block=True)
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(WorkerDiedError) as info:
            fut.result(timeout=60)
        assert info.value.rank == 0


def test_transport_choice(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
                          ) -> None:
    with pytest.raises(ConfigError, match="unknown transport 'pigeon'"):
        Executor(EchoWorker, 1, device="cpu", transport="pigeon")
    import gpuexec.executor.startup as startup_module

    monkeypatch.setattr(startup_module, "shm_room", lambda n: "/dev/shm has 1 MiB free")
    with pytest.raises(ConfigError, match="transport='shm' is not possible here"):
        Executor(EchoWorker, 1, device="cpu", transport="shm")
    with Executor(EchoWorker, 1, device="cpu", transport="auto") as ex:
        assert ex.transport == "zmq"
        assert ex.collective_rpc("add", args=(1,)) == [1]
    assert "using ZeroMQ instead of shared memory: /dev/shm has 1 MiB free" in caplog.text


def _in_payload_mapping(worker: object, x: object) -> bool:
    address = x.__array_interface__["data"][0]  # type: ignore[attr-defined]
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
            if lo <= address < hi:
                return "memfd:gpuexec-payload" in line
    return False


def test_large_broadcast_arrays_are_shared_not_copied_and_freed() -> None:
    import numpy as np
    import torch

    with Executor(EchoWorker, 2, device="cpu", transport="shm") as ex:
        a = np.arange(1 << 19, dtype=np.float64)  # 4 MiB: a shared-memory payload
        # Mapped, not copied: the array's memory lies in a mapping of the driver's file.
        assert ex.collective_rpc(_in_payload_mapping, args=(a,)) == [True, True]
        # Copy-on-write: a worker that writes changes only its own pages.
        assert ex.collective_rpc(lambda w, x: (x.__setitem__(0, w.rank + 7), float(x[0]))[1],
                                 args=(a,)) == [7.0, 8.0]
        assert a[0] == 0.0
        # A worker may keep it after the call: the mapping outlives the driver's descriptor.
        ex.collective_rpc(lambda w, x: setattr(w, "kept", x), args=(a,))
        assert ex.collective_rpc(lambda w: float(w.kept.sum())) == [float(a.sum())] * 2
        t = torch.arange(1 << 20, dtype=torch.float32)
        assert ex.collective_rpc(lambda w, x: float(x.sum()), args=(t,)) == \
            [float(t.sum())] * 2
        assert _payload_fds() == 0  # closed as each call completed
    assert _ours() == set()


def _payload_fds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += "memfd:gpuexec-payload" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return count


def test_a_reused_payload_descriptor_is_refused_not_read_as_another_payload() -> None:
    # A call that timed out has its payload's descriptor closed while its request may
    # still wait unread in the ring; the number can then name the next call's payload.
    from gpuexec.ipc import shm_payload

    first = bytes(range(256)) * 16
    fd, ino = shm_payload.write_segment(first)
    os.close(fd)
    fd2, ino2 = shm_payload.write_segment(b"\xff" * len(first))
    try:
        assert fd2 == fd  # the lowest free number: the very case
        with pytest.raises(ValueError, match="not the payload"):
            shm_payload.map_segment(os.getpid(), fd, ino, len(first))
        with shm_payload.map_segment(os.getpid(), fd2, ino2, len(first)) as mm:
            assert mm[:4] == b"\xff" * 4
    finally:
        os.close(fd2)


def _core_name(worker: object) -> str:
    from gpuexec.ipc import ringcore

    return ringcore.current().NAME


@pytest.mark.parametrize("worker_core", ["compiled", "python"])
def test_a_driver_and_workers_on_different_cores_talk_both_ways(
        ring_core: str, worker_core: str) -> None:
    """The two cores speak the same bytes: a compiled driver with pure-Python workers
    and the other way round, through requests, replies, a large reply by ZeroMQ with
    its marker in the ring, calls to one rank, and sleeps on both sides' futexes."""
    from gpuexec.ipc import ringcore

    assert ringcore.current().NAME == ring_core
    with Executor(EchoWorker, 2, device="cpu", transport="shm",
                  env={ringcore.ENV: worker_core}) as ex:
        assert ex.collective_rpc(_core_name) == [worker_core, worker_core]
        # Calls by name without arguments and None results: cached headers both ways
        # (ids past one byte too, and one rank's value only).
        for _ in range(300):
            assert ex.collective_rpc("echo") == [{"args": [], "kwargs": {}}] * 2
        assert ex.collective_rpc("echo", unique_reply_rank=1) == {"args": [], "kwargs": {}}
        assert ex.collective_rpc(lambda w: None) == [None, None]
        for k in range(50):
            assert ex.collective_rpc("echo", args=(k,), kwargs={"k": [k]}) == \
                [{"args": [k], "kwargs": {"k": [k]}}] * 2
        assert ex.collective_rpc("echo", args=("one",), ranks=[1]) == \
            [{"args": ["one"], "kwargs": {}}]
        big = b"x" * (3 << 20)  # more than a slot: ZeroMQ, a marker in each ring
        assert ex.collective_rpc("echo", args=(big, 1)) == \
            [{"args": [big, 1], "kwargs": {}}] * 2
        time.sleep(0.3)  # both sides asleep on their futexes now
        assert ex.collective_rpc("echo", args=(2,)) == [{"args": [2], "kwargs": {}}] * 2


def _junk_then_rank(worker: EchoWorker, junk: bytes) -> int:
    """Put ``junk`` into this rank's reply ring as a reply of one frame (what a broken or
    hostile worker could write there), then answer as usual."""
    import gc

    from gpuexec.worker.transport import ShmWorkerTransport

    (ours,) = [o for o in gc.get_objects() if isinstance(o, ShmWorkerTransport)]
    assert ours.reply.put_one(junk)
    return worker.rank


def test_frames_that_do_not_decode_are_dropped_and_counted_and_the_call_completes() -> None:
    """Short frames in the reply rings are copied out and decoded together; one that is
    not a reply (bad msgpack, an empty frame, a message of another type) is dropped and
    counted by its reason, the replies around it still delivered."""
    from gpuexec.ipc.messages import Call

    junk = [b"\xc1", b"", msgspec.msgpack.encode({"type": "nope"}),
            msgspec.msgpack.encode(Call(1, "m", None, [], {}))]
    reasons = ["undecodable", "empty", "unknown_type", "unknown_type"]
    with Executor(EchoWorker, 2, device="cpu", transport="shm") as ex:
        before = ex.stats().malformed_by_reason
        for bad in junk:
            assert ex.collective_rpc(_junk_then_rank, args=(bad,), timeout=20) == [0, 1]
            assert ex.collective_rpc(_junk_then_rank, args=(bad,), ranks=[1],
                                     timeout=20) == [1]
        after = ex.stats().malformed_by_reason
        for reason in set(reasons):
            assert after.get(reason, 0) - before.get(reason, 0) == \
                3 * reasons.count(reason), reason
        assert ex.collective_rpc("echo") == [{"args": [], "kwargs": {}}] * 2


def test_cached_headers_are_the_bytes_the_encoder_writes() -> None:
    """A call without arguments and a None reply skip the encoder on the hot path: their
    headers, made from cached bytes around the id, are byte for byte what it writes."""
    import msgspec

    from gpuexec.ipc.codec import Encoder, none_reply_parts
    from gpuexec.ipc.messages import Call, Reply

    enc = Encoder(allow_pickle=True)
    ids = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]
    for method in ("noop", "m" * 31, "m" * 32, "é" * 200, "n" * 70000):
        for call_id in ids:
            assert enc.bare_call(call_id, method) == \
                enc.encode(Call(call_id, method, None, [], {}))[0]
    for rank in (0, 1, 127, 128, 70000):
        before, after = none_reply_parts(rank)  # what the driver knows None replies by
        for call_id in ids:
            assert enc.none_reply(call_id, rank) == enc.encode(Reply(call_id, rank))[0] \
                == before + msgspec.msgpack.encode(call_id) + after
    assert enc.bare_call(1, "bad\udc80name") is None  # not msgpack: the encoder explains


def test_a_result_delivered_on_the_hot_path_is_recorded_as_by_the_general_walk() -> None:
    """The driver's table records a result delivered by the hot path (a None taken from a
    ring by its bytes, or a decoded value) as it records any reply: the call completes
    once every rank answered, a repeated or late answer is counted as late, and a
    failure of another rank still fails the call."""
    from gpuexec import RemoteError
    from gpuexec.executor.calls import CallTable, PendingCall
    from gpuexec.ipc.messages import Failure, Reply

    table = CallTable(8, world_size=2)
    call = PendingCall(1, "noop", [0, 1], None, None, None)
    table.enter(call, ExecutorClosedError)
    table.deliver_values(call, [0])
    table.deliver_values(call, [0])  # rank 0 answered already: late
    assert not call.done and table.stats.late_replies == 1
    table.deliver_values(call, [1])
    assert call.done and call.outcome() == [None, None]
    table.deliver_values(call, [1])  # after the end: late
    assert table.stats.late_replies == 2
    failing = PendingCall(2, "noop", [0, 1], None, None, None)
    table.enter(failing, ExecutorClosedError)
    table.deliver([Reply(2, 0, error=Failure.of(ValueError("rank 0 broke")))])
    table.deliver_values(failing, [1])
    with pytest.raises(RemoteError, match="rank 0 broke"):
        failing.outcome()
    valued = PendingCall(3, "pid", [1], None, None, None)  # a decoded value, one rank
    table.enter(valued, ExecutorClosedError)
    table.deliver_values(valued, [1], {"pid": 7})
    assert valued.outcome() == [{"pid": 7}]
    table.deliver_values(valued, [1], 8)  # late: counted, the outcome kept
    assert valued.outcome() == [{"pid": 7}] and table.stats.late_replies == 3
    assert table.metrics.replies == [2, 3] and not table.pending
    # Every rank at once (answered): None each, or each rank's value; a call some rank
    # answered already, or one that ended, takes the general steps (counted as there).
    together = PendingCall(4, "noop", [1, 0], None, None, None)
    table.enter(together, ExecutorClosedError)
    table.answered(together)
    assert together.outcome() == [None, None] and table.metrics.replies == [3, 4]
    table.answered(together)  # after the end: both late
    assert table.stats.late_replies == 5
    values = PendingCall(5, "pid", [0, 1], None, None, None)
    table.enter(values, ExecutorClosedError)
    table.answered(values, {1: "b", 0: "a"})
    assert values.outcome() == ["a", "b"]
    halfway = PendingCall(6, "pid", [0, 1], None, None, None)
    table.enter(halfway, ExecutorClosedError)
    table.deliver_values(halfway, [0], "a")
    table.answered(halfway, {0: "again", 1: "b"})  # rank 0 twice: late, its value kept
    assert halfway.outcome() == ["a", "b"] and table.stats.late_replies == 6
    assert table.metrics.replies == [5, 6] and not table.pending and table.inflight == 0


@pytest.mark.parametrize("future", [False, True])
def test_bare_calls_the_ring_core_answers_keep_every_outcome(future: bool) -> None:
    """A call by name without arguments that a worker served once is then answered by
    its ring core (the method run there, its None reply written there): what it returns,
    raises, or a replaced or hidden method reach the driver as the request loop would
    give them; a Future returned (a deferred reply) hands the loop back for good."""
    from workers import ShiftingWorker

    from gpuexec import RemoteError

    with Executor(ShiftingWorker, 2, device="cpu", transport="shm") as ex:
        for _ in range(200):  # the first one learned by the loop, the rest by the core
            assert ex.collective_rpc("turn") == [None, None]
        assert ex.collective_rpc(lambda w: w.callers[:3]) == [["_run", "serve", "serve"]] * 2
        ex.collective_rpc("plan", args=("value", "none", "raise", "none", "exit", "none",
                                        *(["future", "none"] if future else [])))
        assert ex.collective_rpc("turn") == [201, 201]
        assert ex.collective_rpc("turn") == [None, None]
        with pytest.raises(RemoteError, match="turn 203 broke") as broke:
            ex.collective_rpc("turn")
        assert broke.value.type_name == "ValueError" and broke.value.method == "turn"
        assert "in turn" in broke.value.remote_traceback  # the method's own frame
        assert ex.collective_rpc("turn") == [None, None]
        with pytest.raises(RemoteError) as exited:  # SystemExit: the worker lives on
            ex.collective_rpc("turn")
        assert exited.value.type_name == "SystemExit"
        assert ex.collective_rpc("turn") == [None, None]
        if future:
            assert ex.collective_rpc("turn") == ["later 207"] * 2
            assert ex.collective_rpc("turn") == [None, None]
        ex.collective_rpc("swap")  # the name is looked up at every call
        assert ex.collective_rpc("turn") == ["swapped 0", "swapped 1"]
        ex.collective_rpc("hide")
        with pytest.raises(RemoteError, match="has no method 'turn'"):
            ex.collective_rpc("turn")
        for _ in range(3):  # a name whose lookup raises: the loop's answer every time
            with pytest.raises(RemoteError, match="no such thing"):
                ex.collective_rpc("broken")
        assert ex.collective_rpc(lambda w: w.turns) == [206 + 2 * future] * 2


@pytest.mark.parametrize("future", [False, True])
def test_calls_with_arguments_the_ring_core_answers_keep_every_outcome(future: bool) -> None:
    """A call by name with arguments is decoded and run by the worker's ring core, and
    its reply written there when the value is plain data: the arguments as sent, values,
    raises, an exit, a Future, a reply longer than a ring slot (made there, sent by
    ZeroMQ) and values only the encoder's walk carries (a tuple, an int beyond 64 bits)
    reach the driver as the request loop gives them; a call for one rank's value and a
    callable still run in the loop."""
    from workers import ShiftingWorker

    from gpuexec import RemoteError

    with Executor(ShiftingWorker, 2, device="cpu", transport="shm") as ex:
        ex.collective_rpc("plan", args=("echo", "tuple", "raise", "value", "exit", "echo",
                                        "big", *(["future", "echo"] if future else [])))
        assert ex.collective_rpc("turn", args=(1, "x"), kwargs={"c": [1.0, 2.0]}) == \
            [{"args": [1, "x"], "kwargs": {"c": [1.0, 2.0]}}] * 2
        assert ex.collective_rpc("turn", args=(1, (2, 3))) == [(1, (2, 3))] * 2
        with pytest.raises(RemoteError, match="turn 3 broke") as broke:
            ex.collective_rpc("turn", args=(0,))
        assert broke.value.type_name == "ValueError" and "in turn" in \
            broke.value.remote_traceback
        assert ex.collective_rpc("turn", kwargs={"k": None}) == [4, 4]
        with pytest.raises(RemoteError) as exited:  # SystemExit: the worker lives on
            ex.collective_rpc("turn", args=(0,))
        assert exited.value.type_name == "SystemExit"
        assert ex.collective_rpc("turn", args=(2**70,)) == \
            [{"args": [2**70], "kwargs": {}}] * 2
        assert ex.collective_rpc("turn", args=(1,)) == [list(range(300_000))] * 2
        if future:
            assert ex.collective_rpc("turn", args=(1,)) == ["later 8"] * 2
            assert ex.collective_rpc("turn", args=(1,)) == [{"args": [1], "kwargs": {}}] * 2
        assert ex.collective_rpc("turn", args=(5,), unique_reply_rank=1) is None
        assert ex.collective_rpc(lambda w, n: w.turn(n), args=(6,)) == [None, None]
        callers = ex.collective_rpc(lambda w: w.callers)
    assert callers == [["serve"] * (7 + future) + ["_run"] * (1 + future) + ["<lambda>"]] * 2
