"""Plain msgpack data in compiled code (``gpuexec/ipc/_plain.h``): the ring core's
``pack_plain`` / ``unpack_plain`` give msgspec's bytes and objects for plain values and
nothing for any other, as their Python twins do; a call with plain arguments takes the
compiled round trip in the driver and the ring core in the worker, and every value,
plain or not, arrives as it was sent."""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from value_kinds import ValueWorker, same

from gpuexec import Executor, RemoteError, ValueNotCarriedError
from gpuexec.ipc import ringcore

CORES = [ringcore.load("python")]
if ringcore.load("auto").NAME == "compiled":
    CORES.append(ringcore.load("compiled"))

BOUNDARY_INTS = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63,
                 2**64 - 1, -1, -32, -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1,
                 -2**63]
TEXT_LENGTHS = [0, 1, 31, 32, 255, 256, 65535, 65536]


def _plain_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(11 if depth < 4 else 7)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice(BOUNDARY_INTS)
    if kind == 2:
        return rng.choice([rng.uniform(-1e300, 1e300), -0.0, math.inf, -math.inf, 5e-324])
    if kind == 3:
        return "s" * rng.choice(TEXT_LENGTHS) + rng.choice(["", "é", "日本", "\U0001f600"])
    if kind == 4:
        return bytes(rng.choice(TEXT_LENGTHS))
    if kind in (5, 6):
        return rng.randrange(-10**6, 10**6)
    if kind in (7, 8):
        return [_plain_value(rng, depth + 1) for _ in range(rng.choice([0, 1, 15, 16, 40]))]
    return {f"k{i}": _plain_value(rng, depth + 1)
            for i in range(rng.choice([0, 1, 15, 16, 17]))}


def _nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


NOT_PLAIN = [(1,), {1}, frozenset(), 2**64, -2**63 - 1, "lone \udc80", {1: "int key"},
             bytearray(b"x"), 1 + 2j, [1, (2,)], {"k": {"set"}}, {"k": "\ud800"},
             _nested(33)]


@pytest.mark.parametrize("core", CORES, ids=lambda c: c.NAME)
def test_plain_values_are_msgspecs_bytes_both_ways(core: Any) -> None:
    rng = random.Random(7)
    for _ in range(2000):
        value = _plain_value(rng)
        data = msgspec.msgpack.encode(value)
        assert core.pack_plain(value) == data, value
        back = core.unpack_plain(data)
        assert back is not None and same(back[0], value)
    for value in (_nested(32), [float("nan")], {"": b""}, [], {}):
        data = msgspec.msgpack.encode(value)
        assert core.pack_plain(value) == data
        back = core.unpack_plain(data)
        assert back is not None and same(back[0], value)


@pytest.mark.parametrize("core", CORES, ids=lambda c: c.NAME)
def test_what_is_not_plain_is_left_to_the_codec(core: Any) -> None:
    for value in NOT_PLAIN:
        assert core.pack_plain(value) is None, value
    frames = [b"", b"\xc1", b"\x92\x01", b"\xa2\xff\xfe", b"\x81\x01\x02", b"\xd4\x01\x00",
              b"\x91\xc7\x00\x01", b"\x01\x02", b"\xdd\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff",
              msgspec.msgpack.encode(_nested(33))]
    for frame in frames:
        assert core.unpack_plain(frame) is None, frame


def test_a_float32_is_read_as_msgspec_reads_it() -> None:
    for core in CORES:
        assert core.unpack_plain(b"\xca\x3f\xc0\x00\x00") == (1.5,)


class _Str(str):
    pass


