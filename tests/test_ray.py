"""``backend="ray"``: workers as Ray actors on a local Ray cluster, including a simulated
two-node cluster with fake GPU resources (ray.cluster_utils.Cluster)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import ROOT, subprocess_env, wait_gone

from gpuexec import Executor, Worker
from gpuexec.errors import ConfigError, RemoteError, WorkerDiedError, WorkerStartupError
from gpuexec.executor.config import visible_gpu_count
from gpuexec.executor.ray_backend import Slot, plan_ranks

# -- rank layout (no Ray needed) ---------------------------------------------------


def test_driver_node_first_and_local_ranks_counted_per_node() -> None:
    nodes = {0: "B", 1: "A", 2: "B", 3: "A", 4: "C"}
    slots = plan_ranks(nodes, driver_node="A")
    assert [(s.node_id, s.bundle, s.local_rank, s.local_world_size) for s in slots] == [
        ("A", 1, 0, 2), ("A", 3, 1, 2), ("B", 0, 0, 2), ("B", 2, 1, 2), ("C", 4, 0, 1)]


def test_driver_without_bundles_keeps_bundle_order() -> None:
    slots = plan_ranks({0: "X", 1: "Y", 2: "X"}, driver_node="D")
    assert slots == [Slot(0, "X", 0, 2), Slot(2, "X", 1, 2), Slot(1, "Y", 0, 1)]


def test_missing_ray_is_a_config_error_before_anything_starts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'gpuexec\[ray\]'"):
        Executor(Worker, 2, device="cpu", backend="ray")


@pytest.mark.parametrize("bad", [{}, {"GPU": 0}, {"CPU": -1}, {"GPU": True}, {1: 1}])
def test_bad_resources_are_config_errors(bad: Any) -> None:
    with pytest.raises(ConfigError, match="ray_resources"):
        Executor(Worker, 2, device="cpu", backend="ray", ray_resources=bad)


def test_unknown_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="backend"):
        Executor(Worker, 2, device="cpu", backend="dask")


# -- on a two-node Ray cluster ------------------------------------------------------

ray = pytest.importorskip("ray")


class WhereWorker(Worker):
    def where(self) -> dict[str, Any]:
        import ray as r

        return {"rank": self.rank, "local_rank": self.local_rank,
                "local_world_size": self.local_world_size, "world_size": self.world_size,
                "node": r.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                "env_rank": os.environ["RANK"], "env_local_rank": os.environ["LOCAL_RANK"]}

    def add(self, a: int, b: int) -> int:
        return a + b + self.rank

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def fail(self) -> None:
        raise KeyError("nope")


class BrokenWorker(Worker):
    def __init__(self) -> None:
        raise RuntimeError("cannot load weights")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    from ray.cluster_utils import Cluster

    # "driver_node": a resource of the head (where the driver connects) alone, to place
    # actors on the driver's node on purpose.
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 2, "resources": {"driver_node": 2}})
    c.add_node(num_cpus=2, num_gpus=2)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


GPU_BUNDLE = {"GPU": 1}  # fake GPUs: Ray still hands each actor its own CUDA_VISIBLE_DEVICES


def _resources_back(timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ray.available_resources().get("GPU", 0) == ray.cluster_resources().get("GPU"):
            return True
        time.sleep(0.2)
    return False


def test_collective_rpc_across_two_nodes_with_rank_layout(cluster: Any) -> None:
    driver_node = ray.get_runtime_context().get_node_id()
    with Executor(WhereWorker, 4, device="cpu", backend="ray",
                  ray_resources=GPU_BUNDLE) as ex:
        assert ex.backend == "ray" and ex.transport == "tcp"
        info = ex.collective_rpc("where")
        assert [i["rank"] for i in info] == [0, 1, 2, 3]
        nodes = [i["node"] for i in info]
        assert nodes[0] == nodes[1] == driver_node != nodes[2] == nodes[3]
        assert [i["local_rank"] for i in info] == [0, 1, 0, 1]
        assert [i["env_local_rank"] for i in info] == ["0", "1", "0", "1"]
        assert {i["local_world_size"] for i in info} == {2}
        assert {i["world_size"] for i in info} == {4}
        # Ray gave each actor one (fake) GPU of its node: distinct within a node.
        assert info[0]["cuda_visible"] != info[1]["cuda_visible"]
        assert info[2]["cuda_visible"] != info[3]["cuda_visible"]
        assert [w.local_rank for w in ex.workers] == [0, 1, 0, 1]
        assert [w.pid for w in ex.workers] == [i["pid"] for i in info]
        assert ex.collective_rpc("add", args=(1, 2)) == [3, 4, 5, 6]
        assert ex.collective_rpc(lambda w, x: x * w.rank, args=(10,), ranks=[3, 1]) == [30, 10]
        with pytest.raises(Exception, match="nope") as err:
            ex.collective_rpc("fail")
        assert type(err.value).__name__ == "RemoteError"
        assert ex.collective_rpc("add", args=(0, 0), unique_reply_rank=2) == 2
        # Stacks over Ray: these "nodes" share one host, so every actor has its channel
        # (an actor on another host would say it has none).
        stacks = ex.stacks(timeout=5.0)
        assert sorted(stacks) == [0, 1, 2, 3]
        assert all(stacks[r].startswith(f"rank {r} (pid {pids}): idle; innermost frames")
                   for r, pids in enumerate(i["pid"] for i in info)), stacks
        status = ex.status()
        assert [s.state for s in status] == ["idle"] * 4
        assert all(s.rss_bytes is not None and s.rss_bytes > 0 for s in status)  # one host
        pids = [w.pid for w in ex.workers]
    assert wait_gone(pids, timeout=30.0) == []
    assert _resources_back()
    from ray.util.placement_group import placement_group_table

    assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values())


LOCAL_BUNDLE = {"GPU": 1, "driver_node": 1}  # on the driver's node, for sure


def test_actors_on_the_driver_node_use_the_shared_memory_rings(cluster: Any) -> None:
    import numpy as np

    driver_node = ray.get_runtime_context().get_node_id()
    with Executor(WhereWorker, 2, device="cpu", backend="ray",
                  ray_resources=LOCAL_BUNDLE) as ex:
        assert ex.transport == "shm"
        assert ex.endpoints[0].startswith("tcp://")  # ZeroMQ, for the overflow, stays tcp
        info = ex.collective_rpc("where")
        assert [i["node"] for i in info] == [driver_node] * 2
        assert [i["local_rank"] for i in info] == [0, 1]
        assert ex.collective_rpc("add", args=(1, 2)) == [3, 4]
        # 4 MiB: a zero-copy payload (a memory file the actors map through /proc), and
        # 3 MiB of bytes: over a 1 MiB ring slot, so it travels by tcp + CURVE in order.
        arr = np.arange(1 << 19, dtype=np.float64)
        blob = bytes(range(256)) * (3 << 12)
        got = ex.collective_rpc(lambda w, a, b: [float(a.sum()), len(b), b[-3:]],
                                args=(arr, blob))
        assert got == [[float(arr.sum()), len(blob), blob[-3:]]] * 2
        with pytest.raises(RemoteError, match="nope"):
            ex.collective_rpc("fail")
        victim = ex.workers[0].pid
        threading.Timer(0.5, os.kill, args=(victim, signal.SIGKILL)).start()
        with pytest.raises(WorkerDiedError) as err:
            ex.collective_rpc("sleep", args=(60,))
        assert err.value.rank == 0
    assert _resources_back()
    with Executor(WhereWorker, 2, device="cpu", backend="ray", ray_resources=LOCAL_BUNDLE,
                  transport="tcp") as ex:
        assert ex.transport == "tcp"
        assert ex.collective_rpc("add", args=(1, 2)) == [3, 4]
    with pytest.raises(ConfigError, match=r"'auto'.*or 'tcp'"):
        Executor(WhereWorker, 2, device="cpu", backend="ray", transport="shm")


def test_torch_distributed_group_across_actors(cluster: Any) -> None:
    with Executor(WhereWorker, 2, device="cpu", backend="ray", ray_resources=LOCAL_BUNDLE,
                  distributed_backend="gloo") as ex:
        sums = ex.collective_rpc(_all_reduce_rank)
    assert sums == [1.0, 1.0]  # ranks 0 + 1, summed in both


def _all_reduce_rank(worker: Worker) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(worker.rank)])
    dist.all_reduce(t)
    return float(t.item())


def test_killed_actor_fails_pending_call_with_worker_died(cluster: Any) -> None:
    with Executor(WhereWorker, 2, device="cpu", backend="ray", ray_resources=GPU_BUNDLE) as ex:
        victim = ex.workers[1].pid
        threading.Timer(0.5, os.kill, args=(victim, signal.SIGKILL)).start()
        start = time.monotonic()
        with pytest.raises(WorkerDiedError) as err:
            ex.collective_rpc("sleep", args=(60,))
        assert time.monotonic() - start < 30  # liveness, not speed: see the benchmark
        assert err.value.rank == 1
        assert ex.is_failed
        with pytest.raises(WorkerDiedError):
            ex.collective_rpc("add", args=(1, 1))
    assert _resources_back()


def test_startup_failure_names_the_rank_and_leaves_nothing(cluster: Any) -> None:
    with pytest.raises(WorkerStartupError, match="cannot load weights") as err:
        Executor(BrokenWorker, 2, device="cpu", backend="ray", ray_resources=GPU_BUNDLE)
    assert "RuntimeError" in err.value.remote_traceback
    assert _resources_back()


def test_unplaceable_request_times_out_and_removes_its_placement_group(cluster: Any) -> None:
    with pytest.raises(WorkerStartupError, match="could not place"):
        Executor(WhereWorker, 9, device="cpu", backend="ray", ray_resources=GPU_BUNDLE,
                 ready_timeout=3)
    from ray.util.placement_group import placement_group_table

    assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values())
    assert _resources_back()


def test_driver_death_takes_the_actors_along(cluster: Any, tmp_path: Any) -> None:
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time, ray
        sys.path[:0] = {[os.getcwd(), os.path.dirname(__file__)]!r}
        from gpuexec import Executor
        from test_ray import WhereWorker
        ray.init(address={cluster.address!r}, log_to_driver=False)
        ex = Executor(WhereWorker, 2, device="cpu", backend="ray", ray_resources={{"GPU": 1}})
        print(" ".join(str(w.pid) for w in ex.workers), flush=True)
        time.sleep(600)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
        proc.kill()
        proc.wait(10)
        assert wait_gone(pids, timeout=60.0) == []
        assert _resources_back(60)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("key", ["none", "wrong"])
def test_tcp_peer_without_the_curve_key_is_ignored(cluster: Any, key: str) -> None:
    import msgspec
    import zmq

    from gpuexec.ipc.messages import Reply

    with Executor(WhereWorker, 2, device="cpu", backend="ray", ray_resources=GPU_BUNDLE,
                  transport="tcp") as ex:  # requests on tcp, where the peer listens
        assert ex.transport == "tcp"
        req, rep = ex.endpoints
        assert req.startswith("tcp://") and rep.startswith("tcp://")
        before = ex.stats()
        ctx: zmq.Context[Any] = zmq.Context()
        try:
            socks = []
            for kind, endpoint in ((zmq.PUSH, rep), (zmq.SUB, req)):
                sock = ctx.socket(kind)
                sock.setsockopt(zmq.LINGER, 0)
                if key == "wrong":  # a CURVE client with a keypair of its own
                    public, secret = zmq.curve_keypair()
                    sock.setsockopt(zmq.CURVE_SERVERKEY, zmq.curve_keypair()[0])
                    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
                    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
                if kind == zmq.SUB:
                    sock.setsockopt(zmq.SUBSCRIBE, b"")
                sock.connect(endpoint)
                socks.append(sock)
            push, sub = socks
            fut = ex.collective_rpc("sleep", args=(0.3,), non_block=True)
            forged = msgspec.msgpack.encode(Reply(1, 0, value=666))
            for _ in range(200):
                try:
                    push.send(forged, zmq.NOBLOCK)
                except zmq.Again:
                    break  # never connected: nothing can even be queued
            assert fut.result(timeout=30) == [None, None]
            assert ex.collective_rpc("add", args=(1, 1)) == [2, 3]
            assert sub.poll(300) == 0  # it never sees a request
        finally:
            ctx.destroy(linger=0)
        after = ex.stats()
        assert (after.malformed, after.late_replies) == (before.malformed, before.late_replies)


# -- on real GPUs (a lent GPU host; skipped elsewhere) ------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(visible_gpu_count() < 2, reason="needs two CUDA GPUs")
def test_actors_on_real_gpus_run_nccl_tensor_parallel_over_the_rings(tmp_path: Any) -> None:
    """A Ray cluster of this host's real GPUs (its own, in a subprocess): one GPU per
    actor, ``init_device`` on ordinal 0 of each actor's CUDA_VISIBLE_DEVICES, NCCL tensor
    parallelism across the actors, calls on the shared-memory rings."""
    script = tmp_path / "gpu_driver.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(ROOT / "examples")!r})
        import ray
        from gpuexec import Executor
        from tp_mlp import TPMLPWorker, build_weights, make_input, reference_forward
        from tp_mlp import relative_error
        ray.init(address="local", num_cpus=4, log_to_driver=False)  # its own, with the GPUs
        dims = (64, 256, 32)
        x = make_input(5, 8, dims[0])
        ref = reference_forward(build_weights(5, *dims), x)
        with Executor(TPMLPWorker, 2, device="cuda", backend="ray",
                      distributed_backend="nccl", worker_args=(5, *dims)) as ex:
            outs = ex.collective_rpc("forward", args=(x,))
            where = ex.collective_rpc(lambda w: {{
                "visible": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                "device": str(w.device),
                "backend": __import__("torch.distributed").distributed.get_backend()}})
            print(json.dumps({{"transport": ex.transport, "where": where,
                              "devices": [w.device for w in ex.workers],
                              "errors": [relative_error(o, ref) for o in outs]}}))
        ray.shutdown()
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, **subprocess_env()})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["transport"] == "shm"
    assert [w["backend"] for w in out["where"]] == ["nccl", "nccl"]
    assert [w["device"] for w in out["where"]] == ["cuda:0", "cuda:0"] == out["devices"]
    assert len({w["visible"] for w in out["where"]}) == 2  # one GPU each, distinct
    assert all(e <= 1e-5 for e in out["errors"])
