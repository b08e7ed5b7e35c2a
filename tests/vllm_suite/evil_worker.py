"""vLLM's CPU worker whose model ``forward`` raises on rank 0 after 10 good passes (the
case of vLLM's own tests/v1/shutdown/test_forward_error.py). The patch is made in the
worker process itself: gpuexec's workers do not inherit the test process's monkeypatches
(they are forked from the zygote, not from the engine)."""

from __future__ import annotations

from typing import Any

from vllm.v1.worker.cpu_worker import CPUWorker

GOOD_PASSES = 10


def evil_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    from vllm.distributed import get_tensor_model_parallel_rank

    calls = getattr(self, "num_calls", 0)
    if calls == GOOD_PASSES and get_tensor_model_parallel_rank() == 0:
        raise Exception("Simulated illegal memory access on Rank 0!")
    self.num_calls = calls + 1
    return self.model(*args, **kwargs)


class EvilForwardCPUWorker(CPUWorker):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from vllm.model_executor.models.llama import LlamaForCausalLM

        LlamaForCausalLM.forward = evil_forward
        super().__init__(*args, **kwargs)
