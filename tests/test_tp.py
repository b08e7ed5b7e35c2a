"""Tensor parallelism: distributed_backend, the TP MLP example, worker extensions.

CPU tests use gloo; the ``cuda`` tests (two GPUs) run the same example over NCCL.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, gpuexec_dirs, subprocess_env, wait_gone, worker_children
from tp_workers import ClashExtension, DistWorker, GreetExtension, InitExtension
from workers import EchoWorker

from gpuexec import ConfigError, Executor, WorkerStartupError
from gpuexec.executor.config import visible_gpu_count

EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

from tp_mlp import (  # noqa: E402
    TPMLPWorker,
    build_weights,
    make_input,
    reference_forward,
    relative_error,
)


def _run_example(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EXAMPLES / "tensor_parallel_mlp.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=subprocess_env(**env))


def _printed_error(stdout: str) -> float:
    found = re.search(r"relative error vs single-process reference: (\S+)", stdout)
    assert found, stdout
    return float(found.group(1))


# -- the example, as a script and through the API -----------------------------------------

def test_example_script_world_size_2_gloo_matches_reference() -> None:
    r = _run_example("--world-size", "2", "--device", "cpu", CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 0, r.stderr
    assert "backend=gloo" in r.stdout
    assert _printed_error(r.stdout) <= 1e-5


def test_tp_mlp_through_the_public_api(no_leaks: None) -> None:
    dims = (64, 256, 32)
    x = make_input(3, 8, dims[0])
    with Executor(TPMLPWorker, 2, device="cpu", distributed_backend="gloo",
                  worker_args=(3, *dims)) as ex:
        outs = ex.collective_rpc("forward", args=(x,))
        one, seconds = ex.collective_rpc("timed_forward", args=(x,), unique_reply_rank=0)
    ref = reference_forward(build_weights(3, *dims), x)  # after: see tensor_parallel_mlp.py
    assert len(outs) == 2
    assert all(relative_error(o, ref) <= 1e-5 for o in outs)
    assert relative_error(one, ref) <= 1e-5 and seconds > 0


def test_serving_loop_example_serves_every_request() -> None:
    r = subprocess.run([sys.executable, str(EXAMPLES / "serving_loop.py"), "--world-size", "2",
                        "--device", "cpu", "--requests", "256", "--clients", "16"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env=subprocess_env(CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 0, r.stderr
    assert "served 256 of 256 requests from 16 clients" in r.stdout
    assert "requests/s" in r.stdout and "steps/s" in r.stdout


# -- the process group ------------------------------------------------------------------

@pytest.fixture(scope="module")
def dist_ex() -> Iterator[Executor]:
    ex = Executor(DistWorker, 2, device="cpu", distributed_backend="gloo",
                  distributed_timeout=60)
    yield ex
    ex.shutdown()


def test_process_group_is_initialised_before_init(dist_ex: Executor) -> None:
    states = dist_ex.collective_rpc("state")
    port = states[0]["env"]["MASTER_PORT"]
    assert port.isdigit() and 0 < int(port) < 65536
    for rank, s in enumerate(states):
        assert s["initialized"] and s["in_init"]
        assert (s["backend"], s["rank"], s["world_size"], s["sum"]) == ("gloo", rank, 2, 3.0)
        assert s["env"] == {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                            "RANK": str(rank), "WORLD_SIZE": "2"}


def test_process_group_destroyed_at_shutdown(tmp_path: Path, no_leaks: None) -> None:
    with Executor(DistWorker, 2, device="cpu", distributed_backend="gloo") as ex:
        marks = [tmp_path / f"rank{r}" for r in range(2)]
        for r, mark in enumerate(marks):
            ex.collective_rpc("probe_destroy", args=(str(mark),), ranks=[r])
        assert not any(m.exists() for m in marks)
        pids = [w.pid for w in ex.workers]
    assert wait_gone(pids) == []
    assert [m.read_text() for m in marks] == ["destroyed initialized=False"] * 2


def test_explicit_master_port_is_used() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Executor(DistWorker, 2, device="cpu", distributed_backend="gloo",
                  master_addr="127.0.0.1", master_port=port) as ex:
        assert {s["env"]["MASTER_PORT"] for s in ex.collective_rpc("state")} == {str(port)}


def test_rendezvous_failure_names_the_rank_and_leaves_nothing(no_leaks: None) -> None:
    with socket.socket() as busy:  # listening but never answering: rank 0 cannot bind it
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(WorkerStartupError) as info:
            Executor(DistWorker, 2, device="cpu", distributed_backend="gloo",
                     master_port=busy.getsockname()[1], distributed_timeout=3)
    err = info.value
    assert err.rank == 0
    assert str(err).startswith("worker rank 0 failed to start")
    assert "init_distributed" in str(err) and "rank 0 of 2" in str(err)
    assert "gloo rendezvous at 127.0.0.1" in str(err)


BAD: list[tuple[dict[str, Any], str]] = [
    ({"distributed_backend": "nccl"}, "distributed_backend='nccl' needs CUDA workers"),
    ({"distributed_backend": "mpi"}, "unknown distributed_backend 'mpi'"),
    ({"distributed_backend": "gloo", "master_port": 0}, "master_port must be an integer"),
    ({"distributed_backend": "gloo", "master_port": 70000}, "master_port must be an integer"),
    ({"distributed_backend": "gloo", "master_port": "29500"}, "master_port must be an integer"),
    ({"distributed_backend": "gloo", "master_addr": ""}, "master_addr must be a host name"),
    ({"distributed_backend": "gloo", "master_addr": "192.0.2.1"}, "cannot pick a free port"),
    ({"distributed_backend": "gloo", "distributed_timeout": 0}, "distributed_timeout must be"),
    ({"distributed_backend": "gloo", "env": {"MASTER_PORT": "1"}}, "env sets MASTER_PORT"),
    ({"master_port": 29500}, "master_addr / master_port need distributed_backend"),
    ({"max_concurrent_batches": 0}, "max_concurrent_batches must be an integer >= 1"),
    ({"worker_extension_cls": "no_such_mod_xyz:Ext"}, "no module named 'no_such_mod_xyz'"),
    ({"worker_extension_cls": "tp_workers.GreetExtension"}, "must look like"),
    ({"worker_extension_cls": 5}, "worker_extension_cls must be a class"),
    ({"worker_extension_cls": ClashExtension}, "defines echo, which EchoWorker already has"),
    ({"worker_extension_cls": InitExtension}, "defines __init__"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[str(b[0])[:50] for b in BAD])
def test_bad_arguments_raise_before_any_process(kwargs: dict[str, Any], message: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    children, dirs = {p.pid for p in worker_children()}, gpuexec_dirs()
    with pytest.raises(ConfigError) as info:
        Executor(**{"worker_cls": EchoWorker, "world_size": 2, "device": "auto", **kwargs})
    assert message in str(info.value)
    assert {p.pid for p in worker_children()} == children and gpuexec_dirs() == dirs


# -- worker extensions ------------------------------------------------------------------

def test_extension_as_class_adds_methods() -> None:
    with Executor(EchoWorker, 2, device="cpu", worker_extension_cls=GreetExtension,
                  worker_kwargs={"tag": "x"}) as ex:
        assert ex.collective_rpc("greet", args=("ann",)) == \
            [f"hello ann from rank {r} (EchoWorker)" for r in range(2)]
        assert ex.collective_rpc("add", args=(1,)) == [1, 2]  # the worker's own methods
        assert ex.collective_rpc(lambda w: isinstance(w, (EchoWorker, GreetExtension))) == \
            [True, True]


def test_extension_as_string_adds_methods() -> None:
    with Executor("workers:EchoWorker", 1, device="cpu",
                  worker_extension_cls="tp_workers:GreetExtension") as ex:
        assert ex.collective_rpc("greet", args=("bo",)) == ["hello bo from rank 0 (EchoWorker)"]


def test_extension_clash_given_as_string_fails_at_startup(no_leaks: None) -> None:
    with pytest.raises(WorkerStartupError) as info:
        Executor(EchoWorker, 2, device="cpu", worker_extension_cls="tp_workers:ClashExtension")
    text = str(info.value)
    assert "TypeError in worker_extension_cls" in text
    assert "defines echo, which EchoWorker already has" in text


# -- GPUs -------------------------------------------------------------------------------

need2 = pytest.mark.skipif(visible_gpu_count() < 2, reason="needs two CUDA GPUs")


@pytest.mark.cuda
@need2
def test_example_script_world_size_2_nccl_matches_reference() -> None:
    r = _run_example("--world-size", "2", "--device", "cuda", "--backend", "nccl")
    assert r.returncode == 0, r.stderr
    assert "backend=nccl" in r.stdout
    assert _printed_error(r.stdout) <= 1e-5


@pytest.mark.cuda
@need2
def test_nccl_group_through_the_public_api() -> None:
    dims = (64, 256, 32)
    x = make_input(5, 8, dims[0])
    ref = reference_forward(build_weights(5, *dims), x)
    with Executor(TPMLPWorker, 2, device="cuda", distributed_backend="nccl",
                  worker_args=(5, *dims)) as ex:
        outs = ex.collective_rpc("forward", args=(x,))
        backends = ex.collective_rpc(lambda w: str(__import__("torch.distributed").distributed
                                                   .get_backend()))
    assert backends == ["nccl", "nccl"]
    assert all(relative_error(o, ref) <= 1e-5 for o in outs)
