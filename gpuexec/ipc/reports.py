"""Typed records of what a worker did to its devices at start-up.

Each worker sends one :class:`DeviceReport` to the driver with its ready message, and the
executor keeps them in ``Executor.device_reports``: which device the worker took, which
other devices had a primary context active in it (stale contexts cost a few hundred MiB
each on someone else's GPU) and what was done about each one (:class:`ContextAction`).
They are msgspec Structs so that they travel inside the wire messages as they are, never
flattened into strings; ``frozen`` because a report describes the past.

``ContextAction.action`` values:

=====================  ==================================================================
``released``           released; the context is inactive now
``retained_elsewhere`` released our retain, but another owner in the process still
                       retains it, so it stays active (policy ``release``)
``reset``              still retained after the release, so it was reset (policy ``reset``)
``in_use``             this process still holds allocations there: nothing was called
``error``              a driver call failed; ``result`` and ``detail`` say which and why
``left_active``        found active, left alone because release is disabled (policy ``off``)
=====================  ==================================================================
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = ["ActionName", "ContextAction", "DeviceReport"]

ActionName = Literal["released", "retained_elsewhere", "reset", "in_use", "error", "left_active"]


class ContextAction(msgspec.Struct, frozen=True, kw_only=True):
    """What was done about one active primary context on a device other than the worker's."""

    device: int  # CUDA ordinal as the worker process sees it
    uuid: str  # "GPU-..." as nvidia-smi prints it, "" when the driver could not say
    action: ActionName  # see the table in the module docstring
    result: str  # CUresult name of the last release/reset call, "" when no call was made
    detail: str = ""  # for people: the error text, the bytes still allocated...


class DeviceReport(msgspec.Struct, frozen=True, kw_only=True):
    """One worker's device initialisation: its own device and every stale context it handled."""

    rank: int  # the worker's rank
    device: str  # "cuda:1" or "cpu"
    ordinal: int | None  # own CUDA ordinal as seen by the worker, None on CPU
    uuid: str = ""  # own device's uuid, "" when unknown or on CPU
    driver: str = ""  # "" (no CUDA driver), or e.g. "CUDA 12.8 (libcuda.so.1)"
    # ordinals (other than its own) whose primary context was active before any release
    active_before: list[int] = msgspec.field(default_factory=list)
    actions: list[ContextAction] = msgspec.field(default_factory=list)  # one per active_before
    # NVML, after the release: MiB this worker still holds on GPUs not its own, by NVML
    # (physical, nvidia-smi) index; non-empty means the hygiene check failed (see warnings)
    foreign_mib: dict[int, float] = msgspec.field(default_factory=dict)
    freed_mib: float | None = None  # NVML: MiB freed by the releases, None when unknown
    nvml_index: int | None = None  # own GPU's NVML index, None when NVML is unavailable
    release_ms: float = 0.0  # time the stale-context check and releases took (driver calls)
    elapsed_ms: float = 0.0  # time device initialisation took in the worker
    warnings: list[str] = msgspec.field(default_factory=list)  # also logged by the worker
    # Executor.suspend() can park this worker: a CUDA worker, a driver with the checkpoint
    # API (570+), no primary context left active on another GPU; else checkpoint_detail
    # says why not
    checkpointable: bool = False
    checkpoint_detail: str = "not a CUDA worker"
