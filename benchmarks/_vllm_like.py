"""The worker and the engine-like argument of ``benchmarks/values.py`` (importable by
workers, as an engine's own classes are)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from gpuexec import Worker


class Phase(enum.Enum):
    PREFILL = 1
    DECODE = 2


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float
    max_tokens: int
    stop: tuple[str, ...]


@dataclass
class NewRequest:
    req_id: str
    prompt_token_ids: list[int]
    block_ids: tuple[list[int], ...]
    sampling: SamplingParams
    phase: Phase


def engine_step(n_requests: int = 16) -> dict[str, Any]:
    """A dict of dataclasses holding tuples and enums: the shape of a serving engine's
    per-step scheduler output."""
    return {
        f"req-{i}": NewRequest(f"req-{i}", list(range(i, i + 32)), ([i, i + 1], [i + 2]),
                               SamplingParams(0.7, 0.95, 128, ("</s>",)),
                               Phase.PREFILL if i % 4 == 0 else Phase.DECODE)
        for i in range(n_requests)
    }


class TakeWorker(Worker):
    def noop(self) -> None:
        return None

    def take(self, *args: Any, **kwargs: Any) -> None:
        return None
