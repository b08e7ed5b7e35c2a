"""What goes in comes out: every value of a call arrives with the same type and an equal
value, or the call fails with ValueNotCarriedError naming where the value sat (and the
rank, when a worker was involved). Both transports, both directions (arguments rebuilt
in the worker, results built in the worker), arguments and keyword arguments, any depth.

The property test prints its seed; rerun one with ``GPUEXEC_VALUES_SEED=<seed>``, and
more examples with ``GPUEXEC_VALUES_EXAMPLES=<n>``.
"""

from __future__ import annotations

import datetime
import enum
import os
import random
import tempfile
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction
from typing import Any

import cloudpickle
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from value_kinds import (
    Color,
    Frozen,
    Level,
    Pair,
    Perm,
    Plain,
    Point,
    ValueWorker,
    _Boom,
    _ExitOnLoad,
    ghost,
    main_class,
    same,
)

from gpuexec import Executor, RemoteError
from gpuexec.errors import ValueNotCarriedError
from gpuexec.ipc.codec import Encoder
from gpuexec.ipc.messages import Reply

SEED = int(os.environ.get("GPUEXEC_VALUES_SEED", random.randrange(1 << 32)))
EXAMPLES = int(os.environ.get("GPUEXEC_VALUES_EXAMPLES", "40"))
MainThing = main_class()


@pytest.fixture(scope="module", params=["zmq", "shm"])
def ex(request: pytest.FixtureRequest) -> Iterator[Executor]:
    # rpc_timeout: a value the codec lost would fail the test instead of hanging it
    with Executor(ValueWorker, 2, device="cpu", transport=request.param,
                  rpc_timeout=120) as ex:
        yield ex


@pytest.fixture(scope="module")
def strict_ex() -> Iterator[Executor]:
    with Executor(ValueWorker, 1, device="cpu", transport="shm", allow_callables=False,
                  rpc_timeout=120) as ex:
        yield ex


# -- the kinds of the table, one by one ----------------------------------------

