"""gpuexec: a CUDA-aware multi-process worker executor.

    from gpuexec import Executor, Worker

    class MyWorker(Worker):
        def forward(self, x):
            return x * self.rank

    with Executor(MyWorker, world_size=2, device="cpu") as ex:
        print(ex.collective_rpc("forward", args=(3,)))   # [0, 3]
"""

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
from .executor import Executor, RankStatus, WorkerInfo
from .executor.respawn import Recovery, RespawnReport
from .ipc.checkpoint import SuspendReport
from .ipc.reports import ContextAction, DeviceReport
from .worker import Worker

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
