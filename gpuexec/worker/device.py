"""Device selection for a worker, run before any user code.

Order matters, so it is spelled out:

1. ``isolate_devices=True``: ``CUDA_VISIBLE_DEVICES`` is narrowed to this worker's GPU
   *before* CUDA is initialised in the process (the worker then sees one device,
   ordinal 0). The driver's own ``CUDA_VISIBLE_DEVICES`` is respected: the worker
   gets the driver's visible device number ``gpu``, whatever physical GPU that is.
2. Otherwise every device stays visible (CUDA IPC and custom all-reduce need peers)
   and torch, when importable, makes ordinal ``gpu`` the current device.
3. Stale primary contexts on other devices are released through libcuda (see
   :mod:`gpuexec.worker.stale_contexts`), skipping any that still hold this process's
   allocations according to torch's caching allocator.

With ``device="cpu"`` or without a CUDA driver this is a no-op that still returns a
report. Nothing here raises for a per-device driver error: it is reported instead.
"""

from __future__ import annotations

import os
import sys
import time

from ..errors import CudaDriverError
from ..ipc.messages import WorkerSpec
from ..ipc.reports import ContextAction, DeviceReport


def visible_ordinal(spec: WorkerSpec) -> int:
    """The worker's own CUDA ordinal as this process sees it."""
    if spec.gpu is None:
        raise ValueError("not a CUDA worker")
    return 0 if spec.isolate_devices else spec.gpu


def isolate_environment(spec: WorkerSpec) -> None:
    """Narrow ``CUDA_VISIBLE_DEVICES`` to the worker's GPU (before CUDA loads)."""
    if spec.device != "cuda" or not spec.isolate_devices or spec.gpu is None:
        return
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    if parent is not None and parent.strip():
        entries = [e.strip() for e in parent.split(",") if e.strip()]
        os.environ["CUDA_VISIBLE_DEVICES"] = entries[spec.gpu]
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(spec.gpu)


def torch_device(spec: WorkerSpec) -> str:
    return "cpu" if spec.device != "cuda" else f"cuda:{visible_ordinal(spec)}"


def _torch_allocated(ordinal: int) -> int:
    """Bytes torch's caching allocator holds on ``ordinal`` (0 when torch is not in use)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return 0
    stats = torch.cuda.memory_stats(ordinal)
    return int(stats.get("reserved_bytes.all.current", 0)) or int(
        torch.cuda.memory_allocated(ordinal))


def init_device(spec: WorkerSpec) -> DeviceReport:
    """Select the worker's device and release stale contexts; see the module docstring."""
    start = time.perf_counter()
    if spec.device != "cuda":
        return DeviceReport(rank=spec.rank, device="cpu", ordinal=None)
    from .cuda_driver import load_driver
    from .stale_contexts import release_stale_contexts

    ordinal = visible_ordinal(spec)
    warnings: list[str] = []
    try:
        import torch
    except ImportError:
        torch = None  # type: ignore[assignment]
    if torch is not None:
        torch.cuda.set_device(ordinal)
    driver = load_driver()
    if driver is None:
        return DeviceReport(rank=spec.rank, device=torch_device(spec), ordinal=ordinal,
                            warnings=["no CUDA driver (libcuda.so.1) could be loaded"],
                            elapsed_ms=(time.perf_counter() - start) * 1e3)
    uuid = ""
    active: list[int] = []
    actions: list[ContextAction] = []
    driver_text = ""
    try:
        driver.init()
        driver_text = driver.describe()
        uuid = driver.device_uuid(driver.device(ordinal))
        policy = "release" if spec.release_stale_contexts else "off"
        active, actions = release_stale_contexts(
            driver, ordinal, policy=policy, allocated_bytes=_torch_allocated)
    except CudaDriverError as e:
        warnings.append(f"stale-context check skipped: {e}")
    return DeviceReport(
        rank=spec.rank, device=torch_device(spec), ordinal=ordinal, uuid=uuid,
        driver=driver_text, active_before=active, actions=actions, warnings=warnings,
        elapsed_ms=(time.perf_counter() - start) * 1e3)