TABLE = {
    "dataclass": Point(1, "a"),
    "frozen dataclass": Frozen("f", (1, 2)),
    "dataclass in a list in a dict": {"k": [Point((1, 2), Color.RED)]},
    "enum": Color.RED,
    "IntFlag": Perm.R | Perm.W,
    "IntEnum": Level.HIGH,
    "set": {1, "a", (2, 3)},
    "frozenset": frozenset({1, 2}),
    "tuple": (1, "a", None),
    "nested tuples": ((1, (2, (3,))), ()),
    "namedtuple": Pair(1, (2, 3)),
    "datetime": datetime.datetime(2026, 11, 29, 6, 0, 1, 5,
                                  tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
    "date": datetime.date(2026, 11, 29),
    "timedelta": datetime.timedelta(days=1, microseconds=3),
    "UUID": uuid.UUID(int=12345),
    "Decimal": Decimal("1.10"),
    "bytearray": bytearray(b"\x00ab"),
    "OrderedDict": OrderedDict([("b", 1), ("a", 2)]),
    "int beyond 64 bits": [1 << 64, -(1 << 63) - 1, 1 << 300],
    "complex": 1.5 - 2j,
    "Fraction": Fraction(2, 7),
    "deque": deque([1, (2,)], maxlen=5),
    "dict with int and tuple keys": {1: "a", (2, "b"): [3], None: 0.5},
    "lone surrogates": {"k\udc80": "v\ud800"},
    # (numpy.longlong is left to the strict test: pickle, the oracle here, makes it int64)
    "numpy scalars": [np.float32(1.5), np.int8(-3), np.uint64(7), np.bool_(True)],
    "0-d array": np.array(2.5),
    "arrays": [np.arange(6).reshape(2, 3), np.zeros((3, 0)), np.arange(2000.0)[::2],
               np.arange(3, dtype=">i4")],
    "tensors": [torch.arange(4), torch.tensor(3.0), torch.ones(2, dtype=torch.bfloat16)],
    "tensor that needs autograd": torch.ones(2, requires_grad=True),
    "user class": Plain([1, (2,)]),
    "class in __main__": MainThing((1, 2)),
    "big array in a dataclass": Point(np.arange(300_000.0), (np.ones(5000),)),
}


@pytest.mark.parametrize("kind", list(TABLE))
def test_every_kind_keeps_its_type_both_ways(ex: Executor, kind: str) -> None:
    v = TABLE[kind]
    for out in ex.collective_rpc("identity", args=(v,)):
        assert same(out, v), (kind, out)
    for args, kwargs in ex.collective_rpc("echo", args=(v,), kwargs={"k": (v,)}):
        assert same(args, [v]) and same(kwargs, {"k": (v,)})
    assert ex.collective_rpc("check", args=([v], cloudpickle.dumps([v]))) == [[], []]
    assert all(same(out, v) for out in ex.collective_rpc("build", args=(cloudpickle.dumps(v),)))


# -- the property ------------------------------------------------------------------------

_ints = st.one_of(st.integers(), st.integers(min_value=1 << 64, max_value=1 << 200),
                  st.integers(min_value=-(1 << 200), max_value=-(1 << 63) - 1))
_texts = st.one_of(st.text(max_size=6), st.text(st.characters(min_codepoint=0xD800,
                                                               max_codepoint=0xDFFF),
                                                 min_size=1, max_size=3))
_tz = st.sampled_from([None, datetime.timezone.utc,
                       datetime.timezone(datetime.timedelta(hours=-5))])
_stdlib = st.one_of(
    st.datetimes(timezones=_tz), st.dates(), st.times(), st.timedeltas(), st.uuids(),
    st.decimals(allow_nan=False, places=3), st.fractions(max_denominator=1000),
    st.complex_numbers(allow_nan=False), st.sampled_from([*Color, *Level, Perm.R | Perm.X]),
)
_hashable = st.recursive(
    st.one_of(st.none(), st.booleans(), _ints, st.floats(allow_nan=False), _texts,
              st.binary(max_size=6), _stdlib),
    lambda c: st.one_of(st.tuples(c, c), st.frozensets(c, max_size=3), st.builds(Pair, c, c),
                        st.builds(Frozen, st.text(max_size=3), st.tuples(c))),
    max_leaves=4)
_dtypes = st.sampled_from(["<f8", "<f4", "<f2", "<i8", "<u2", "|i1", "|b1", "<c16",
                           "<M8[s]", "<U3", "|S2"])
_shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
_np_scalars = st.builds(lambda t, x: t(x), st.sampled_from(
    [np.float32, np.float64, np.int8, np.uint64, np.int64, np.bool_,
     np.complex64, np.float16]), st.integers(0, 100))
_arrays = hnp.arrays(_dtypes, _shapes)
# Byte-swapped arrays stay contiguous here: pickle, the oracle of the "build" direction,
# turns a strided one into native order (the codec keeps it: see the TABLE test).
_swapped = hnp.arrays(">i4", _shapes)
_big_arrays = st.builds(lambda n, dt: np.arange(n).astype(dt), st.sampled_from([600, 5000]),
                        st.sampled_from(["<f8", "<i4", "|u1"]))
_tensors = st.builds(
    lambda a, dt: torch.from_numpy(a).to(dt),
    hnp.arrays("<f4", hnp.array_shapes(min_dims=0, max_dims=2, max_side=5),
               elements=st.floats(-1e3, 1e3, width=32)),
    st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.bool]))
_leaves = st.one_of(
    st.none(), st.booleans(), _ints, st.floats(), _texts, st.binary(max_size=8),
    st.binary(max_size=4).map(bytearray), _stdlib, _np_scalars, _arrays, _big_arrays, _swapped,
    _arrays.map(lambda a: a[::-1] if a.ndim else a), _tensors)


def _containers(c: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(c, max_size=4), st.lists(c, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=4), c, max_size=3),
        st.dictionaries(_hashable, c, max_size=3),
        st.sets(_hashable, max_size=3), st.frozensets(_hashable, max_size=3),
        st.dictionaries(st.text(max_size=3), c, max_size=3).map(OrderedDict),
        st.lists(c, max_size=3).map(deque),
        st.builds(Point, c, c), st.builds(Pair, c, c), st.builds(Plain, c),
        st.builds(MainThing, c), st.builds(Frozen, st.text(max_size=2), st.tuples(_hashable)),
    )


