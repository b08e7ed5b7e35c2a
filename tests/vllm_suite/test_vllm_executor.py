"""gpuexec as vLLM's executor, proven with vLLM's own engine (the CPU build).

Greedy tokens must be identical to vLLM's own ``mp`` executor at the same tensor-parallel
size, through ``LLM`` and ``AsyncLLM``, with the class and with the dotted string, with
async scheduling off and on; a worker killed mid-generation must fail the engine fast
with vLLM's own engine-dead error and leave nothing behind, and so must a model whose
forward raises on rank 0 (LLM and AsyncLLM, TP 1 and 2); a script without a
``__main__`` guard must work; shutdown must run vLLM's worker shutdown in every worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from vllm_suite.engines import (
    GX,
    descendants,
    engine_kwargs,
    generate,
    gpuexec_workers,
    left_after,
    private_dirs,
    sampling,
    shm_entries,
    shutdown_llm,
    still_running,
    token_prompts,
)

RECORDING = "vllm_suite.recording_worker.RecordingCPUWorker"
Tokens = Callable[[int], list[list[int]]]


@pytest.fixture
def marks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory where each vLLM worker's shutdown() leaves a mark."""
    from vllm_suite.recording_worker import MARKS_ENV

    path = tmp_path / "marks"
    path.mkdir()
    monkeypatch.setenv(MARKS_ENV, str(path))
    return path


