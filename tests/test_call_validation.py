"""Every argument of a call is checked before anything is sent: a bad one raises
``InvalidArgumentError`` (a ``ValueError`` and a ``TypeError``) naming it, no worker sees
a request (none is sent, none is dropped), and the executor stays usable."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from workers import EchoWorker

from gpuexec import ConfigError, Executor
from gpuexec.errors import InvalidArgumentError


@pytest.fixture(scope="module", params=["zmq", "shm"])
def ex(request: pytest.FixtureRequest) -> Iterator[Executor]:
    with Executor(EchoWorker, 2, device="cpu", transport=request.param) as executor:
        yield executor


BAD_CALLS: list[tuple[str, Callable[[Executor], Any], str]] = [
    ("args str", lambda ex: ex.collective_rpc("echo", args="abc"),
     "args must be a tuple or a list"),
    ("args dict", lambda ex: ex.collective_rpc("echo", args={"a": 1}),
     "args must be a tuple or a list"),
    ("args iterator", lambda ex: ex.collective_rpc("echo", args=iter([1])),
     "args must be a tuple or a list"),
    ("kwargs int key", lambda ex: ex.collective_rpc("echo", kwargs={1: 2}),
     "kwargs keys must be strings"),
    ("kwargs pairs", lambda ex: ex.collective_rpc("echo", kwargs=[("a", 1)]),
     "kwargs must be a mapping"),
    ("timeout str", lambda ex: ex.collective_rpc("noop", timeout="1"),
     "timeout must be a number of seconds or None, not str '1'"),
    ("timeout negative", lambda ex: ex.collective_rpc("noop", timeout=-1),
     "timeout must be a positive number of seconds"),
    ("timeout zero", lambda ex: ex.collective_rpc("noop", timeout=0),
     "timeout must be a positive number of seconds"),
    ("timeout nan", lambda ex: ex.collective_rpc("noop", timeout=math.nan),
     "timeout must be a positive number of seconds"),
    ("timeout -inf", lambda ex: ex.collective_rpc("noop", timeout=-math.inf),
     "timeout must be a positive number of seconds"),
    ("timeout bool", lambda ex: ex.collective_rpc("noop", timeout=True),
     "timeout must be a number of seconds"),
    ("ranks bool", lambda ex: ex.collective_rpc("noop", ranks=[True]), "is a bool, not a rank"),
    ("ranks str", lambda ex: ex.collective_rpc("noop", ranks="01"),
     "ranks must be a sequence of ranks"),
    ("ranks int", lambda ex: ex.collective_rpc("noop", ranks=1),
     "ranks must be a sequence of ranks"),
    ("ranks float", lambda ex: ex.collective_rpc("noop", ranks=[1.0]), "is not a rank"),
    ("ranks range", lambda ex: ex.collective_rpc("noop", ranks=[2]), "out of range"),
    ("ranks repeated", lambda ex: ex.collective_rpc("noop", ranks=[0, 0]), "distinct"),
    ("ranks empty", lambda ex: ex.collective_rpc("noop", ranks=[]), "non-empty"),
    ("unique bool", lambda ex: ex.collective_rpc("noop", unique_reply_rank=True),
     "is a bool, not a rank"),
    ("unique outside", lambda ex: ex.collective_rpc("noop", ranks=[0], unique_reply_rank=1),
     "not among the targeted ranks"),
    ("unique str", lambda ex: ex.collective_rpc("noop", unique_reply_rank="0"), "is not a rank"),
    ("non_block str", lambda ex: ex.collective_rpc("noop", non_block="yes"),
     "non_block must be True or False"),
    ("method int", lambda ex: ex.collective_rpc(3), "method must be a name or a callable"),
    ("method empty", lambda ex: ex.collective_rpc(""), "method name must not be empty"),
    ("health negative", lambda ex: ex.check_health(-1),
     "timeout must be a positive number of seconds"),
    ("health zero", lambda ex: ex.check_health(0), "timeout must be a positive number"),
    ("health str", lambda ex: ex.check_health("1"), "timeout must be a number of seconds"),
]


@pytest.mark.parametrize("call,message", [(c, m) for _, c, m in BAD_CALLS],
                         ids=[name for name, _, _ in BAD_CALLS])
def test_bad_call_arguments_are_refused_before_sending(ex: Executor,
                                                       call: Callable[[Executor], Any],
                                                       message: str) -> None:
    sent = ex.stats().calls
    with pytest.raises(InvalidArgumentError) as info:
        call(ex)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)
    assert ex.stats().calls == sent  # nothing was sent
    assert ex.collective_rpc("add", args=(1,)) == [1, 2]  # and nothing is stuck


def test_nothing_reached_the_workers(ex: Executor) -> None:
    for _, call, _ in BAD_CALLS:
        with pytest.raises(InvalidArgumentError):
            call(ex)
    ex.check_health()
    assert all(not dropped for dropped in ex.stats().worker_malformed.values())


def test_accepted_forms(ex: Executor) -> None:
    assert ex.collective_rpc("echo", args=[1, 2]) == [{"args": [1, 2], "kwargs": {}}] * 2
    assert ex.collective_rpc("add", args=(1,), timeout=math.inf) == [1, 2]  # no deadline
    assert ex.collective_rpc("add", args=(1,), timeout=np.float64(30)) == [1, 2]
    assert ex.collective_rpc("add", args=(1,), ranks=[np.int64(1)]) == [2]
    assert ex.collective_rpc("add", args=(1,), ranks=range(2),
                             unique_reply_rank=np.int64(0)) == 1
    assert ex.collective_rpc("add", args=(1,), ranks=(1, 0)) == [2, 1]
    ex.check_health(math.inf)
    ex.check_health(None)  # type: ignore[arg-type]


def test_rpc_timeout_inf_is_no_deadline() -> None:
    with Executor(EchoWorker, 1, device="cpu", rpc_timeout=math.inf) as ex:
        assert ex.collective_rpc("add", args=(1,)) == [1]


@pytest.mark.parametrize("name", ["ready_timeout", "shutdown_timeout", "terminate_timeout"])
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_other_timeouts_must_be_finite(name: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"{name} must be a positive number of seconds"):
        Executor(EchoWorker, 1, device="cpu", **{name: value})