VALUES = st.recursive(_leaves, _containers, max_leaves=8)
_PROPERTY = settings(max_examples=EXAMPLES, deadline=None, database=None,
                     suppress_health_check=list(HealthCheck))


def test_print_seed() -> None:
    print(f"\nfaithful-values property seed: GPUEXEC_VALUES_SEED={SEED}")


@seed(SEED)
@_PROPERTY
@given(st.lists(VALUES, min_size=1, max_size=6))
def test_property_every_value_round_trips(ex: Executor, batch: list[Any]) -> None:
    """Arguments rebuilt in the worker, keyword arguments, results built in the worker,
    and the echo of all of it: the same types and equal values, every time."""
    blob = cloudpickle.dumps(batch)
    assert ex.collective_rpc("check", args=(batch, blob)) == [[], []], SEED
    for out in ex.collective_rpc("build", args=(blob,)):
        assert same(out, batch), SEED
    for args, kwargs in ex.collective_rpc("echo", args=tuple(batch), kwargs={"v": batch}):
        assert same(args, batch) and same(kwargs, {"v": batch}), SEED


_NO_PICKLE = {type(None), bool, int, float, str, bytes, bytearray, complex, list, dict, tuple,
              set, frozenset}


def _needs_pickle(v: Any) -> bool:
    """The table of :mod:`gpuexec.ipc.values`: what has no carrier of its own."""
    t = type(v)
    if t in (list, tuple, set, frozenset):
        return any(map(_needs_pickle, v))
    if t is dict:
        return any(_needs_pickle(k) or _needs_pickle(x) for k, x in v.items())
    if t is np.ndarray or isinstance(v, np.generic):
        return False
    if t is torch.Tensor:
        return v.requires_grad
    return t not in _NO_PICKLE


@seed(SEED)
@_PROPERTY
@given(VALUES)
def test_property_without_pickle_same_value_or_typed_error(strict_ex: Executor,
                                                           v: Any) -> None:
    """Where pickle is refused, a value either arrives intact or is refused before
    anything is sent, naming where it sat: never converted."""
    calls = strict_ex.stats().calls
    try:
        out = strict_ex.collective_rpc("identity", args=(v,))[0]
    except ValueNotCarriedError as e:
        assert _needs_pickle(v), (SEED, e)
        assert e.rank is None and e.path.startswith("args[0]") and "needs pickle" in e.reason
        assert strict_ex.stats().calls == calls  # nothing was sent
        return
    assert not _needs_pickle(v), SEED
    assert same(out, v), SEED


# -- refusals and faults: each ends its call with the typed error ------------------------

def test_unpicklable_argument_is_refused_before_sending(ex: Executor) -> None:
    import threading

    calls = ex.stats().calls
    with pytest.raises(ValueNotCarriedError) as info:
        ex.collective_rpc("identity", args=({"k": [1, 2, threading.Lock()]},))
    e = info.value
    assert (e.path, e.type_name, e.rank, e.method) == ("args[0]['k'][2]", "_thread.lock",
                                                       None, "identity")
    assert "pickling it raised TypeError" in e.reason and isinstance(e, TypeError)
    with pytest.raises(ValueNotCarriedError, match=r"kwargs\['x'\]\[0\]"):
        ex.collective_rpc("echo", kwargs={"x": (threading.Lock(),)})
    assert ex.stats().calls == calls


def test_cuda_tensor_is_refused_with_what_to_do(ex: Executor) -> None:
    t = torch.empty(2, device="meta")
    with pytest.raises(ValueNotCarriedError, match="move it to the CPU") as info:
        ex.collective_rpc("identity", args=((1, t),))
    assert info.value.path == "args[0][1]"


def test_unsendable_result_names_rank_and_path(ex: Executor) -> None:
    with pytest.raises(ValueNotCarriedError) as info:
        ex.collective_rpc("return_lock")
    e = info.value
    assert (e.rank, e.path, e.type_name) == (0, "result['k'][1]", "_thread.lock")
    assert "(rank 1 failed too: see .errors)" in str(e)
    assert sorted(e.errors) == [0, 1] and e.errors[0] is e
    assert isinstance(e.errors[1], ValueNotCarriedError) and e.errors[1].rank == 1
    assert ex.collective_rpc("identity", args=(1,)) == [1, 1]


