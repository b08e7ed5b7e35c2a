"""gpuexec's vLLM executor with other settings, for benchmarks/vllm_engine.py (a module of
its own: vLLM's engine process and gpuexec's workers import it by name)."""

from __future__ import annotations

from gpuexec.integrations.vllm import VllmExecutor


class ColdVllmExecutor(VllmExecutor):
    """The zygote preloads only torch: every worker imports vLLM itself after the fork."""

    preload = ("torch",)
