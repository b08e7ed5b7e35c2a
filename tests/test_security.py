"""The security boundary through the public API: CURVE on tcp, who may connect on ipc,
allow_callables, frame limits, drop counters and in-flight backpressure (SECURITY.md)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import numpy as np
import pytest
import zmq
from conftest import subprocess_env
from fuzz_workers import SafeWorker

from gpuexec import ConfigError, Executor, RemoteError, testing
from gpuexec.errors import CallRefusedError, InflightLimitError, RpcTimeoutError
from gpuexec.ipc import values
from gpuexec.ipc.codec import Decoder, Encoder, MalformedMessage, UndecodableValue
from gpuexec.ipc.messages import Call, Reply, ToWorker

FORGED = "forged"


def _until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def _forged_replies(first_id: int = 1, last_id: int = 200, ranks: int = 2) -> list[bytes]:
    """Valid Reply messages for every call id a test is likely to have in flight."""
    return [msgspec.msgpack.encode(Reply(i, r, FORGED)) for i in range(first_id, last_id)
            for r in range(ranks)]


@pytest.fixture(scope="module", params=["zygote", "subprocess"])
def tcp_ex(request: pytest.FixtureRequest) -> Iterator[Executor]:
    ex = Executor(SafeWorker, 2, device="cpu", transport="tcp", start_method=request.param)
    yield ex
    ex.shutdown()


# -- tcp + CURVE ----------------------------------------------------------------------

def test_tcp_round_trip_binds_loopback_and_skips_shm(tcp_ex: Executor) -> None:
    assert tcp_ex.transport == "tcp"
    for endpoint in tcp_ex.endpoints:
        assert endpoint.startswith("tcp://127.0.0.1:")
    assert tcp_ex.collective_rpc("add", args=(1,)) == [1, 2]
    arr = np.arange(100_000, dtype=np.float32)  # out of band, through CURVE
    out = tcp_ex.collective_rpc("echo", args=(arr,))
    np.testing.assert_array_equal(out[1]["args"][0], arr)
    assert tcp_ex.collective_rpc(lambda w: w.rank * 10) == [0, 10]
    wires = tcp_ex.collective_rpc(testing.worker_wire)
    assert wires[0][0] != wires[1][0] and wires[0][1] == wires[1][1]  # a keypair per worker
    assert None not in (wires[0][0], wires[0][1])
    assert [shm for _, _, shm in wires] == [False, False]


def _peer(ctx: zmq.Context[Any], kind: int, endpoint: str,
          server_public: bytes | None = None) -> zmq.Socket[Any]:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if server_public is not None:  # a CURVE client with a key of its own, not ours
        public, secret = zmq.curve_keypair()
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    return sock


@pytest.mark.parametrize("key", ["none", "wrong"])
def test_tcp_peer_without_our_key_is_ignored(tcp_ex: Executor, key: str) -> None:
    req, rep = tcp_ex.endpoints
    # Even a peer that knows the server's public key (it is no secret) gets nowhere.
    server_public = tcp_ex.collective_rpc(testing.worker_wire)[0][1] if key == "wrong" \
        else None
    before = tcp_ex.stats()
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        push = _peer(ctx, zmq.PUSH, rep, server_public)
        sub = _peer(ctx, zmq.SUB, req, server_public)
        fut = tcp_ex.collective_rpc("nap", args=(0.3,), non_block=True)
        for frame in _forged_replies(1, 400):
            try:
                push.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                break  # not connected: nothing can be sent at all
        assert fut.result(timeout=30) == [0.3, 0.3]
        assert tcp_ex.collective_rpc("add", args=(5,)) == [5, 6]
        assert sub.poll(200) == 0  # it never receives a request
        if key == "wrong":
            assert _until(lambda: tcp_ex.stats().refused_connections >
                          before.refused_connections)
    finally:
        ctx.destroy(linger=0)
    after = tcp_ex.stats()
    assert after.malformed == before.malformed
    assert after.late_replies == before.late_replies
    tcp_ex.check_health()


@pytest.mark.parametrize("host", ["0.0.0.0", "*", "::", ""])
def test_wildcard_hosts_are_refused_before_start(host: str, no_leaks: None) -> None:
    with pytest.raises(ConfigError, match="every interface"):
        Executor(SafeWorker, 1, device="cpu", transport="tcp", host=host)


def test_unknown_transport_is_refused() -> None:
    with pytest.raises(ConfigError, match="tcp"):
        Executor(SafeWorker, 1, device="cpu", transport="udp")


# -- ipc ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ipc_ex() -> Iterator[Executor]:
    ex = Executor(SafeWorker, 2, device="cpu", transport="zmq")
    yield ex
    ex.shutdown()


def test_ipc_directory_is_private(ipc_ex: Executor) -> None:
    path = ipc_ex.endpoints[1].removeprefix("ipc://").rsplit("/", 1)[0]
    st = os.stat(path)
    assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700


_STRANGER = textwrap.dedent("""
    import os, sys, time, zmq
    req, rep, frames = sys.argv[1], sys.argv[2], sys.argv[3:]
    if os.fork():          # the parent exits: the child is nobody's descendant any more
        os._exit(0)
    parent = os.getppid()
    deadline = time.monotonic() + 10
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.01)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH); push.setsockopt(zmq.LINGER, 0); push.connect(rep)
    sub = ctx.socket(zmq.SUB); sub.setsockopt(zmq.SUBSCRIBE, b""); sub.connect(req)
    sent = 0
    for f in frames * 20:
        try:
            push.send(bytes.fromhex(f), zmq.NOBLOCK); sent += 1
        except zmq.Again:
            time.sleep(0.01)
    print("sent", sent, "heard", sub.poll(500), flush=True)