def test_argument_class_missing_in_the_worker(ex: Executor) -> None:
    thing = ghost(tempfile.mkdtemp(), f"ghost_arg_{os.getpid()}_{id(ex)}")
    with pytest.raises(ValueNotCarriedError, match="No module named") as info:
        ex.collective_rpc("identity", args=(1, [thing]))
    e = info.value
    assert e.rank == 0 and e.path == "args[1][0]" and e.type_name.endswith(".Ghost")
    assert "unpickling it in the worker raised ModuleNotFoundError" in e.reason
    assert ex.collective_rpc("identity", args=((1,),)) == [(1,), (1,)]


def test_result_class_missing_in_the_driver(ex: Executor) -> None:
    with pytest.raises(ValueNotCarriedError, match="No module named") as info:
        ex.collective_rpc("return_ghost", args=(tempfile.mkdtemp(), f"ghost_res_{id(ex)}"))
    assert (info.value.rank, info.value.path) == (0, "result")
    assert "unpickling it in the driver raised ModuleNotFoundError" in info.value.reason
    assert ex.collective_rpc("identity", args=(2,)) == [2, 2]


def test_reduce_failing_on_load_either_way(ex: Executor) -> None:
    with pytest.raises(ValueNotCarriedError, match="no way back") as info:
        ex.collective_rpc("identity", args=(np.ones(3), _Boom()))
    assert (info.value.rank, info.value.path) == (0, "args[1]")
    with pytest.raises(ValueNotCarriedError, match="no way back") as info:
        ex.collective_rpc("return_boom", args=(1,))
    assert (info.value.rank, info.value.path) == (1, "result['bad'][0]")  # only rank 1's
    assert ex.collective_rpc("identity", args=(3,)) == [3, 3]


def test_system_exit_while_unpickling_is_contained(ex: Executor) -> None:
    """SystemExit (and, off the main thread, KeyboardInterrupt) raised while a value is
    unpickled ends that call only: never the worker, the caller or the monitor thread."""
    pids = ex.collective_rpc("pid")
    with pytest.raises(ValueNotCarriedError, match="SystemExit") as info:
        ex.collective_rpc("identity", args=(_ExitOnLoad(),))
    assert info.value.rank == 0
    with pytest.raises(ValueNotCarriedError, match="in the driver raised SystemExit"):
        ex.collective_rpc("return_exit_on_load")
    # The same from a future: whoever decodes it (the monitor thread included) survives.
    futures = [ex.collective_rpc(m, non_block=True) for m in
               ("return_exit_on_load", "return_interrupt_on_load", "return_exit_on_load")]
    for f in futures:
        assert isinstance(f.exception(timeout=30), ValueNotCarriedError)
    assert ex.collective_rpc("identity", args=(4,), non_block=True).result(timeout=30) == [4, 4]
    assert ex.collective_rpc("pid") == pids


def test_exception_whose_str_raises_keeps_the_worker(ex: Executor) -> None:
    pids = ex.collective_rpc("pid")
    with pytest.raises(RemoteError) as info:
        ex.collective_rpc("raise_unprintable")
    assert info.value.type_name == "value_kinds.Unprintable"
    assert "str() of the value_kinds.Unprintable raised RuntimeError" in \
        info.value.remote_message
    with pytest.raises(RemoteError, match="raised SystemExit"):
        ex.collective_rpc("raise_untypeable")
    assert ex.collective_rpc("pid") == pids


def test_lone_surrogate_message_arrives_as_it_was(ex: Executor) -> None:
    with pytest.raises(RemoteError) as info:
        ex.collective_rpc("raise_surrogate", ranks=[1])
    assert (info.value.rank, info.value.type_name) == (1, "ValueError")
    assert info.value.remote_message == "bad \udc80 text"
    assert "bad \udc80 text" in info.value.remote_traceback