def children(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` that are this process's own children (and still exist)."""
    out = []
    for p in procs:
        try:
            if p.ppid() == os.getpid():
                out.append(p)
        except psutil.Error:
            pass
    return out


def assert_shut_down_everywhere(marks: Path, pids: list[int]) -> None:
    """Every worker ran vLLM's worker shutdown (gpuexec's shutdown hook) and is gone."""
    assert pids, "no gpuexec worker was seen while the engine ran"
    assert still_running([psutil.Process(p) for p in pids if psutil.pid_exists(p)]) == []
    names = [m.name.split("-") for m in marks.iterdir()]
    assert sorted(int(rank) for _, rank, _ in names) == list(range(len(pids)))
    assert sorted(int(pid) for _, _, pid in names) == sorted(pids)
    left = still_running(descendants())
    assert left == [], [psutil.Process(p).cmdline() for p in left if psutil.pid_exists(p)]


def test_llm_tp1_class_matches_mp(model_dir: Path, mp_tokens: Tokens, marks: Path) -> None:
    from vllm import LLM

    from gpuexec.integrations.vllm import VllmExecutor

    expected = mp_tokens(1)
    llm = LLM(**engine_kwargs(model_dir, 1, VllmExecutor, worker_cls=RECORDING,
                              async_scheduling=False))
    try:
        pids = [p.pid for p in gpuexec_workers()]
        assert len(pids) == 1
        assert generate(llm) == expected
    finally:
        shutdown_llm(llm)
    assert_shut_down_everywhere(marks, pids)


async def _generate_async(engine: Any) -> list[list[int]]:
    async def one(i: int, prompt: Any) -> list[int]:
        final = None
        async for out in engine.generate(prompt, sampling(), request_id=f"r{i}"):
            final = out
        assert final is not None and final.finished
        return list(final.outputs[0].token_ids)

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(token_prompts()))))


def _async_engine(model_dir: Path, tp: int, backend: Any, **extra: Any) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(model_dir, tp, backend,
                                                                     **extra)))


@pytest.mark.parametrize("tp", [1, 2])
def test_async_llm_matches_mp(model_dir: Path, mp_tokens: Tokens, marks: Path,
                              tp: int) -> None:
    """TP=1 by the dotted string with async scheduling off; TP=2 by the class with async
    scheduling on (gpuexec's deferred replies carry the overlapped step outputs)."""
    from gpuexec.integrations.vllm import VllmExecutor

    expected = mp_tokens(tp)
    backend: Any = GX if tp == 1 else VllmExecutor

    async def run() -> tuple[list[list[int]], list[int]]:
        engine = _async_engine(model_dir, tp, backend, worker_cls=RECORDING,
                               async_scheduling=tp == 2)
        try:
            pids = [p.pid for p in gpuexec_workers()]
            return await _generate_async(engine), pids
        finally:
            engine.shutdown()

    tokens, pids = asyncio.run(run())
    assert len(pids) == tp
    assert tokens == expected
    assert_shut_down_everywhere(marks, pids)


def test_sigkill_of_a_worker_fails_the_engine_fast(model_dir: Path) -> None:
    from vllm.v1.engine.exceptions import EngineDeadError

    shm_before, dirs_before = shm_entries(), private_dirs()

    started: list[psutil.Process] = []  # the engine's processes, whoever adopts them later

    async def run() -> float:
        engine = _async_engine(model_dir, 2, GX)
        started.extend(descendants())
        try:
            stream = engine.generate(token_prompts()[0], sampling(max_tokens=200),
                                     request_id="long")
            await stream.__anext__()  # generation is under way
            victim = gpuexec_workers()[-1]
            victim.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(EngineDeadError):
                async for _ in stream:
                    pass
            elapsed = time.monotonic() - killed
            # The engine process winds down by itself after the error (its executor stops
            # the workers and removes what they used); let it finish before the caller's
            # shutdown, whose SIGTERM would kill it outright: vLLM restores SIGTERM's
            # default action before it shuts its executor down.
            psutil.wait_procs(children(started), timeout=30)
            return elapsed
        finally:
            engine.shutdown()

    elapsed = asyncio.run(run())
    print(f"\nengine reported dead {elapsed * 1000:.0f} ms after the SIGKILL")
    assert elapsed < 10.0  # generous on a shared 2-core host; the target is under 1 s
    assert len(started) >= 4  # engine core, zygote, two workers
    assert still_running(started + descendants()) == []
    assert left_after(shm_entries, shm_before) == set()
    assert left_after(private_dirs, dirs_before) == set()


NO_GUARD_SCRIPT = '''
import json, os, sys
sys.path.insert(0, {tests!r})
from vllm_suite.engines import engine_kwargs, generate
from vllm import LLM

llm = LLM(**engine_kwargs({model!r}, 2, "gpuexec.integrations.vllm.VllmExecutor"))
print("TOKENS " + json.dumps(generate(llm)), flush=True)
'''


def test_script_without_main_guard(model_dir: Path, mp_tokens: Tokens, tmp_path: Path) -> None:
    """No ``if __name__ == "__main__":``: gpuexec's workers never re-import the script.
    (On CPU vLLM spawns its engine-core process too, which would re-import it whatever
    the executor; the script keeps the engine core in-process, so the executor's workers
    are the only processes started.)"""
    expected = mp_tokens(2)
    script = tmp_path / "no_guard.py"
    script.write_text(NO_GUARD_SCRIPT.format(tests=str(Path(__file__).parent.parent),
                                             model=str(model_dir)))
    run_id = uuid.uuid4().hex
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "GPUEXEC_TEST_RUN": run_id}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("TOKENS ")]
    assert [json.loads(ln.removeprefix("TOKENS ")) for ln in lines] == [expected]
    assert "bootstrapping phase" not in proc.stderr
    left = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("GPUEXEC_TEST_RUN") == run_id:
                left.append(p)
        except psutil.Error:
            pass
    assert still_running(left) == []


# -- vLLM's forward-error case: rank 0's forward raises after 10 steps ---------------------

EVIL = "vllm_suite.evil_worker.EvilForwardCPUWorker"
HANG_GUARD_S = 300.0  # not a speed target: a hang fails here instead of blocking CI


def _nothing_left(started: list[psutil.Process], shm_before: set[str],
                  dirs_before: set[str]) -> None:
    assert still_running(started + descendants()) == []
    assert left_after(shm_entries, shm_before) == set()
    assert left_after(private_dirs, dirs_before) == set()


@pytest.mark.parametrize("tp", [1, 2])
def test_async_llm_forward_error_fails_every_request(model_dir: Path, tp: int) -> None:
    from vllm.v1.engine.exceptions import EngineDeadError

    shm_before, dirs_before = shm_entries(), private_dirs()
    started: list[psutil.Process] = []

    async def run() -> float:
        engine = _async_engine(model_dir, tp, GX, worker_cls=EVIL)
        started.extend(descendants())
        try:
            async def one(i: int) -> BaseException | None:
                try:
                    async for _ in engine.generate(token_prompts()[i % 2],
                                                   sampling(max_tokens=200),
                                                   request_id=f"req-{i}"):
                        pass
                except Exception as e:
                    return e
                return None

            t = time.monotonic()
            outs = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(3))),
                                          HANG_GUARD_S)
            elapsed = time.monotonic() - t
            assert all(isinstance(o, EngineDeadError) for o in outs), outs
            assert engine.errored
            with pytest.raises(EngineDeadError):
                async for _ in engine.generate(token_prompts()[0], sampling(),
                                               request_id="after"):
                    pass
            psutil.wait_procs(children(started), timeout=30)
            return elapsed
        finally:
            engine.shutdown()

    elapsed = asyncio.run(run())
    print(f"\nTP={tp}: every request failed with EngineDeadError {elapsed:.2f} s after start")
    _nothing_left(started, shm_before, dirs_before)


@pytest.mark.parametrize("tp", [1, 2])
def test_llm_forward_error_raises_engine_dead(model_dir: Path, tp: int) -> None:
    from vllm import LLM
    from vllm.v1.engine.exceptions import EngineDeadError

    shm_before, dirs_before = shm_entries(), private_dirs()
    llm = LLM(**engine_kwargs(model_dir, tp, GX, worker_cls=EVIL))
    started = descendants()
    try:
        t = time.monotonic()
        with pytest.raises(EngineDeadError):
            llm.generate(token_prompts(), sampling(max_tokens=200))
        print(f"\nTP={tp}: EngineDeadError {time.monotonic() - t:.2f} s after generate()")
        psutil.wait_procs(children(started), timeout=30)
    finally:
        shutdown_llm(llm)
    _nothing_left(started, shm_before, dirs_before)
