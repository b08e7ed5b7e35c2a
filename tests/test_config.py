"""Bad arguments fail before any process starts."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import gpuexec_dirs, worker_children
from workers import EchoWorker

from gpuexec import ConfigError, Executor, StartMethodError, Worker

BAD: list[tuple[dict[str, Any], str]] = [
    ({"world_size": 0}, "world_size must be an integer >= 1"),
    ({"world_size": -2}, "world_size must be an integer >= 1"),
    ({"world_size": True}, "world_size must be an integer >= 1"),
    ({"world_size": "2"}, "world_size must be an integer >= 1"),
    ({"world_size": 10**6}, "world_size=1000000 is over the maximum of 1024"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"device": "cuda"}, "no CUDA device is visible"),
    ({"start_method": "thread"}, "unknown start_method 'thread'"),
    ({"worker_cls": "no_such_module_xyz:Worker"}, "no module named 'no_such_module_xyz'"),
    ({"worker_cls": "workers.EchoWorker"}, "must look like 'package.module:Class'"),
    ({"worker_cls": "workers:NotThere"}, "not a gpuexec.Worker subclass"),
    ({"worker_cls": "os:path"}, "not a gpuexec.Worker subclass"),
    ({"worker_cls": dict}, "gpuexec.Worker subclass"),
    ({"worker_cls": EchoWorker()}, "gpuexec.Worker subclass"),
    ({"env": {"A": 1}}, "env entries must be str -> str"),
    ({"env": {"": "x"}}, "env entries must be str -> str"),
    ({"worker_args": "abc"}, "worker_args must be a tuple or list"),
    ({"worker_kwargs": [1]}, "worker_kwargs must be a mapping"),
    ({"worker_args": (lambda: (yield),)}, None),  # picklable by cloudpickle: fine
    ({"ready_timeout": 0}, "ready_timeout must be a positive number"),
    ({"rpc_timeout": -1}, "rpc_timeout must be a positive number"),
    ({"shutdown_timeout": "5"}, "shutdown_timeout must be a positive number"),
    ({"terminate_timeout": 0}, "terminate_timeout must be a positive number"),
    ({"stale_context_policy": "nuke"}, "stale_context_policy must be 'release' or 'reset'"),
    ({"distributed_backend": "nccl"}, "distributed_backend='nccl' needs CUDA workers"),
]


@pytest.mark.parametrize("kwargs,message", [b for b in BAD if b[1]],
                         ids=[str(b[0])[:40] for b in BAD if b[1]])
def test_bad_argument_raises_before_any_process(kwargs: dict[str, Any], message: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    before_children = {p.pid for p in worker_children()}
    before_dirs = gpuexec_dirs()
    args = {"worker_cls": EchoWorker, "world_size": 1, "device": "cpu", **kwargs}
    with pytest.raises(ConfigError) as info:
        Executor(**args)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)
    assert {p.pid for p in worker_children()} == before_children
    assert gpuexec_dirs() == before_dirs


def test_start_method_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUEXEC_START_METHOD", "bogus")
    with pytest.raises(StartMethodError, match="unknown GPUEXEC_START_METHOD 'bogus'"):
        Executor(EchoWorker, 1, device="cpu")
    monkeypatch.setenv("GPUEXEC_START_METHOD", "spawn")
    with Executor(EchoWorker, 1, device="cpu") as ex:
        assert ex.start_method == "spawn"
        assert "GPUEXEC_START_METHOD" in ex.start_method_reason
    with Executor(EchoWorker, 1, device="cpu", start_method="fork") as ex:
        assert ex.start_method == "fork"  # an explicit method beats the variable


def test_string_worker_class_and_default_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with Executor("workers:EchoWorker", 2, worker_kwargs={"tag": "s"}) as ex:
        assert ex.collective_rpc("whoami", unique_reply_rank=1)["tag"] == "s"
    with Executor() as ex:  # defaults: base Worker, one CPU worker without GPUs
        assert ex.world_size == 1
        assert ex.collective_rpc(lambda w: (w.rank, w.device)) == [(0, "cpu")]


def test_class_defined_locally_travels_by_value() -> None:
    class Local(Worker):
        def hello(self) -> str:
            return f"local {self.rank}"

    for method in ("fork", "spawn"):
        with Executor(Local, 2, device="cpu", start_method=method) as ex:
            assert ex.collective_rpc("hello") == ["local 0", "local 1"]
