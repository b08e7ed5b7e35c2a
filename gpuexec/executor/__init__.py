"""Driver side: configuration, start-method policy, launching, calls, shutdown."""

from .executor import Executor, WorkerInfo

__all__ = ["Executor", "WorkerInfo"]