def _cases() -> Iterator[tuple[str, Any, Any]]:
    """(what, args, kwargs): plain ones of every kind and edge, then ones that are not."""
    yield "ints", tuple(BOUNDARY_INTS), {"n": -2**63}
    yield "floats", (-0.0, math.inf, 1e-310, float("nan")), {"x": 0.1}
    yield "text", tuple("é" * n for n in TEXT_LENGTHS), {"日本": "語"}
    yield "bytes", (b"", b"\x00" * 300, b"x" * 70000), None
    yield "containers", ([], {}, [[]], list(range(40)), {f"k{i}": i for i in range(20)}), {}
    yield "deep", (_nested(30),), {"d": {"a": {"b": [None, True, False]}}}
    yield "list args", [1, "x"], {"c": [1.0, 2.0]}
    yield "kwargs only", (), {"k": None}
    yield "other keywords", (1,), {"d": 2, "c": [3]}
    yield "fifteen keywords", (), {f"key{i}": i for i in range(15)}
    yield "sixteen keywords", (1,), {f"key{i}": i for i in range(16)}
    yield "33 positional and a keyword", tuple(range(33)), {"c": 1}
    for i, value in enumerate(NOT_PLAIN):
        yield f"not plain {i}", (1, value), None
    yield "not plain kwarg", (1,), {"k": (1, 2)}
    yield "str subclass", (_Str("s"),), None


@pytest.mark.parametrize("transport", ["shm", "zmq"])
def test_every_argument_arrives_as_sent_on_either_path(transport: str) -> None:
    """Plain arguments take the compiled steps on shared memory (the driver's round trip,
    the worker's ring core); the rest, and ZeroMQ, take the codec's: both give the worker
    what was sent, and its echo back."""
    with Executor(ValueWorker, 2, device="cpu", transport=transport) as ex:
        for what, args, kwargs in _cases():
            try:
                got = ex.collective_rpc("echo", args=args, kwargs=kwargs)
            except ValueNotCarriedError:
                assert what.startswith("not plain"), what  # a lone surrogate: refused
                continue
            want = [list(args), kwargs or {}]
            assert len(got) == 2 and all(same(g, want) for g in got), what


def test_a_plain_call_runs_no_python_in_the_driver_and_the_rest_does() -> None:
    """Over shared memory on the compiled core, a call with plain arguments runs no Python
    function in the driver below ``collective_rpc`` once its name is known; a value that
    is not plain goes through the executor's checks and the codec."""
    if ringcore.current().NAME != "compiled":
        pytest.skip("needs the compiled core (this process runs the pure-Python one)")
    with Executor(ValueWorker, 2, device="cpu", transport="shm") as ex:
        ex.collective_rpc("echo", args=(0,))  # (its name's pieces are then cached)
        seen: list[str] = []

        def profile(frame: Any, event: str, arg: Any) -> None:
            if event == "call":
                seen.append(frame.f_code.co_name)

        def traced(*args: Any, **kwargs: Any) -> Any:
            sys.setprofile(profile)
            try:
                return ex.collective_rpc("echo", *args, **kwargs)
            finally:
                sys.setprofile(None)

        ex.collective_rpc("profile", args=(True,))
        assert traced(args=(1, "x"), kwargs={"c": [1.0, 2.0]}) == \
            [[[1, "x"], {"c": [1.0, 2.0]}]] * 2
        worker_seen = ex.collective_rpc("profile", args=(False,))
        assert seen == ["collective_rpc"]
        # the worker: read and answered by its ring core, no decoder, no encoder
        assert all("echo" in s and "decode_header" not in s and "value_reply" not in s
                   for s in worker_seen), worker_seen
        seen.clear()
        ex.collective_rpc("profile", args=(True,))
        assert traced(args=((1,),)) == [[[(1,)], {}]] * 2
        worker_seen = ex.collective_rpc("profile", args=(False,))
        assert "_submit" in seen and "encode_with_segments" in seen
        assert all("decode_header" in s and "value_reply" in s for s in worker_seen)


