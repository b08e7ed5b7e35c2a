"""Find and release primary contexts a worker holds on devices that are not its own.

Why: each CUDA primary context costs a few hundred MiB on its GPU. A worker that touched
another device before (or after) selecting its own, through a library probe or the
user's import-time code, keeps a context there that belongs to nobody's plan; with N
workers GPU 0 can lose N of them. This module is step 2 of "Device initialisation" in
DESIGN.md; it needs only a :class:`~gpuexec.worker.cuda_driver.CudaDriver`, so CI tests
it against a fake libcuda, and the caller passes torch's allocator (if any) as a callable.

Per foreign device whose primary context is active::

    policy "off" ------------------------------------------------------> left_active
    allocated_bytes(ordinal) > 0 (or it raised) -------------------------> in_use / error
    cuDevicePrimaryCtxRelease, then read the state again
        inactive ------------------------------------------------------> released
        still active, policy "release" --------------------------------> retained_elsewhere
        still active, policy "reset": cuDevicePrimaryCtxReset ---------> reset
    any CudaDriverError on the way ------------------------------------> error

Release is called at most once per device: retains are counted, and torch retains a
primary context once, so one release frees a context nobody else holds; releasing again
would take away another owner's retain (a library that retained it on its own) and leave
it with a dangling context. Still active after one release therefore means "someone else
retains it", which only ``reset`` overrides, destroying that owner's allocations too.
"""

from __future__ import annotations

from collections.abc import Callable

from gpuexec.errors import CudaDriverError
from gpuexec.ipc.reports import ContextAction
from gpuexec.worker.cuda_driver import CUDA_SUCCESS, CudaDriver

__all__ = ["POLICIES", "release_stale_contexts"]

POLICIES = ("release", "reset", "off")
"""Accepted ``policy`` values of :func:`release_stale_contexts`."""


def release_stale_contexts(
    driver: CudaDriver,
    own_ordinal: int,
    *,
    policy: str = "release",
    allocated_bytes: Callable[[int], int] | None = None,
) -> tuple[list[int], list[ContextAction]]:
    """Release the active primary contexts of every device except ``own_ordinal``.

    ``own_ordinal`` is the worker's device as this process numbers it; that device is
    never queried or touched. ``allocated_bytes(ordinal)`` reports memory this process
    still has allocated on a device (torch's ``memory_allocated``): a context holding
    allocations is never released. ``policy`` is ``"release"`` (the default), ``"reset"``
    (also reset contexts another owner keeps alive) or ``"off"`` (report only).

    Returns ``(active, actions)``: the foreign ordinals whose primary context was active
    before anything was done, and one :class:`ContextAction` per such ordinal (plus one
    ``error`` action per device whose state could not be read).

    Raises :class:`ValueError` for an unknown policy (before any driver call), and
    :class:`CudaDriverError` when ``cuInit`` or ``cuDeviceGetCount`` fails: then nothing
    is known about any device, and the caller turns that into its report. Errors on one
    device become an ``error`` action and the other devices are still handled.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(map(repr, POLICIES))}, not {policy!r}")
    driver.init()
    count = driver.device_count()
    active: list[int] = []
    actions: list[ContextAction] = []
    for ordinal in range(count):
        if ordinal == own_ordinal:
            continue
        try:
            dev = driver.device(ordinal)
            _, is_active = driver.primary_ctx_state(dev)
        except CudaDriverError as exc:
            actions.append(_error(ordinal, "", exc))
            continue
        if not is_active:
            continue
        active.append(ordinal)
        actions.append(_handle(driver, ordinal, dev, policy, allocated_bytes))
    return active, actions


def _handle(
    driver: CudaDriver,
    ordinal: int,
    dev: int,
    policy: str,
    allocated_bytes: Callable[[int], int] | None,
) -> ContextAction:
    """Decide and act on one foreign device whose primary context is active."""
    uuid = _uuid(driver, dev)
    if policy == "off":
        return ContextAction(
            device=ordinal,
            uuid=uuid,
            action="left_active",
            result="",
            detail="release disabled (policy 'off')",
        )
    if allocated_bytes is not None:
        try:
            in_use = allocated_bytes(ordinal)
        except Exception as exc:
            # The caller's callable (torch's allocator): whatever it raises, "unknown" must
            # mean "maybe in use", so no release, and never a failed worker start.
            return ContextAction(
                device=ordinal,
                uuid=uuid,
                action="error",
                result="",
                detail=f"not released: allocated_bytes({ordinal}) raised "
                f"{type(exc).__name__}: {exc}",
            )
        if in_use > 0:
            return ContextAction(
                device=ordinal,
                uuid=uuid,
                action="in_use",
                result="",
                detail=f"not released: this process still has {in_use} bytes allocated there",
            )
    try:
        driver.primary_ctx_release(dev)
        _, still_active = driver.primary_ctx_state(dev)
    except CudaDriverError as exc:
        return _error(ordinal, uuid, exc)
    if not still_active:
        return ContextAction(device=ordinal, uuid=uuid, action="released", result=CUDA_SUCCESS)
    if policy == "release":
        return ContextAction(
            device=ordinal,
            uuid=uuid,
            action="retained_elsewhere",
            result=CUDA_SUCCESS,
            detail="still active after one release: another owner in this process retains it",
        )
    try:
        driver.primary_ctx_reset(dev)
    except CudaDriverError as exc:
        return _error(ordinal, uuid, exc)
    return ContextAction(
        device=ordinal,
        uuid=uuid,
        action="reset",
        result=CUDA_SUCCESS,
        detail="still retained by another owner after release: reset",
    )


def _uuid(driver: CudaDriver, dev: int) -> str:
    """The device uuid for the report, or ``""``: a uuid is never a reason to skip a device."""
    try:
        return driver.device_uuid(dev)
    except CudaDriverError:
        return ""


def _error(ordinal: int, uuid: str, exc: CudaDriverError) -> ContextAction:
    """An ``error`` action naming the failed call, its CUresult name and the driver's text."""
    return ContextAction(
        device=ordinal,
        uuid=uuid,
        action="error",
        result=exc.name,
        detail=f"{exc.function} returned {exc.name} ({exc.code}): {exc.text}",
    )
