"""gpuexec: a CUDA-aware multi-process worker executor.

    from gpuexec import Executor, Worker

    class MyWorker(Worker):
        def forward(self, x):
            return x * self.rank

    with Executor(MyWorker, world_size=2, device="cpu") as ex:
        print(ex.collective_rpc("forward", args=(3,)))   # [0, 3]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import errors
from .errors import (
    ConfigError,
    CudaDriverError,
    ExecutorClosedError,
    GpuexecError,
    InvalidArgumentError,
    ProtocolError,
    RemoteError,
    RpcTimeoutError,
    StartMethodError,
    ValueNotCarriedError,
    WorkerDiedError,
    WorkerStartupError,
)

if TYPE_CHECKING:
    from .executor import Executor, RankStatus, WorkerInfo
    from .executor.respawn import Recovery, RespawnReport
    from .ipc.checkpoint import SuspendReport
    from .ipc.reports import ContextAction, DeviceReport
    from .worker import Worker

# Imported on first use (PEP 562), so that a worker process, which imports this package
# on its way to gpuexec.worker, never loads the driver's modules.
_LAZY = {
    "Executor": "gpuexec.executor",
    "WorkerInfo": "gpuexec.executor",
    "RankStatus": "gpuexec.executor",
    "Recovery": "gpuexec.executor.respawn",
    "RespawnReport": "gpuexec.executor.respawn",
    "SuspendReport": "gpuexec.ipc.checkpoint",
    "ContextAction": "gpuexec.ipc.reports",
    "DeviceReport": "gpuexec.ipc.reports",
    "Worker": "gpuexec.worker",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gpuexec' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "ContextAction",
    "CudaDriverError",
    "DeviceReport",
    "Executor",
    "ExecutorClosedError",
    "GpuexecError",
    "InvalidArgumentError",
    "ProtocolError",
    "RankStatus",
    "Recovery",
    "RemoteError",
    "RespawnReport",
    "RpcTimeoutError",
    "StartMethodError",
    "SuspendReport",
    "ValueNotCarriedError",
    "Worker",
    "WorkerDiedError",
    "WorkerInfo",
    "WorkerStartupError",
    "__version__",
    "errors",
]
