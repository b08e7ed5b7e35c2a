"""Helpers of the vLLM suite: engine arguments, generation, leak checks."""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

GX = "gpuexec.integrations.vllm.VllmExecutor"
MAX_TOKENS = 12


def engine_kwargs(model_dir: Path, tp: int, backend: Any, **extra: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        model=str(model_dir), skip_tokenizer_init=True, tensor_parallel_size=tp,
        distributed_executor_backend=backend, dtype="float32", max_model_len=256,
        enforce_eager=True, max_num_seqs=8, seed=0)
    kwargs.update(extra)
    return kwargs


def sampling(max_tokens: int = MAX_TOKENS) -> Any:
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, detokenize=False,
                          ignore_eos=True)


def token_prompts() -> list[Any]:
    from vllm.inputs import TokensPrompt

    from vllm_suite.tiny_model import prompts

    return [TokensPrompt(prompt_token_ids=p) for p in prompts()]


def generate(llm: Any) -> list[list[int]]:
    outs = llm.generate(token_prompts(), sampling())
    return [list(o.outputs[0].token_ids) for o in outs]


def shutdown_llm(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()


def descendants() -> list[psutil.Process]:
    """Live (non-zombie) descendants of this test process, multiprocessing's resource
    tracker (a helper of this process that lives as long as it does) excepted."""
    from multiprocessing import resource_tracker

    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.pid != tracker and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def gpuexec_workers() -> list[psutil.Process]:
    """Descendants that are gpuexec workers: the children of gpuexec's zygote (the
    adapter's start method), which are forked from it and keep its command line, and
    are not a worker's guardian (forked from the worker, named ``gpuexec-guard``)."""
    workers = []
    for p in descendants():
        try:
            if "gpuexec.worker.zygote" in " ".join(p.cmdline()) and \
                    "gpuexec.worker.zygote" in " ".join(p.parent().cmdline()) and \
                    p.name() != "gpuexec-guard":
                workers.append(p)
        except (psutil.Error, AttributeError):
            pass
    return workers


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def left_after(current: Callable[[], set[str]], before: set[str],
               timeout: float = 30.0) -> set[str]:
    """What ``current()`` holds that ``before`` did not, after waiting up to ``timeout`` s
    for it to go. Clean-up after a killed worker is asynchronous: multiprocessing's
    resource tracker removes the worker's shared memory once the worker has exited, and a
    surviving worker whose engine process was killed removes gpuexec's private directory
    (both may outlive the engine by a moment, reparented away from this process)."""
    deadline = time.monotonic() + timeout
    while (left := current() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def private_dirs() -> set[str]:
    """gpuexec's private ipc directories: under this run's own runtime directory (the
    tests' conftest sets ``XDG_RUNTIME_DIR``, so other gpuexec users of the host are not
    counted), else wherever they could be made."""
    run_dir = os.environ.get("XDG_RUNTIME_DIR", "")
    roots = {run_dir} if run_dir else {"/tmp", os.environ.get("TMPDIR", "")}
    found: set[str] = set()
    for root in filter(None, roots):
        found.update(glob.glob(os.path.join(root, "gpuexec-*")))
        found.update(glob.glob(os.path.join(root, "gpx-*")))
    return {d for d in found if "bench" not in d}  # benchmarks name theirs gpx-bench-*


def still_running(procs: list[psutil.Process], timeout: float = 30.0) -> list[int]:
    """Pids of ``procs`` alive after ``timeout`` s (waits on their exit, not a sleep)."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p.pid for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
