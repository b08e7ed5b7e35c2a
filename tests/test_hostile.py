"""Hostile use of the executor's newer surfaces, through the public API: per-rank
environments no process may be given, tcp hosts that are wildcards in disguise, raw
frames no driver sends, a worker whose ``rpc_target()`` raises, deferred replies through
Future subclasses that refuse their callbacks, a shutdown hook that cancels deferred
futures, executors nested in workers. Each bad input gets a typed error (before any
process starts where it is the executor's argument) and every worker lives on.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import wait_gone

from gpuexec import Executor, testing
from gpuexec.errors import (
    ConfigError,
    ExecutorClosedError,
    InvalidArgumentError,
    RemoteError,
    ValueNotCarriedError,
    WorkerStartupError,
)

TRANSPORTS = ["shm", "zmq"]


# -- per-rank environments ---------------------------------------------------------------


class _BrokenMapping(Mapping[str, str]):
    def __getitem__(self, key: str) -> str:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("cannot iterate")

    def __len__(self) -> int:
        return 1


class _Str(str):
    pass


# (env, world size 2, the rank named, the key named)
BAD_ENVS: list[tuple[Any, str, str]] = [
    ({"A": "x\ud800y"}, "every rank", "'A'"),
    ({"A\udcff": "x"}, "every rank", "A\\udcff"),
    ([{"A": "1"}, {"B": "\udc80"}], "rank 1", "'B'"),
    ([{"A": "1"}, {"\ud83d": "1"}], "rank 1", "\\ud83d"),
    (lambda rank: {"T": "ok" if rank == 0 else "\ud800"}, "rank 1", "'T'"),
    ({"A": np.str_("1")}, "every rank", "'A'"),
    ([{"A": "1"}, {"N": np.str_("x")}], "rank 1", "'N'"),
    ({np.str_("K"): "1"}, "every rank", "'K'"),
    ([{"A": "1"}, {"S": _Str("x")}], "rank 1", "'S'"),
    ({"A": b"1"}, "every rank", "'A'"),
    ([{"A": None}, {"A": "1"}], "rank 0", "'A'"),
    (lambda rank: {"I": rank}, "rank 0", "'I'"),
    ({"A": 1.5}, "every rank", "'A'"),
    ({b"A": "1"}, "every rank", "b'A'"),
    ([{"A": "1"}, {"": "1"}], "rank 1", "''"),
    ([{"A": "1"}, {"A=B": "1"}], "rank 1", "'A=B'"),
    ([{"A": "x\0"}, {"A": "1"}], "rank 0", "'A'"),
    ([{"A": "1"}, _BrokenMapping()], "rank 1", "cannot iterate"),
]


@pytest.mark.parametrize(("env", "rank", "key"), BAD_ENVS)
def test_hostile_env_is_a_config_error_naming_rank_and_key_before_any_start(
        env: Any, rank: str, key: str, no_leaks: None) -> None:
    with pytest.raises(ConfigError) as info:
        Executor("workers:EchoWorker", 2, device="cpu", env=env)
    text = str(info.value)
    assert rank in text and key in text, text
    text.encode()  # printable as it is: lone surrogates are escaped in the message


def test_a_good_env_still_reaches_every_rank(no_leaks: None) -> None:
    with Executor("workers:EchoWorker", 2, device="cpu",
                  env=lambda rank: {"GPUEXEC_T_RANK": f"r{rank}", "GPUEXEC_T_U": "é"}) as ex:
        assert ex.collective_rpc("env", args=("GPUEXEC_T_RANK", "GPUEXEC_T_U")) == [
            {"GPUEXEC_T_RANK": "r0", "GPUEXEC_T_U": "é"},
            {"GPUEXEC_T_RANK": "r1", "GPUEXEC_T_U": "é"}]


# -- tcp hosts ---------------------------------------------------------------------------

WILDCARDS = ["0", "0x0", "000.000.000.000", "0.0.0.0", " 0.0.0.0 ", "0.0", "0.0.0",
             "00", "0x00000000", "::", "::0", "0:0:0:0:0:0:0:0", "0000::0000", "[0::0]",
             "[::]", "::ffff:0.0.0.0", "::ffff:0:0", "[::ffff:0.0.0.0]", "*", "", " ",
             "[]", "0.0.0.0.", "0.0.0.0:5555", "tcp://0.0.0.0", "256.1.1.1",
             "no-such-host.invalid", "1.2.3", 0, None, b"127.0.0.1", ["127.0.0.1"]]


@pytest.mark.parametrize("host", WILDCARDS)
def test_tcp_hosts_that_are_wildcards_or_no_address_are_refused_before_any_start(
        host: Any, no_leaks: None) -> None:
    if host is None:
        host = "0.0.0.0" + "\0"
    with pytest.raises(ConfigError, match="host"):
        Executor("workers:EchoWorker", 1, device="cpu", transport="tcp", host=host)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "127.1", " 127.0.0.1 ",
                                  "[::1]", "::1"])
def test_tcp_hosts_naming_one_interface_still_work(host: str, no_leaks: None) -> None:
    if ":" in host and not _has_ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    with Executor("workers:EchoWorker", 1, device="cpu", transport="tcp", host=host) as ex:
        assert ex.collective_rpc("add", args=(1, 2)) == [3]
        for endpoint in ex.endpoints:
            assert "0.0.0.0" not in endpoint and "*" not in endpoint
            assert "127.0.0.1" in endpoint or "::1" in endpoint, endpoint


# -- raw frames --------------------------------------------------------------------------


@pytest.fixture(params=TRANSPORTS)
def ex(request: pytest.FixtureRequest, no_leaks: None) -> Iterator[Executor]:
    with Executor("hostile_workers:Deferring", 2, device="cpu",
                  transport=request.param) as executor:
        yield executor


@pytest.mark.parametrize("frames", [[], (), "abc", b"abc", [b"a", "b"], [None], [1],
                                    None, 5, {b"a": b"b"}, iter([b"a"]), [[b"a"]]])
def test_send_raw_refuses_what_is_no_message(ex: Executor, frames: Any) -> None:
    pids = [w.pid for w in ex.workers]
    with pytest.raises(InvalidArgumentError, match="frame"):
        testing.send_raw(ex, frames)
    ex.check_health()
    assert [w.pid for w in ex.workers] == pids
    assert ex.collective_rpc("rank_pid") == [(r, p) for r, p in enumerate(pids)]


def test_testing_helpers_refuse_what_is_not_an_executor_or_a_call(ex: Executor) -> None:
    for bad in (None, object(), "ex"):
        with pytest.raises(InvalidArgumentError, match="Executor"):
            testing.send_raw(bad, [b"x"])  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="Executor"):
            testing.call_unchecked(bad, "rank_pid")  # type: ignore[arg-type]
    for kw in ({"method": ""}, {"method": 5}, {"method": "rank_pid", "fn": "x"},
               {"method": "rank_pid", "args": "ab"}, {"method": "rank_pid", "kwargs": [1]},
               {"method": "rank_pid", "kwargs": {1: 2}}, {"method": "rank_pid", "timeout": -1},
               {"method": "rank_pid", "timeout": "1"}):
        with pytest.raises(InvalidArgumentError):
            testing.call_unchecked(ex, **kw)
    assert [r for r, _ in testing.call_unchecked(ex, "rank_pid")] == [0, 1]


@pytest.mark.parametrize("frames", [[b""], [b"", b""], [b"\xc1"], [b"\x00"],
                                    [b"\x00" * 64, b"x"], [b"\x91\x00", b"", b""],
                                    [bytearray(b"\xc1")], [memoryview(b"\x00\x01")]])
def test_workers_drop_and_count_frames_they_cannot_decode(ex: Executor, frames: Any) -> None:
    pids = [w.pid for w in ex.workers]
    testing.send_raw(ex, frames)
    ex.check_health()
    dropped = ex.stats().worker_malformed
    assert set(dropped) == {0, 1} and all(sum(d.values()) >= 1 for d in dropped.values())
    assert ex.collective_rpc("rank_pid") == [(r, p) for r, p in enumerate(pids)]


# -- rpc_target() ------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("worker", "kind", "rank", "text"), [
    ("hostile_workers:TargetRaises", "error", None, "no target on rank"),
    ("hostile_workers:TargetRaises", "exit", None, "SystemExit"),
    ("hostile_workers:TargetRaises", "interrupt", None, "no target"),
    ("hostile_workers:TargetRaisesOnOneRank", None, 1, "rank 1 has no target"),
])
def test_a_raising_rpc_target_is_a_startup_error_from_the_constructor(
        transport: str, worker: str, kind: str | None, rank: int | None, text: str,
        no_leaks: None) -> None:
    kwargs = {"kind": kind} if kind else {}
    with pytest.raises(WorkerStartupError) as info:
        Executor(worker, 2, device="cpu", transport=transport, worker_kwargs=kwargs)
    e = info.value
    assert e.rank == rank or rank is None, str(e)  # every rank raises: the first to tell
    assert "rpc_target" in str(e), str(e)
    assert text in e.remote_traceback and "rpc_target" in e.remote_traceback


# -- deferred replies --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["error", "exit", "interrupt", "after"])
def test_a_future_refusing_its_done_callback_fails_that_call_and_the_worker_lives(
        ex: Executor, kind: str) -> None:
    pids = [w.pid for w in ex.workers]
    for mode in ("blocking", "non_block"):
        if kind == "after":  # it called back first: that reply wins, the error is late
            if mode == "non_block":
                assert ex.collective_rpc("refusing", args=(kind,), non_block=True
                                         ).result(30) == [1, 1]
            else:
                assert ex.collective_rpc("refusing", args=(kind,), timeout=30) == [1, 1]
            continue
        with pytest.raises(RemoteError) as info:
            if mode == "blocking":
                ex.collective_rpc("refusing", args=(kind,), timeout=30)
            else:
                ex.collective_rpc("refusing", args=(kind,), non_block=True).result(30)
        assert info.value.rank == 0 and "add_done_callback" in info.value.remote_traceback
    with pytest.raises(RemoteError, match="result\\(\\) is broken"):
        ex.collective_rpc("broken_result", timeout=30)
    assert ex.collective_rpc("rank_pid") == [(r, p) for r, p in enumerate(pids)]
    assert not ex.is_failed


def _exits_of(pids: list[int]) -> None:
    assert wait_gone(pids) == []


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_shutdown_hook_cancelling_many_deferred_futures_does_not_hang_shutdown(
        transport: str, tmp_path: Path, no_leaks: None) -> None:
    marker = str(tmp_path / "hook")
    ex = Executor("hostile_workers:Deferring", 2, device="cpu", transport=transport,
                  worker_kwargs={"marker": marker}, shutdown_timeout=60)
    futures = [ex.collective_rpc("later", non_block=True) for _ in range(1000)]
    ex.check_health()  # every "later" call has run: 1000 futures wait in each worker
    pids = [w.pid for w in ex.workers]
    ex.shutdown()  # graceful: the hook ran to its end (no SIGTERM cut it short)
    _exits_of(pids)
    assert [Path(f"{marker}.{r}").read_text() for r in range(2)] == ["1000", "1000"]
    for f in futures[:10]:
        with pytest.raises(ExecutorClosedError):
            f.result(timeout=30)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_hook_run_by_sigterm_drops_its_replies_too(
        transport: str, tmp_path: Path, no_leaks: None) -> None:
    marker = str(tmp_path / "hook")
    with Executor("hostile_workers:Deferring", 1, device="cpu", transport=transport,
                  worker_kwargs={"marker": marker}) as ex:
        for _ in range(500):
            ex.collective_rpc("later", non_block=True)
        ex.check_health()
        pid = ex.workers[0].pid
        os.kill(pid, signal.SIGTERM)
        _exits_of([pid])
        assert Path(f"{marker}.0").read_text() == "500"


# -- deep and cyclic values --------------------------------------------------------------


def _wrap(kind: str, v: Any, i: int) -> Any:
    if kind == "list":
        return [v]
    if kind == "tuple":
        return (v, 1)
    if kind == "dict":
        return {"k": v}
    if kind == "intdict":
        return {1: v}
    if kind == "frozenset":
        return frozenset([v])
    return [(v,), {"k": {i: v}}][i % 2]  # mixed


def _nest(kind: str, depth: int) -> Any:
    v: Any = 0
    for i in range(depth):
        v = _wrap(kind, v, i)
    return v


def _cycles() -> list[Any]:
    a: list[Any] = [1]
    a.append(a)
    d: dict[str, Any] = {}
    d["self"] = d
    deep: list[Any] = [[[[]]]]
    deep[0][0][0].append(deep)
    via_tuple: list[Any] = []
    via_tuple.append((via_tuple,))
    via_dict_key: dict[Any, Any] = {}
    via_dict_key[1] = [via_dict_key]
    return [a, d, deep, via_tuple, via_dict_key]


KINDS = ["list", "tuple", "dict", "intdict", "frozenset", "mixed"]


@pytest.mark.parametrize("limit", [None, 100_000])
def test_values_nested_too_deep_or_cyclic_fail_naming_the_path(
        ex: Executor, limit: int | None) -> None:
    if limit is not None:
        old = sys.getrecursionlimit()
        sys.setrecursionlimit(limit)
    try:
        for kind in KINDS:
            for depth in (150, 300, 2_000, 5_000):
                for where in ("args", "kwargs"):
                    kw: dict[str, Any] = {"args": (_nest(kind, depth),)} if where == "args" \
                        else {"kwargs": {"x": _nest(kind, depth)}}
                    with pytest.raises(ValueNotCarriedError) as info:
                        ex.collective_rpc(lambda w, *a, **k: None, timeout=60, **kw)
                    assert info.value.path.startswith(where), info.value.path
                    assert "deeper than" in info.value.reason
        for value in _cycles():
            with pytest.raises(ValueNotCarriedError, match="itself") as info:
                ex.collective_rpc(lambda w, v: None, args=(value,), timeout=60)
            assert info.value.path.startswith("args[0]")
            with pytest.raises(ValueNotCarriedError, match="itself"):
                ex.collective_rpc("echo", args=(value,), non_block=True)
    finally:
        if limit is not None:
            sys.setrecursionlimit(old)
    assert [r for r, _ in ex.collective_rpc("rank_pid")] == [0, 1]


@pytest.mark.parametrize("limit", [None, 100_000])
def test_results_nested_too_deep_or_cyclic_fail_that_call_and_the_worker_lives(
        ex: Executor, limit: int | None) -> None:
    def deep(w: Any, kind: str, depth: int, raise_limit: bool) -> Any:
        if raise_limit:
            sys.setrecursionlimit(100_000)
        return _nest(kind, depth)

    def cyclic(w: Any, i: int) -> Any:
        return _cycles()[i]

    pids = [w.pid for w in ex.workers]
    for kind in KINDS:
        for depth in (300, 2_000):
            with pytest.raises(ValueNotCarriedError) as info:
                ex.collective_rpc(deep, args=(kind, depth, limit is not None), timeout=60)
            assert info.value.path.startswith("result"), info.value.path
    for i in range(len(_cycles())):
        with pytest.raises(ValueNotCarriedError, match="itself"):
            ex.collective_rpc(cyclic, args=(i,), timeout=60)
    assert ex.collective_rpc("rank_pid") == [(r, p) for r, p in enumerate(pids)]


def test_values_nested_within_the_limit_arrive_faithfully(ex: Executor) -> None:
    for kind in KINDS:
        value = _nest(kind, 60)
        assert ex.collective_rpc(lambda w, v: v, args=(value,), timeout=60) == [value, value]
        assert ex.collective_rpc(lambda w, **k: k, kwargs={"v": value}, timeout=60) == \
            [{"v": value}] * 2
    shared = [1, 2]
    twice = [shared, (shared, {"a": shared})]  # shared, not cyclic: fine
    assert ex.collective_rpc(lambda w, v: v, args=(twice,))[0] == twice


# -- converted values --------------------------------------------------------------------


@dataclass
class _Holder:
    item: Any


def _views_and_files(tmp: Path) -> list[Any]:
    (tmp / "f.txt").write_text("hello")
    text = open(tmp / "f.txt")
    raw = open(tmp / "f.txt", "rb")
    two_d = memoryview(np.arange(6, dtype=np.int32).reshape(2, 3))  # type: ignore[arg-type]
    return [memoryview(b"abc"), two_d, memoryview(bytearray(b"xy")), text, raw, sys.stdout,
            [1, memoryview(b"q")], {"k": (text,)}, _Holder(memoryview(b"z")), _Holder(text),
            [_Holder(1), _Holder(memoryview(b"z"))]]


def test_memoryviews_and_open_files_are_refused_both_ways(ex: Executor, tmp_path: Path
                                                          ) -> None:
    values = _views_and_files(tmp_path)
    try:
        for i, value in enumerate(values):
            with pytest.raises(ValueNotCarriedError) as info:
                ex.collective_rpc(lambda w, v: None, args=(value,))
            assert info.value.path.startswith("args[0]"), (i, info.value.path)

            def back(w: Any, tmp: str, i: int) -> Any:
                return _views_and_files(Path(tmp))[i]

            with pytest.raises(ValueNotCarriedError) as info:
                ex.collective_rpc(back, args=(str(tmp_path), i), timeout=60)
            assert info.value.path.startswith("result"), (i, info.value.path)
    finally:
        for v in values:
            if hasattr(v, "close") and v is not sys.stdout:
                v.close()
    assert [r for r, _ in ex.collective_rpc("rank_pid")] == [0, 1]


@pytest.mark.parametrize("kind", ["dict", "int"])
def test_a_pickle_that_rebuilds_another_type_is_refused_both_ways(ex: Executor, kind: str
                                                                 ) -> None:
    import hostile_workers

    value = hostile_workers.becomes(kind)
    for outer in (value, [value], {"k": (1, value)}, {value: 1} if kind == "int" else [[value]]):
        with pytest.raises(ValueNotCarriedError) as info:
            ex.collective_rpc(lambda w, v: None, args=(outer,), timeout=60)
        assert info.value.rank in (0, 1)
    with pytest.raises(ValueNotCarriedError) as info:
        ex.collective_rpc(lambda w: hostile_workers.becomes(kind), timeout=60)
    assert "Becomes" in str(info.value)
    assert [r for r, _ in ex.collective_rpc("rank_pid")] == [0, 1]


# -- arrays ------------------------------------------------------------------------------


def _arrays() -> list[Any]:
    meta = np.dtype(np.int32, metadata={"unit": "m"})
    out: list[Any] = []
    for n in (3, 2_000, 300_000):  # inline, an out-of-band frame, a shared-memory payload
        out.append(np.arange(n, dtype=meta))
        ro = np.arange(n, dtype=np.float64)
        ro.flags.writeable = False
        out.append(ro)
        ro_meta = np.arange(n, dtype=meta)
        ro_meta.flags.writeable = False
        out.append(ro_meta)
        view = np.arange(2 * n, dtype=np.int64)[::2]  # not contiguous, read-only view
        view.flags.writeable = False
        out.append(view)
    rec = np.zeros(4, dtype=[("a", "i4"), ("b", "f8")])
    rec.flags.writeable = False
    out.append(rec)
    return out


def _check_arrays(sent: list[Any], got: Any) -> list[str]:
    """What differs between the arrays sent and those rebuilt (each wrapped: bare, in a
    list, in a dataclass, in a dict of dataclasses)."""
    problems = []
    for i, (a, forms) in enumerate(zip(sent, got, strict=True)):
        bare, in_list, held, batch = forms
        for where, b in (("bare", bare), ("list", in_list[0]), ("dataclass", held.item),
                         ("batch", batch["y"].item)):
            if type(b) is not np.ndarray or b.dtype != a.dtype or \
                    b.dtype.metadata != a.dtype.metadata or not np.array_equal(a, b):
                problems.append(f"{i} {where}: {b.dtype} {b.dtype.metadata}")
            elif not b.flags.writeable:
                problems.append(f"{i} {where}: read-only")
    return problems


def _forms(a: Any) -> list[Any]:
    return [a, [a], _Holder(a), {"x": _Holder(1), "y": _Holder(a)}]


def test_arrays_keep_dtype_metadata_and_arrive_writable_both_ways(ex: Executor) -> None:
    sent = _arrays()
    payload = [_forms(a) for a in sent]

    def check(w: Any, got: Any) -> list[str]:
        return _check_arrays(_arrays(), got)

    assert ex.collective_rpc(check, args=(payload,), timeout=120) == [[], []]

    def back(w: Any) -> Any:
        return [_forms(a) for a in _arrays()]

    for got in ex.collective_rpc(back, timeout=120):
        assert _check_arrays(sent, got) == []


# -- executors nested in workers ---------------------------------------------------------


@pytest.mark.parametrize("inner", TRANSPORTS)
@pytest.mark.parametrize("outer", TRANSPORTS)
@pytest.mark.parametrize("how", ["shutdown", "sigterm", "sigkill"])
def test_an_executor_a_worker_never_shuts_down_is_cleaned_with_it(
        outer: str, inner: str, how: str, no_leaks: None) -> None:
    ex = Executor("hostile_workers:HostsExecutor", 1, device="cpu", transport=outer)
    endpoints, inner_pids, value = ex.collective_rpc("build", args=(inner,), timeout=120)[0]
    assert value == [3]
    outer_pid = ex.workers[0].pid
    if how == "shutdown":
        ex.shutdown()
    else:
        os.kill(outer_pid, signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        assert wait_gone([outer_pid], timeout=30) == []
        ex.shutdown()
    assert wait_gone([outer_pid, *inner_pids], timeout=30) == []
    for endpoint in endpoints:
        path = endpoint.removeprefix("ipc://")
        if path != endpoint:
            assert wait_gone_path(Path(path).parent), endpoint


def wait_gone_path(path: Path, timeout: float = 30.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not path.exists()
