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
4. Hygiene check (NVML, when ``pynvml`` is installed): the memory this process still
   holds on GPUs other than its own, and what the releases freed, go in the report;
   anything left is a warning.

The worker runs this twice at start-up: before it imports or unpickles the user's
class (so import-time CUDA work lands on its own GPU), and again after the class was
built (to release what the import, the arguments or ``__init__`` left on other GPUs).

With ``device="cpu"`` or without a CUDA driver this is a no-op that still returns a
report. Nothing here raises for a per-device driver error: it is reported instead.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import msgspec

from ..errors import CudaDriverError
from ..ipc.messages import WorkerSpec
from ..ipc.reports import ContextAction, DeviceReport

log = logging.getLogger("gpuexec.worker")


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
    from .. import nvml
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
                            checkpoint_detail="no CUDA driver (libcuda.so.1) could be loaded",
                            elapsed_ms=(time.perf_counter() - start) * 1e3)
    uuid = ""
    active: list[int] = []
    actions: list[ContextAction] = []
    driver_text = ""
    release_ms = 0.0
    before = nvml.process_mib()
    try:
        driver.init()
        driver_text = driver.describe()
        uuid = driver.device_uuid(driver.device(ordinal))
        t = time.perf_counter()
        active, actions = release_stale_contexts(
            driver, ordinal, policy=spec.stale_context_policy, allocated_bytes=_torch_allocated)
        release_ms = (time.perf_counter() - t) * 1e3
    except CudaDriverError as e:
        warnings.append(f"stale-context check skipped: {e}")
    own = nvml.index_of_uuid(uuid)
    freed: float | None = None
    foreign: dict[int, float] = {}
    if own is not None:
        after = nvml.process_mib()
        foreign = {i: mib for i, mib in after.items() if i != own and mib > 0}
        freed = sum(m for i, m in before.items() if i != own) - sum(foreign.values())
        if foreign:
            held = ", ".join(f"GPU {i}: {mib:.0f} MiB" for i, mib in sorted(foreign.items()))
            warnings.append(f"this worker (own GPU {own}) still holds memory on other GPUs "
                            f"({held}); see the actions for why")
    for w in warnings:
        log.warning("gpuexec: %s", w)
    why_not = _not_checkpointable(driver.supports_checkpoint, driver_text, actions)
    return DeviceReport(
        rank=spec.rank, device=torch_device(spec), ordinal=ordinal, uuid=uuid,
        driver=driver_text, active_before=active, actions=actions, warnings=warnings,
        foreign_mib=foreign, freed_mib=freed, nvml_index=own, release_ms=release_ms,
        elapsed_ms=(time.perf_counter() - start) * 1e3, checkpointable=not why_not,
        checkpoint_detail=why_not)


def _not_checkpointable(api: bool, driver_text: str, actions: list[ContextAction]) -> str:
    """Why the driver's checkpoint API cannot park this worker; "" when it can.

    A primary context left active on a GPU the worker does not own is part of the
    process's CUDA state too: a checkpoint would park it and a restore would need that GPU
    as well, and such leftovers are what made restores of forked workers fail. Releasing
    them at start-up (the default) is what makes a worker checkpointable.
    """
    if not driver_text:
        return "the CUDA driver could not be initialised"
    if not api:
        return (f"{driver_text} has no checkpoint API (cuCheckpointProcess*: NVIDIA driver "
                "570 or newer)")
    stale = sorted({a.device for a in actions if a.action not in ("released", "reset")})
    if stale:
        return (f"primary contexts still active on GPUs {stale} besides its own (see the "
                "actions; stale_context_policy='reset' releases contexts retained elsewhere)")
    return ""


def merge_reports(first: DeviceReport, later: DeviceReport) -> DeviceReport:
    """One report for the start-up passes (before the worker class, and after it was built):
    the later pass's final state, every pass's actions, times and freed memory summed."""
    freed = None if first.freed_mib is None and later.freed_mib is None else \
        (first.freed_mib or 0.0) + (later.freed_mib or 0.0)
    return msgspec.structs.replace(
        later,
        active_before=sorted(set(first.active_before) | set(later.active_before)),
        actions=[*first.actions, *later.actions],
        warnings=[w for w in first.warnings if w not in later.warnings] + later.warnings,
        freed_mib=freed,
        release_ms=first.release_ms + later.release_ms,
        elapsed_ms=first.elapsed_ms + later.elapsed_ms)
