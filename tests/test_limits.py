"""Limits either work or refuse cleanly: messages of more than 65,535 frames, a driver
holding more than 1,024 descriptors, huge world sizes, a start slower than
``ready_timeout``."""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import subprocess_env
from race_workers import GateWorker
from workers import EchoWorker

from gpuexec import ConfigError, Executor, WorkerStartupError

TESTS = Path(__file__).resolve().parent
FRAMES = 65_536 + 4  # one more than a ring packet can count, and then some
FRAME_BYTES = 4096   # the smallest array that travels as a frame of its own


@pytest.mark.parametrize("transport", ["zmq", "shm"])
def test_more_than_65535_arrays_each_way(transport: str, no_leaks: None) -> None:
    one = np.full(FRAME_BYTES, 1, dtype=np.uint8)
    with Executor(GateWorker, 1, device="cpu", transport=transport) as ex:
        assert ex.collective_rpc("count", args=([one] * FRAMES,)) == [[FRAMES, FRAMES]]
        back = ex.collective_rpc("many_arrays", args=(FRAMES, FRAME_BYTES), unique_reply_rank=0)
        assert len(back) == FRAMES and all(a.nbytes == FRAME_BYTES for a in back[:10])
        assert int(back[-1][0]) == 1
        assert ex.collective_rpc("add", args=(1,)) == [1]  # the worker lives on
        assert not ex.is_failed


_MANY_FDS = """
import json, os, resource, sys
from workers import EchoWorker
from gpuexec import Executor

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
out = {"highest_fd": max(held)}
for transport in ("zmq", "shm"):
    with Executor(EchoWorker, 2, device="cpu", transport=transport, **OPTIONS) as ex:
        out[transport] = [ex.start_method, ex.collective_rpc("add", args=(1,))]
        ex.check_health()
print(json.dumps(out))
"""


@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 2048,
                    reason="the hard limit on open files is below 2048 here")
@pytest.mark.parametrize("options", [{}, {"start_method": "fork"}], ids=["default", "fork"])
def test_a_driver_holding_many_descriptors(options: dict[str, str]) -> None:
    """Every wait on a descriptor uses poll: a driver whose new descriptors are numbered
    above 1,024 (select's limit) starts and runs workers with the default start method
    (and fork, whose workers inherit those descriptors)."""
    script = f"OPTIONS = {options!r}\n" + textwrap.dedent(_MANY_FDS)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=subprocess_env(), cwd=str(TESTS))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["highest_fd"] > 1024
    for transport in ("zmq", "shm"):
        method, value = out[transport]
        assert value == [1, 2]
        assert method == options.get("start_method", method)


def test_world_size_has_a_documented_maximum() -> None:
    with pytest.raises(ConfigError, match="over the maximum of 1024"):
        Executor(EchoWorker, 10**6, device="cpu")


def test_ready_timeout_bounds_the_whole_start(no_leaks: None) -> None:
    """Launching counts against ready_timeout too: a start that cannot launch every
    worker in time stops launching (and stops what it started)."""
    with Executor(EchoWorker, 1, device="cpu", start_method="zygote", preload=()):
        pass  # a warm zygote: what is measured below is only launching workers
    with pytest.raises(WorkerStartupError) as info:
        Executor(EchoWorker, 512, device="cpu", start_method="zygote", preload=(),
                 transport="zmq", ready_timeout=0.05)
    found = re.search(r"not started within ready_timeout=0.05 s \((\d+) of 512 workers",
                      str(info.value))
    assert found is not None, str(info.value)
    assert int(found.group(1)) < 512
