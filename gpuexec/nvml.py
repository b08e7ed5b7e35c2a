"""What NVML says about this process's GPU memory (optional: needs ``pynvml``).

NVML numbers GPUs physically (``nvidia-smi`` order), while CUDA ordinals depend on
``CUDA_VISIBLE_DEVICES`` and ``CUDA_DEVICE_ORDER``; the two are matched by UUID. In a
container with its own PID namespace NVML may report host pids, in which case this
process is simply not found and the numbers are empty (never wrong).
"""

from __future__ import annotations

import os
from typing import Any

_nvml: Any = None      # the pynvml module once initialised, False when unavailable


def _lib() -> Any:
    global _nvml
    if _nvml is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml = pynvml
        except Exception:
            _nvml = False
    return _nvml


def available() -> bool:
    return bool(_lib())


def index_of_uuid(uuid: str) -> int | None:
    """The NVML index of the GPU with this ``GPU-...`` UUID."""
    nv = _lib()
    if not nv or not uuid:
        return None
    for i in range(nv.nvmlDeviceGetCount()):
        got = nv.nvmlDeviceGetUUID(nv.nvmlDeviceGetHandleByIndex(i))
        if (got.decode() if isinstance(got, bytes) else got) == uuid:
            return i
    return None


def process_mib(pid: int | None = None) -> dict[int, float]:
    """MiB that ``pid`` (default: this process) holds on each GPU, by NVML index."""
    nv = _lib()
    if not nv:
        return {}
    pid = os.getpid() if pid is None else pid
    out: dict[int, float] = {}
    for i in range(nv.nvmlDeviceGetCount()):
        handle = nv.nvmlDeviceGetHandleByIndex(i)
        try:
            procs = nv.nvmlDeviceGetComputeRunningProcesses(handle)
        except Exception:  # noqa: S112 - a GPU NVML cannot query (MIG, fallen off) is skipped
            continue
        for p in procs:
            if p.pid == pid:
                used = p.usedGpuMemory or 0
                out[i] = out.get(i, 0.0) + used / 2**20
    return out


def processes_on_several_gpus() -> dict[int, dict[int, float]]:
    """Every process NVML sees holding memory on more than one GPU: pid -> {index: MiB}."""
    nv = _lib()
    if not nv:
        return {}
    seen: dict[int, dict[int, float]] = {}
    for i in range(nv.nvmlDeviceGetCount()):
        try:
            procs = nv.nvmlDeviceGetComputeRunningProcesses(nv.nvmlDeviceGetHandleByIndex(i))
        except Exception:  # noqa: S112 - a GPU NVML cannot query (MIG, fallen off) is skipped
            continue
        for p in procs:
            seen.setdefault(p.pid, {})[i] = (p.usedGpuMemory or 0) / 2**20
    return {pid: gpus for pid, gpus in seen.items() if len(gpus) > 1}