""")


def test_ipc_stranger_process_of_the_same_user_is_refused(ipc_ex: Executor) -> None:
    """Only the driver and its descendants may connect; a process of the same user that
    is not one of them (here: a daemonised grandchild, re-parented to init) is refused
    by the ZAP handler, and its valid-looking replies are never processed."""
    before = ipc_ex.stats()
    fut = ipc_ex.collective_rpc("nap", args=(0.5,), non_block=True)
    frames = [f.hex() for f in _forged_replies(1, 60)]
    out = subprocess.run([sys.executable, "-c", _STRANGER, *ipc_ex.endpoints, *frames],
                         capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert out.returncode == 0, out.stderr
    assert fut.result(timeout=30) == [0.5, 0.5]
    assert _until(lambda: ipc_ex.stats().refused_connections >= before.refused_connections + 2)
    assert "sent 0 heard 0" in out.stdout or "heard 0" in out.stdout
    after = ipc_ex.stats()
    assert (after.malformed, after.late_replies) == (before.malformed, before.late_replies)
    assert ipc_ex.collective_rpc("add", args=(1,)) == [1, 2]


def test_malformed_frames_are_counted_by_reason(ipc_ex: Executor) -> None:
    """The driver's own process may connect (same process tree): what it sends that is
    not a reply is counted per reason, and the executor keeps working."""
    good = Encoder(allow_pickle=False).encode(Reply(1 << 60, 9, np.arange(1000.0)))
    bad: list[tuple[list[bytes], str]] = [
        ([b"\xc1"], "undecodable"),
        ([good[0][:-3]], "undecodable"),
        ([msgspec.msgpack.encode({"type": "nope"})], "unknown_type"),
        ([msgspec.msgpack.encode(["call", 1, "m", None, [], {}, -1])], "unknown_type"),
        ([good[0]], "bad_buffer"),                       # its array frame is missing
        ([good[0], bytes(good[1])[:-8]], "bad_buffer"),  # shorter than declared
        ([good[0], bytes(good[1]), b"extra"], "extra_frames"),
        ([b""], "empty"),
    ]
    before = ipc_ex.stats()
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.connect(ipc_ex.endpoints[1])
        for frames, _ in bad:
            push.send_multipart(frames)
        expected = before.malformed + len(bad)

        def counted() -> bool:
            assert ipc_ex.collective_rpc("add", args=(2,)) == [2, 3]
            return ipc_ex.stats().malformed >= expected

        assert _until(counted)
        push.close(linger=1000)
    finally:
        ctx.destroy(linger=0)
    after = ipc_ex.stats()
    assert after.malformed == expected
    for reason in {r for _, r in bad}:
        want = sum(1 for _, r in bad if r == reason)
        assert after.malformed_by_reason.get(reason, 0) - \
            before.malformed_by_reason.get(reason, 0) == want, reason


def test_workers_count_malformed_requests(ipc_ex: Executor) -> None:
    ipc_ex.check_health()
    before = ipc_ex.stats().worker_malformed
    for frames in ([b"\xc1"], [b""], [msgspec.msgpack.encode(Reply(1, 0))],
                   [msgspec.msgpack.encode(["call", 1 << 60, "noop", None, [], {}, -1]), b"x"]):
        testing.send_raw(ipc_ex, frames)  # raw frames on the request socket
    assert ipc_ex.collective_rpc("add", args=(0,)) == [0, 1]
    ipc_ex.check_health()
    after = ipc_ex.stats().worker_malformed
    for rank in (0, 1):
        delta = {k: v - before[rank].get(k, 0) for k, v in after[rank].items()}
        assert delta == {"undecodable": 2, "unknown_type": 1, "extra_frames": 1}


# -- allow_callables=False ------------------------------------------------------------

@pytest.fixture(scope="module")
def strict_ex() -> Iterator[Executor]:
    ex = Executor(SafeWorker, 2, device="cpu", allow_callables=False)
    yield ex
    ex.shutdown()


def test_driver_refuses_callables_before_sending(strict_ex: Executor) -> None:
    calls = strict_ex.stats().calls
    with pytest.raises(CallRefusedError, match="allow_callables=False"):
        strict_ex.collective_rpc(lambda w: w.rank)
    with pytest.raises(TypeError, match="pickle"):  # a pickled argument runs code too
        strict_ex.collective_rpc("echo", args=(object(),))
    assert strict_ex.stats().calls == calls
    arr = np.ones((64, 64))
    out = strict_ex.collective_rpc("echo", args=(arr, [1, "x"]), kwargs={"k": b"v"})
    np.testing.assert_array_equal(out[0]["args"][0], arr)
    assert out[1]["args"][1] == [1, "x"]


def test_workers_refuse_callables_and_pickles(strict_ex: Executor, tmp_path: Any) -> None:
    """Defence in depth: a callable that reaches a worker anyway is not unpickled."""
    import cloudpickle

    marker = tmp_path / "ran"

    def evil(worker: Any) -> None:
        open(marker, "w").close()

    with pytest.raises(RemoteError, match="allow_callables=False") as info:
        testing.call_unchecked(strict_ex, "evil", cloudpickle.dumps(evil))
    assert info.value.type_name == "PermissionError"
    pickled_arg = Encoder(allow_pickle=True).encode(
        Call(1 << 60, "echo", None, [_Evil(str(marker))], {}))
    late = strict_ex.stats().late_replies
    testing.send_raw(strict_ex, pickled_arg)
    strict_ex.check_health()
    assert not marker.exists()
    # Refused without unpickling and answered with the error (nobody waits for that call
    # id here: two late replies), so a real call would end instead of waiting.
    assert _until(lambda: strict_ex.stats().late_replies == late + 2)
    for rank in (0, 1):
        dropped = strict_ex.stats().worker_malformed[rank]
        assert dropped.get("callable_refused") == 1 and "pickle_refused" not in dropped


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


# -- limits ---------------------------------------------------------------------------

def test_inflight_limit_backpressure(no_leaks: None) -> None:
    with Executor(SafeWorker, 1, device="cpu", max_inflight_calls=2) as ex:
        first = ex.collective_rpc("nap", args=(1.0,), non_block=True)
        second = ex.collective_rpc("nap", args=(0.01,), non_block=True)
        calls = ex.stats().calls
        with pytest.raises(InflightLimitError) as info:  # two are stuck: no slot
            ex.collective_rpc("add", args=(1,), timeout=0.2)
        assert isinstance(info.value, RpcTimeoutError) and info.value.limit == 2
        assert ex.stats().calls == calls  # never sent
        third = ex.collective_rpc("add", args=(1,))  # waits for a slot, then runs
        assert third == [1] and first.done()
        assert first.result() == [1.0] and second.result() == [0.01]
        assert ex.stats().inflight_waits >= 1
        ex.check_health()
        # Many more calls than slots, from several threads, while two naps hold both
        # slots: every thread's first call waits for a slot, and every call ends right.
        naps = [ex.collective_rpc("nap", args=(0.5,), non_block=True) for _ in range(2)]
        waits = ex.stats().inflight_waits
        results: list[tuple[int, Any]] = []

        def submit_many() -> None:
            futures = [(i, ex.collective_rpc("add", args=(i,), non_block=True))
                       for i in range(50)]
            results.extend((i, f.result()) for i, f in futures)

        threads = [threading.Thread(target=submit_many) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [f.result() for f in naps] == [[0.5], [0.5]]
        assert ex.stats().inflight_waits >= waits + 3
        assert sorted(results) == sorted((i, [i]) for i in range(50) for _ in range(3))
        assert ex.collective_rpc("add", args=(3,)) == [3]


def test_inflight_limit_validated() -> None:
    with pytest.raises(ConfigError, match="max_inflight_calls"):
        Executor(SafeWorker, 1, device="cpu", max_inflight_calls=0)
    with pytest.raises(ConfigError, match="allow_callables"):
        Executor(SafeWorker, 1, device="cpu", allow_callables="no")  # type: ignore[arg-type]


@pytest.mark.parametrize("transport", ["zmq", "tcp"])
def test_max_message_size_both_ways(transport: str, no_leaks: None) -> None:
    with Executor(SafeWorker, 1, device="cpu", transport=transport,
                  max_message_size=1 << 16) as ex:
        with pytest.raises(ValueError, match="max_message_size"):
            ex.collective_rpc("echo", args=(np.zeros(1 << 14),))  # 128 KiB: not sent
        with pytest.raises(RemoteError, match="max_message_size"):
            ex.collective_rpc("big", args=(1 << 17,))
        assert ex.collective_rpc("big", args=(100,)) == [b"x" * 100]
        if transport == "zmq":  # a rogue frame over the limit: refused by ZeroMQ
            before = ex.stats()
            ctx: zmq.Context[Any] = zmq.Context()
            push = ctx.socket(zmq.PUSH)
            push.connect(ex.endpoints[1])
            push.send(msgspec.msgpack.encode(Reply(1, 0, b"x" * (1 << 17))))
            push.close(linger=1000)
            ctx.destroy(linger=0)
            assert ex.collective_rpc("add", args=(1,)) == [1]
            after = ex.stats()
            assert (after.late_replies, after.malformed) == \
                (before.late_replies, before.malformed)


# -- codec ----------------------------------------------------------------------------

def test_codec_checks_declared_sizes() -> None:
    dec: Decoder[Any] = Decoder(ToWorker, allow_pickle=False)
    huge = msgspec.msgpack.Ext(4, msgspec.msgpack.encode(["<f8", [1 << 40], b""]))
    cases = [
        ([msgspec.msgpack.encode(["call", 1, "m", None, [huge], {}, -1])], "bad_buffer"),
        ([msgspec.msgpack.encode(["call", 1, "m", None, [msgspec.msgpack.Ext(
            5, msgspec.msgpack.encode(["float32", [1 << 50, 1 << 50], b""]))], {}, -1])],
         "bad_buffer"),
        ([msgspec.msgpack.encode(["call", 1, "m", None, [msgspec.msgpack.Ext(
            1, msgspec.msgpack.encode(["|O", [1], 0]))], {}, -1]), b"12345678"], "bad_buffer"),
        ([msgspec.msgpack.encode(["call", 1, "m", None, [msgspec.msgpack.Ext(
            1, msgspec.msgpack.encode(["<f8", [-1], 0]))], {}, -1]), b""], "bad_buffer"),
        ([msgspec.msgpack.encode(["call", 1, "m", None, [msgspec.msgpack.Ext(
            3, b"cos\nsystem\n")], {}, -1])], "unknown_type"),
        ([msgspec.msgpack.encode(["call", 1, "m", None, [msgspec.msgpack.Ext(
            values.PICKLE, msgspec.msgpack.encode(["T", "args[0]", 0, 0, b"cos\nsystem\n"]))],
            {}, -1])], "pickle_refused"),
        ([msgspec.msgpack.encode(["call", 1, "m", None, [], {}, -1]), b"x"], "extra_frames"),
    ]
    for frames, reason in cases:
        with pytest.raises(MalformedMessage) as info:
            dec.decode(frames)
        assert info.value.reason == reason, frames


@pytest.mark.filterwarnings("error")  # numpy warns of some aliases: never reached
@pytest.mark.parametrize("dtype", ["a", "|a5", "S", "f8", "=f8", "float64", "<f8 ", "|O8",
                                   "<T16", "<f8[ns]", "<" + "9" * 12, ""])
def test_codec_refuses_dtypes_a_sender_never_writes(dtype: str) -> None:
    """Only ``dtype.str`` forms travel: an alias is a broken message, refused before numpy
    reads it, while a well-formed dtype this numpy does not know is the call's error."""
    dec: Decoder[Any] = Decoder(ToWorker, allow_pickle=False)

    def frames(dt: str) -> list[bytes]:
        ext = msgspec.msgpack.Ext(1, msgspec.msgpack.encode([dt, [1], 0]))
        return [msgspec.msgpack.encode(["call", 1, "m", None, [ext], {}, -1]), b"\0" * 8]

    with pytest.raises(MalformedMessage, match="refused numpy dtype") as info:
        dec.decode(frames(dtype))
    assert info.value.reason == "bad_buffer"
    msg = dec.decode(frames("<f8"))
    assert msg.args[0].dtype == np.dtype("<f8") and msg.args[0].tolist() == [0.0]
    with pytest.raises(UndecodableValue, match="no numpy dtype '<f7'"):
        dec.decode(frames("<f7"))  # well-formed, no such dtype here: the call's error
