"""Fuzzing the wire: random and mutated frames at the driver and at the workers while
real calls run. Zero crashes, zero wrong results, and every frame accounted for.

Frames are mutations of real encoded messages (bit flips, truncation, extension,
wrong tags, handshake messages of other protocol versions after start-up, huge
declared array shapes and msgpack lengths, random multipart counts) and plain random
bytes. Each frame set sent is either dropped and counted as malformed, or decodes into
a message for a call that is not pending and is counted as a late reply: the test
asserts that the two counters together grew by exactly the number sent.

* driver: a PUSH socket of the test connects to the reply endpoint (the test runs in
  the driver's process, which the ipc rule admits);
* workers: raw frames through ``gpuexec.testing.send_raw`` (ZeroMQ and shared memory),
  counted by each worker and brought back by ``check_health``;
* tcp: a peer without the CURVE key sends the same frames: nothing is processed.

The CI run sends ``GPUEXEC_FUZZ_FRAMES`` frame sets per target (default 3000); the long
run is ``GPUEXEC_FUZZ_FRAMES=100000 pytest -q tests/test_fuzz.py`` (SECURITY.md).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
import zmq
from fuzz_workers import SafeWorker
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gpuexec import Executor, testing
from gpuexec.ipc.codec import Encoder
from gpuexec.ipc.messages import (
    PROTOCOL_VERSION,
    Call,
    Failure,
    Ping,
    Pong,
    Ready,
    Reply,
    Shutdown,
)

FRAMES = int(os.environ.get("GPUEXEC_FUZZ_FRAMES", "3000"))
BATCH = 40
EXAMPLES = max(1, FRAMES // BATCH)
# A call id no real call reaches, made of 0xc1 bytes (never valid msgpack): a mutation
# that shortens its integer type reads 0xc1 next and fails, so no mutated reply can
# name a call in flight. The rank is no worker's either.
BIG_ID = 0xC1C1C1C1C1C1C1C1
BAD_RANK = 1000

_enc = Encoder(allow_pickle=False)


def _frames(msg: Any) -> list[bytes]:
    return [bytes(memoryview(f)) for f in _enc.encode(msg)]


def _huge_array(code: int, dtype: str, shape: list[int], where: Any) -> Any:
    return msgspec.msgpack.Ext(code, msgspec.msgpack.encode([dtype, shape, where]))


TO_DRIVER = [
    _frames(Reply(BIG_ID, BAD_RANK, None)),
    _frames(Reply(BIG_ID, BAD_RANK, {"k": [1, 2.5, "x", b"y"]})),
    _frames(Reply(BIG_ID, BAD_RANK, np.arange(16, dtype=np.int32))),       # inline array
    _frames(Reply(BIG_ID, BAD_RANK, np.arange(1024, dtype=np.float64))),   # out of band
    _frames(Reply(BIG_ID, BAD_RANK, torch.arange(2048, dtype=torch.float16))),
    _frames(Reply(BIG_ID, BAD_RANK, error=Failure("ValueError", "m", "tb"))),
    _frames(Pong(BIG_ID, BAD_RANK, {"undecodable": 1})),
    _frames(Ready(PROTOCOL_VERSION, BAD_RANK, 1, "cpu")),                   # after start-up
    _frames(Call(BIG_ID, "noop", None, [], {})),                             # wrong direction
    [msgspec.msgpack.encode(["reply", BIG_ID, BAD_RANK,
                             _huge_array(1, "<f8", [1 << 40], 0), None]), b"\0" * 64],
]
TO_WORKER = [
    _frames(Call(BIG_ID, "add", None, [1], {"b": 2})),
    _frames(Call(BIG_ID, "echo", None, [np.arange(1024, dtype=np.float64)], {})),
    _frames(Call(BIG_ID, "echo", None, [torch.ones(8, 8)], {"t": np.int8(3).item()})),
    _frames(Call(BIG_ID, "noop", b"\x80\x05not a pickle", [], {})),  # a callable: refused
    _frames(Call(BIG_ID, "noop", None, [], {}, 0)),
    _frames(Ping(BIG_ID)),
    _frames(Reply(BIG_ID, BAD_RANK, 1)),                                     # wrong direction
    _frames(Ready(PROTOCOL_VERSION, BAD_RANK, 1, "cpu")),
    [msgspec.msgpack.encode(["call", BIG_ID, "echo", None,
                             [_huge_array(5, "float32", [1 << 30, 1 << 30], b"")], {}, -1])],
]
_TAGS = [b"reply", b"pong", b"call", b"ping", b"ready", b"startup_failed", b"rep1y", b"",
         b"shutdown\x00", b"x" * 40]
_SHUTDOWN = msgspec.msgpack.encode(Shutdown())


@st.composite
def mutated(draw: st.DrawFn, bases: list[list[bytes]]) -> list[bytes]:
    """One frame set: a base message, mutated one way."""
    frames = [bytearray(f) for f in draw(st.sampled_from(bases))]
    op = draw(st.sampled_from(["flip", "truncate", "extend", "tag", "version", "length",
                               "frames", "random", "asis"]))
    i = draw(st.integers(0, len(frames) - 1))
    f = frames[i]
    if op == "flip" and f:
        for _ in range(draw(st.integers(1, 3))):
            f[draw(st.integers(0, len(f) - 1))] ^= 1 << draw(st.integers(0, 7))
    elif op == "truncate":
        del f[draw(st.integers(0, max(len(f) - 1, 0))):]
    elif op == "extend":
        f += draw(st.binary(min_size=1, max_size=32))
    elif op == "tag":
        for tag in (b"reply", b"pong", b"ready", b"call", b"ping"):
            at = f.find(msgspec.msgpack.encode(tag.decode()))
            if at >= 0:
                new = msgspec.msgpack.encode(draw(st.sampled_from(_TAGS)).decode(
                    errors="replace"))
                f[at:at + len(tag) + 1] = new
                break
    elif op == "version":
        frames = [bytearray(msgspec.msgpack.encode(Ready(
            draw(st.integers(-(1 << 63), (1 << 63) - 1)), 0, 1, "cpu")))]
    elif op == "length" and f:
        # A msgpack bin/str/array header declaring far more than there is.
        at = draw(st.integers(0, len(f) - 1))
        f[at:at + 1] = draw(st.sampled_from([b"\xdb\xff\xff\xff\xff", b"\xc6\x7f\xff\xff\xff",
                                             b"\xdd\xff\xff\xff\xff", b"\xdf\x7f\xff\xff\xff"]))
    elif op == "frames":
        how = draw(st.sampled_from(["drop", "dup", "add", "split"]))
        if how == "drop" and len(frames) > 1:
            del frames[draw(st.integers(1, len(frames) - 1))]
        elif how == "dup":
            frames.insert(i, bytearray(frames[i]))
        elif how == "split" and len(f) > 1:
            cut = draw(st.integers(1, len(f) - 1))
            frames[i:i + 1] = [f[:cut], f[cut:]]
        else:
            frames += [bytearray(b) for b in draw(st.lists(st.binary(max_size=16),
                                                            min_size=1, max_size=6))]
    elif op == "random":
        frames = [bytearray(b) for b in draw(st.lists(st.binary(max_size=64),
                                                        min_size=1, max_size=4))]
    out = [bytes(x) for x in frames]
    if out[0] == _SHUTDOWN:  # the one message a worker obeys without answering
        out[0] = b"\xc1"
    return out


class RealCalls:
    """Real calls in a background thread, each result checked."""

    def __init__(self, ex: Executor) -> None:
        self.ex = ex
        self.done = 0
        self.wrong: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        n = self.ex.world_size
        while not self._stop.is_set():
            try:
                out = self.ex.collective_rpc("add", args=(i,), kwargs={"b": 1}, timeout=30)
                if out != [i + 1 + r for r in range(n)]:
                    self.wrong.append((i, out))
            except Exception as e:  # any error is a failure of the test
                self.wrong.append((i, repr(e)))
            self.done += 1
            i += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        assert not self.wrong, self.wrong[:5]


def _until(cond: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.002)
    return bool(cond())


_FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                 phases=[Phase.generate], suppress_health_check=list(HealthCheck))
_batches = {
    "driver": st.lists(mutated(TO_DRIVER), min_size=BATCH, max_size=BATCH),
    "worker": st.lists(mutated(TO_WORKER), min_size=BATCH, max_size=BATCH),
}


@pytest.fixture(scope="module")
def ipc_ex() -> Iterator[Executor]:
    ex = Executor(SafeWorker, 2, device="cpu", transport="zmq", allow_callables=False)
    yield ex
    ex.shutdown()


@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
def test_fuzz_driver_reply_socket(ipc_ex: Executor, record_property: Any) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(ipc_ex.endpoints[1])
    start = ipc_ex.stats()
    sent = [0]
    calls = RealCalls(ipc_ex)
    t0 = time.monotonic()

    def accounted() -> int:
        s = ipc_ex.stats()
        return s.malformed - start.malformed + s.late_replies - start.late_replies

    @_FUZZ
    @given(_batches["driver"])
    def run(batch: list[list[bytes]]) -> None:
        for frames in batch:
            push.send_multipart(frames)
        sent[0] += len(batch)
        assert _until(lambda: accounted() >= sent[0]), (accounted(), sent[0])
        assert accounted() == sent[0]

    try:
        run()
    finally:
        calls.stop()
        ctx.destroy(linger=0)
    s = ipc_ex.stats()
    elapsed = time.monotonic() - t0
    print(f"\ndriver: {sent[0]} frame sets in {elapsed:.1f} s, malformed "
          f"{s.malformed - start.malformed} {s.malformed_by_reason}, "
          f"late {s.late_replies - start.late_replies}, real calls {calls.done}")
    record_property("driver_frames", sent[0])
    assert sent[0] >= FRAMES - BATCH and calls.done > 0
    assert ipc_ex.collective_rpc("add", args=(1,)) == [1, 2]


@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
@pytest.mark.parametrize("transport", ["zmq", "shm"])
def test_fuzz_workers(transport: str, record_property: Any) -> None:
    with Executor(SafeWorker, 2, device="cpu", transport=transport,
                  allow_callables=False) as ex:
        ex.check_health()
        start = ex.stats()
        sent = [0]
        calls = RealCalls(ex)
        t0 = time.monotonic()

        def accounted() -> int:
            s = ex.stats()
            dropped = sum(n for r in s.worker_malformed.values() for k, n in r.items()
                          if k != "callable_refused")  # refused callables are answered
            return dropped + s.late_replies - start.late_replies

        @_FUZZ
        @given(_batches["worker"])
        def run(batch: list[list[bytes]]) -> None:
            for frames in batch:
                testing.send_raw(ex, frames)  # raw frames to every worker
            sent[0] += len(batch)
            ex.check_health(timeout=30)  # answered after the batch: its counts are final
            assert accounted() == sent[0] * ex.world_size

        try:
            run()
        finally:
            calls.stop()
        s = ex.stats()
        print(f"\nworkers ({transport}): {sent[0]} frame sets x {ex.world_size} ranks in "
              f"{time.monotonic() - t0:.1f} s, dropped {s.worker_malformed}, late "
              f"{s.late_replies - start.late_replies}, real calls {calls.done}")
        record_property("worker_frames", sent[0])
        assert sent[0] >= FRAMES - BATCH and calls.done > 0
        assert ex.collective_rpc("add", args=(1,)) == [1, 2]
        assert not ex.is_failed


@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
def test_fuzz_tcp_peer_without_key_gets_nothing_processed(record_property: Any) -> None:
    with Executor(SafeWorker, 2, device="cpu", transport="tcp") as ex:
        ctx: zmq.Context[Any] = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDTIMEO, 0)
        push.connect(ex.endpoints[1])
        start = ex.stats()
        calls = RealCalls(ex)
        queued = [0]

        @settings(_FUZZ, max_examples=max(1, EXAMPLES // 10))
        @given(_batches["driver"])
        def run(batch: list[list[bytes]]) -> None:
            for frames in batch:
                try:
                    push.send_multipart(frames)
                    queued[0] += 1
                except zmq.Again:
                    pass  # never connected: ZeroMQ has nowhere to queue them

        try:
            run()
            time.sleep(0.2)
        finally:
            calls.stop()
            ctx.destroy(linger=0)
        s = ex.stats()
        assert (s.malformed, s.late_replies) == (start.malformed, start.late_replies)
        assert calls.done > 0
        assert ex.collective_rpc("add", args=(1,)) == [1, 2]