@pytest.mark.parametrize("method", ["raise_exit", "raise_interrupt"])
def test_base_exceptions_from_user_code_are_remote_errors(ex: Executor, method: str) -> None:
    pids = ex.collective_rpc("pid")
    with pytest.raises(RemoteError) as info:
        ex.collective_rpc(method)
    assert info.value.type_name in ("SystemExit", "KeyboardInterrupt")
    assert ex.collective_rpc("pid") == pids


def test_without_pickle_types_with_carriers_of_their_own_still_travel(
        strict_ex: Executor) -> None:
    v = [(1, {2, 3}), frozenset({"a"}), {(1, 2): 1j}, bytearray(b"x"), 1 << 70,
         np.float16(1.5), np.longlong(3), np.array(1), torch.tensor([1, 2]), "\udc80"]
    assert same(strict_ex.collective_rpc("identity", args=(v,))[0], v)
    for refused in (Point(1, 2), Color.RED, datetime.date(2026, 1, 1), OrderedDict(a=1)):
        with pytest.raises(ValueNotCarriedError, match="allow_callables=False"):
            strict_ex.collective_rpc("identity", args=([1, refused],))


@pytest.mark.parametrize("make", [np.array, torch.tensor])
def test_zero_d_arrays_keep_their_shape(ex: Executor, make: Any) -> None:
    for value in (make(5), make(2.5), make(True)):
        for out in ex.collective_rpc("identity", args=(value,)):
            assert same(out, value) and out.shape == ()
        built = ex.collective_rpc("build", args=(cloudpickle.dumps(value),))
        assert all(same(out, value) for out in built)


def test_containers_of_arrays_keep_the_buffers_out_of_band() -> None:
    """Tuples and pickled dataclasses of arrays: the array bytes still travel as frames
    of their own, not copied into the message body."""
    a, b = np.ones(4096), np.zeros(2048)
    frames = Encoder(allow_pickle=True).encode(Reply(1, 0, (a, Point(b, 1))))
    assert len(frames) == 3 and len(frames[0]) < 1024
    assert {memoryview(f).nbytes for f in frames[1:]} == {a.nbytes, b.nbytes}


class _Mode(enum.Enum):  # a kind the strict executor must refuse inside a tuple key
    A = 1


def test_refused_dict_key_names_the_key(strict_ex: Executor) -> None:
    with pytest.raises(ValueNotCarriedError) as info:
        strict_ex.collective_rpc("identity", args=({(1, _Mode.A): 2},))
    assert info.value.path == "args[0]<key (1, <_Mode.A: 1>)>[1]"


def test_many_objects_are_pickled_once_and_errors_still_name_the_object(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A dict of dataclasses is one pickle (each one costs a fixed time), and when that
    pickle fails, the error still names the very value that could not be pickled."""
    import threading

    from gpuexec.ipc import values

    pickled: list[Any] = []
    dumps = values.dumps
    def counted(v: Any, callback: Any) -> bytes:
        pickled.append(v)
        return dumps(v, callback)

    monkeypatch.setattr(values, "dumps", counted)
    enc = Encoder(allow_pickle=True)
    step = {f"r{i}": Point(i, (i, Color.RED)) for i in range(8)}
    enc.encode(Reply(1, 0, [step, np.ones(2)]))
    assert pickled == [step]
    with pytest.raises(ValueNotCarriedError) as info:
        enc.encode(Reply(1, 0, {**step, "bad": Point(threading.Lock(), 1)}))
    assert (info.value.path, info.value.type_name) == ("result['bad']", "value_kinds.Point")


def test_pickle_refused_with_out_of_band_buffers_is_answered_not_dropped() -> None:
    """A worker that refuses pickle still accounts for the pickle's buffers, so the call
    gets the error (a dropped message would leave it waiting)."""
    from gpuexec.ipc.codec import Decoder, UndecodableValue
    from gpuexec.ipc.messages import Call, ToWorker

    frames = Encoder(allow_pickle=True).encode(Call(7, "m", None, [Point(np.ones(4096), 1)],
                                                    {}))
    assert len(frames) == 2
    with pytest.raises(UndecodableValue) as info:
        Decoder(ToWorker, allow_pickle=False).decode(frames)
    assert info.value.envelope.call_id == 7 and info.value.fault.path == "args[0]"