def test_keywords_are_passed_by_name_and_a_repeated_one_as_the_decoder_reads_it() -> None:
    """The worker's ring core passes up to 15 plain keyword arguments by name (their names
    interned and kept from call to call, no dict); more take the dict. A map that names a
    keyword twice (no driver writes one) is read by the decoder, which keeps the last, as
    a dict does."""
    if ringcore.current().NAME != "compiled":
        pytest.skip("needs the compiled core (this process runs the pure-Python one)")
    from gpuexec import testing
    from gpuexec.ipc.codec import Encoder
    from gpuexec.ipc.messages import Call

    with Executor(ValueWorker, 2, device="cpu", transport="shm") as ex:
        for names in (["alpha", "beta"], ["alpha", "beta"], ["beta", "alpha"], ["gamma"]):
            assert ex.collective_rpc("keep", kwargs={n: 1 for n in names}) == \
                [[True] * len(names)] * 2
        many = {f"key{i}": i for i in range(16)}
        assert ex.collective_rpc("keep", kwargs=many) == [[False] * 16] * 2
        frame = Encoder(allow_pickle=False).encode(
            Call(2**62, "keep", None, [], {"kk": 1, "kx": 2}))[0]
        testing.send_raw(ex, [frame.replace(b"\xa2kx", b"\xa2kk")])  # {"kk": 1, "kk": 2}
        ex.check_health()
        assert ex.collective_rpc("kept") == [{"kk": 2}] * 2
        assert sum(sum(r.values()) for r in ex.stats().worker_malformed.values()) == 0


@pytest.mark.parametrize("kinds", [["int", "tuple"], ["tuple", "int"], ["int", "raise"],
                                   ["raise", "int"], ["int", "int"]])
@pytest.mark.parametrize("late_rank", [-1, 0, 1])
def test_results_of_every_kind_from_ranks_that_answer_apart(kinds: list[str],
                                                            late_rank: int) -> None:
    """A plain call's replies over shared memory: the plain results the driver's round
    trip reads where they lie, a value only the codec carries or a failure from another
    rank, at once or from a rank that answers after the driver's spin (a second wait):
    every result arrives as sent, with its type, the failure is raised as the rank's, and
    nothing is left behind in a ring (the next call's results are its own)."""
    with Executor(ValueWorker, 2, device="cpu", transport="shm") as ex:
        for _ in range(2):
            if "raise" in kinds:
                with pytest.raises(RemoteError) as info:
                    ex.collective_rpc("by_rank", (kinds, late_rank, 0.05))
                assert info.value.rank == kinds.index("raise")
                assert f"rank {kinds.index('raise')} raised" in str(info.value)
            else:
                got = ex.collective_rpc("by_rank", (kinds, late_rank, 0.05))
                want = [(7,) if k == "tuple" else 7 for k in kinds]
                assert got == want and [type(g) for g in got] == [type(w) for w in want]
            assert ex.collective_rpc("by_rank", (["int", "int"],)) == [7, 7]
            assert ex.collective_rpc("identity", ("x",)) == ["x", "x"]


def test_a_broken_call_frame_is_dropped_and_counted_by_the_worker() -> None:
    """Request frames the worker's ring core reads itself when they are calls with plain
    arguments: cut short anywhere, a name or a text that is not UTF-8, a keyword that is
    not a str, bytes after the end. Each is dropped and counted as the decoder counts
    it, and the worker goes on answering."""
    from gpuexec import testing
    from gpuexec.ipc.codec import Encoder
    from gpuexec.ipc.messages import Call

    frame = Encoder(allow_pickle=False).encode(
        Call(2**62, "echo", None, [1, "é", [1.5]], {"k": b"x"}))[0]
    broken = [frame[:n] for n in range(1, len(frame))]
    broken.append(frame.replace(b"echo", b"\xff\xfe\xfd\xfc"))
    broken.append(frame.replace("é".encode(), b"\xc3\x28"))
    broken.append(frame.replace(b"\x81\xa1k", b"\x81\x07"))  # {7: b"x"}
    broken.append(frame.replace(b"\x81\xa1k", b"\x81\xa1\xff"))  # a name not UTF-8
    broken.append(frame + b"\xc0")
    with Executor(ValueWorker, 2, device="cpu", transport="shm") as ex:
        assert ex.collective_rpc("echo", args=(1,)) == [[[1], {}]] * 2
        for f in broken:
            testing.send_raw(ex, [f])
        ex.check_health()
        dropped = [sum(n for n in reasons.values())
                   for reasons in ex.stats().worker_malformed.values()]
        assert dropped == [len(broken)] * 2
        assert ex.collective_rpc("echo", args=(2, "é"), kwargs={"k": [None]}) == \
            [[[2, "é"], {"k": [None]}]] * 2
