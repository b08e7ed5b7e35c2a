"""Driver side: configuration, start-method policy, launching, calls, shutdown."""

from .executor import Executor, WorkerInfo
from .forensics import RankStatus

__all__ = ["Executor", "RankStatus", "WorkerInfo"]
