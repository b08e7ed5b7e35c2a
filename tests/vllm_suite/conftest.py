"""The vLLM suite: real vLLM (the CPU build) on a tiny random Llama written here.

Runs only under ``make test-vllm`` (its own virtual environment, GPUEXEC_VLLM_SUITE=1);
the default suite skips it. A package (``vllm_suite``): its modules must not shadow
the other tests' ``conftest`` nor the ``vllm`` package. Token-id prompts, no tokenizer,
nothing downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

SUITE = os.environ.get("GPUEXEC_VLLM_SUITE") == "1"

if SUITE:
    # Before vLLM is imported: no CPU binding on a 2-core CI host, a small KV cache, one
    # OpenMP thread per worker (two workers on two cores: no spinning against each other).
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if SUITE:
        return
    skip = pytest.mark.skip(reason="the vLLM suite runs with `make test-vllm`")
    for item in items:
        if "tests/vllm_suite/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vllm_suite.tiny_model import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


_baselines: dict[int, list[list[int]]] = {}


@pytest.fixture(scope="session")
def mp_tokens(model_dir: Path) -> Callable[[int], list[list[int]]]:
    """Greedy tokens of vLLM's own ``mp`` executor at a TP size (computed once each)."""
    from vllm_suite.engines import engine_kwargs, generate, shutdown_llm

    def tokens(tp: int) -> list[list[int]]:
        if tp not in _baselines:
            from vllm import LLM

            llm = LLM(**engine_kwargs(model_dir, tp, "mp"))
            try:
                _baselines[tp] = generate(llm)
            finally:
                shutdown_llm(llm)
        return _baselines[tp]

    return tokens
