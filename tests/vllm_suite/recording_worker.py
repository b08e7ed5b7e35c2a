"""vLLM's CPU worker, recording its shutdown (the tests check it ran in every worker)."""

from __future__ import annotations

import os
from pathlib import Path

from vllm.v1.worker.cpu_worker import CPUWorker

MARKS_ENV = "GPUEXEC_VLLM_TEST_MARKS"


class RecordingCPUWorker(CPUWorker):  # type: ignore[misc]
    def shutdown(self) -> None:
        marks = os.environ.get(MARKS_ENV)
        if marks:
            (Path(marks) / f"shutdown-{self.rank}-{os.getpid()}").touch()
        super().shutdown()
