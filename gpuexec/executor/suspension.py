"""``Executor.suspend()`` / ``resume()``: every worker's GPU state parked in host memory.

The CUDA driver (570+) can checkpoint *any* process's GPU state from another process:
lock it (its new CUDA calls block, its submitted work drains), checkpoint it (device
memory copied into the process's host memory, the GPU released), later restore it (back
at the same addresses) and unlock it. That works for whatever the worker's code allocated
(torch's allocator, NCCL, cuBLAS workspaces, CUDA graphs), unlike an engine's own
"sleep mode". The calls need ``cuInit``, which the driver process must never make, so a
controller process makes them on the workers' pids (:class:`ControllerClient`, started on
the first ``suspend()``; see :mod:`gpuexec.worker.checkpoint_controller`).

Order and rollback, per operation (every step runs on all ranks at once in the controller)::

    suspend:  gate closes (calls held) ─▶ state (each pid known to the driver?)
              ─▶ lock ALL ─▶ checkpoint ALL ─▶ suspended
                  │ a rank failed      │ a rank failed (or the timeout passed)
                  ▼                    ▼
              unlock the locked    restore the checkpointed, unlock the locked
              ─▶ every rank running again: gate opens; CheckpointError names each failure
    resume:   state ─▶ restore ALL checkpointed ─▶ unlock ALL locked ─▶ gate opens
                  │ a rank failed: the restored ones are unlocked (running); the failed
                  ▼ rank stays where the driver left it; the gate stays closed; retry resume()

Locking every rank before checkpointing any (and restoring every rank before unlocking
any) keeps collectives consistent: no rank runs while a peer is half-parked.

Executor states (``Suspension.state``) and who moves them (the thread in suspend/resume,
under ``_lock``)::

    running ──suspend ok──▶ suspended ──resume ok──▶ running
    running ──suspend failed, all rolled back──▶ running
    running/suspended ──a rank could not be brought back──▶ suspended (resume retries it)
    any ──shutdown──▶ closed (workers killed: a parked worker cannot exit cleanly)

``timeout`` bounds the wait for another suspend/resume under way and, for a suspend, the
lock (the driver's own ``timeoutMs``); it is checked between lock and checkpoint. A
checkpoint or restore under way cannot be interrupted through the driver API, so it
finishes (or fails) first, and the rollback then runs; a resume always runs to its end.
``suspend()`` twice and ``resume()`` of a running executor return at once, with
``changed=False`` reports.

Fields: ``state``, ``_controller`` are written under ``_lock`` by the thread in
suspend/resume, except that ``close()`` (shutdown's thread) sets ``state`` to ``closed``
and takes the controller away without the lock (see there); ``suspended`` is read by any
thread. ``_lock`` is taken before the gate's condition, never after.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Literal

import msgspec

from ..errors import (
    CheckpointError,
    CheckpointTimeoutError,
    CheckpointUnsupportedError,
    CudaDriverError,
    ExecutorClosedError,
)
from ..ipc.checkpoint import (
    FromController,
    Hello,
    PidResult,
    Step,
    StepName,
    StepReply,
    SuspendReport,
    encode_frame,
    read_frame,
)
from ..ipc.reports import DeviceReport
from .hold import CallGate
from .processes import child_env

log = logging.getLogger("gpuexec")

CONTROLLER_MODULE = "gpuexec.worker.checkpoint_controller"
_START_TIMEOUT = 60.0  # interpreter start + libcuda load + cuInit
_CLOSE_TIMEOUT = 2.0
_UNCLEAR = ("unknown", "failed")  # states after which the driver's real state is a guess


class ControllerClient:
    """The driver's end of one checkpoint controller process (started by the constructor).

    Used by one thread at a time (the suspension's lock): requests and replies alternate.
    """

    def __init__(self, timeout: float = _START_TIMEOUT) -> None:
        self._popen = subprocess.Popen(
            [sys.executable, "-m", CONTROLLER_MODULE, str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env(), close_fds=True)
        self._decoder = msgspec.msgpack.Decoder(FromController)
        stdin, stdout = self._popen.stdin, self._popen.stdout
        if stdin is None or stdout is None:  # cannot happen with PIPE; keeps the types honest
            raise RuntimeError("the checkpoint controller has no pipes")
        self._stdin, self._stdout = stdin, stdout
        self._in = stdin.fileno()  # requests go here
        self._out = stdout.fileno()  # replies come from here
        try:
            hello = self._decoder.decode(read_frame(self._out, time.monotonic() + timeout))
        except (EOFError, TimeoutError, msgspec.DecodeError, ValueError) as e:
            self.close()
            raise CheckpointUnsupportedError(
                {-1: f"the checkpoint controller did not start ({e})"}) from None
        if not isinstance(hello, Hello):
            self.close()
            raise CheckpointUnsupportedError({-1: f"the checkpoint controller said {hello!r}"})
        self.hello = hello

    @property
    def pid(self) -> int:
        return self._popen.pid

    def step(self, op: StepName, pids: Sequence[int], timeout_ms: int = 0) -> list[PidResult]:
        """Run one driver call on every pid (concurrently, in the controller)."""
        try:
            data = memoryview(encode_frame(Step(op, list(pids), timeout_ms)))
            while data:
                data = data[os.write(self._in, data):]
            reply = self._decoder.decode(read_frame(self._out))
        except (OSError, EOFError, msgspec.DecodeError, ValueError) as e:
            raise ControllerGone(f"the checkpoint controller (pid {self.pid}) failed during "
                                 f"{op}: {e}") from e
        if not isinstance(reply, StepReply) or len(reply.results) != len(pids):
            raise ControllerGone(f"the checkpoint controller answered {op} with {reply!r}")
        return reply.results

    def close(self) -> None:
        """EOF on its stdin (it exits after the call under way), SIGKILL if it does not
        within a moment; a thread waiting for its reply then gets EOF (ControllerGone)."""
        popen = self._popen
        self._stdin.close()
        try:
            popen.wait(_CLOSE_TIMEOUT)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
        self._stdout.close()


class ControllerGone(Exception):
    """The controller process died or spoke nonsense (internal; becomes CheckpointError)."""


def _driver_error(result: PidResult) -> CudaDriverError:
    return CudaDriverError(result.function, result.code, result.name, result.text)


class Suspension:
    """Suspend/resume of one executor's workers; see the module docstring."""

    def __init__(self, gate: CallGate, workers: Sequence[tuple[int, int]],
                 refused: dict[int, str]) -> None:
        self._gate = gate
        self._refused = refused  # why suspend cannot work here (rank -> reason), {} if it can
        self._ranks = [rank for rank, _ in workers]
        self._pids = {rank: pid for rank, pid in workers}
        self._lock = threading.Lock()
        self.state: Literal["running", "suspended", "closed"] = "running"
        self._controller: ControllerClient | None = None

    @property
    def suspended(self) -> bool:
        return self.state == "suspended"

    def replace_pids(self, pids: dict[int, int]) -> None:
        """Ranks replaced by a respawn (which is refused while suspended) run as ``pids``."""
        with self._lock:
            self._pids.update(pids)

    def _client(self) -> ControllerClient:
        if self.state == "closed":
            raise ExecutorClosedError("the executor is shut down")
        if self._controller is None:
            controller = ControllerClient()
            if not controller.hello.ok:
                controller.close()
                raise CheckpointUnsupportedError({-1: controller.hello.detail})
            self._controller = controller
        return self._controller

    def _step(self, op: StepName, ranks: Sequence[int], operation: str,
              timeout_ms: int = 0) -> dict[int, PidResult]:
        if not ranks:
            return {}
        controller = self._client()  # a new one if the last died (a rollback still runs)
        try:
            results = controller.step(op, [self._pids[r] for r in ranks], timeout_ms)
        except ControllerGone as e:
            controller.close()
            self._controller = None
            if op != "state" and self.state != "closed":  # workers may be parked: hold calls
                self.state = "suspended"
            raise CheckpointError(operation, {}, {r: "unknown" for r in self._ranks},
                                  str(e)) from None
        return dict(zip(ranks, results, strict=True))

    # -- suspend ---------------------------------------------------------------------

    def _acquire(self, operation: str, timeout: float | None) -> None:
        """Take ``_lock``, waiting at most ``timeout`` for a suspend/resume under way."""
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise CheckpointTimeoutError(operation, {}, {}, f"another suspend or resume was "
                                         f"still under way after {timeout:g} s")

    def suspend(self, timeout: float | None) -> list[SuspendReport]:
        deadline = None if timeout is None else time.monotonic() + timeout
        self._acquire("suspend", timeout)
        try:
            if self.state == "suspended":
                return self._unchanged("suspend", "checkpointed")
            if self._refused:
                raise CheckpointUnsupportedError(self._refused)
            self._client()  # CheckpointUnsupportedError here touches no worker
            self._gate.close()
            try:
                return self._suspend(timeout, deadline)
            finally:
                if self.state == "running":
                    self._gate.open()
        finally:
            self._lock.release()

    def _suspend(self, timeout: float | None, deadline: float | None) -> list[SuspendReport]:
        ranks = self._ranks
        before = self._step("state", ranks, "suspend")
        unknown = {r: f"the CUDA driver cannot checkpoint pid {res.pid}: {res.name}: {res.text}"
                   for r, res in before.items() if res.code != 0}
        unknown.update({r: f"pid {res.pid} is {res.state}, not running"
                        for r, res in before.items() if res.code == 0 and res.state != "running"})
        if unknown:
            raise CheckpointUnsupportedError(unknown)
        steps: dict[int, dict[str, float]] = {r: {} for r in ranks}
        lock = self._step("lock", ranks, "suspend", _timeout_ms(deadline))
        _record(steps, "lock", lock)
        failed = {r: _driver_error(res) for r, res in lock.items() if res.code != 0}
        late = not failed and _passed(deadline)
        if failed or late:
            states = self._roll_back(lock, "suspend")
            raise self._error("suspend", failed, states, timeout, late)
        done = self._step("checkpoint", ranks, "suspend")
        _record(steps, "checkpoint", done)
        failed = {r: _driver_error(res) for r, res in done.items() if res.code != 0}
        if failed:
            states = self._roll_back(done, "suspend")
            raise self._error("suspend", failed, states, timeout, False)
        self.state = "suspended"
        return [_report(r, self._pids[r], "suspend", steps[r], before[r], done[r], sign=-1)
                for r in ranks]

    def _back_to_running(self, states: dict[int, str], operation: str
                         ) -> tuple[dict[int, PidResult], dict[int, PidResult]]:
        """Restore the parked ranks, then unlock the locked ones; ``states`` is updated.
        A rank in an unclear state gets both calls: the one that does not fit its real
        state fails harmlessly (``CUDA_ERROR_ILLEGAL_STATE``)."""
        back = self._step("restore", [r for r, s in states.items()
                                      if s in (*_UNCLEAR, "checkpointed")], operation)
        states.update({r: res.state for r, res in back.items()})
        again = self._step("unlock", [r for r, s in states.items()
                                      if s in (*_UNCLEAR, "locked")], operation)
        states.update({r: res.state for r, res in again.items()})
        return back, again

    def _roll_back(self, last: dict[int, PidResult], operation: str) -> dict[int, str]:
        """Bring every rank back to running where the driver allows; return their states."""
        states: dict[int, str] = {r: res.state for r, res in last.items()}
        self._back_to_running(states, operation)
        stuck = {r: s for r, s in states.items() if s != "running"}
        if stuck:
            log.error("gpuexec: %s rollback left ranks %s not running; the executor stays "
                      "suspended (resume() retries, shutdown() always works)", operation, stuck)
            self.state = "suspended"
        else:
            self.state = "running"
        return states

    # -- resume ----------------------------------------------------------------------

    def resume(self, timeout: float | None) -> list[SuspendReport]:
        """Drive every rank back to running from wherever it is (so a failed resume can
        simply be retried). ``timeout`` bounds the wait for a suspend under way; a resume
        itself runs to the end: stopping between restore and unlock would only leave
        ranks locked."""
        self._acquire("resume", timeout)
        try:
            if self.state != "suspended":
                return self._unchanged("resume", "running")
            ranks = self._ranks
            self._client()
            before = self._step("state", ranks, "resume")
            states: dict[int, str] = {r: res.state for r, res in before.items()}
            restored, unlocked = self._back_to_running(states, "resume")
            steps: dict[int, dict[str, float]] = {r: {} for r in ranks}
            _record(steps, "restore", restored)
            _record(steps, "unlock", unlocked)
            failed = {r: _driver_error(res) for res_map in (restored, unlocked)
                      for r, res in res_map.items() if res.code != 0 and states[r] != "running"}
            if any(s != "running" for s in states.values()):
                raise self._error("resume", failed, states, timeout, False)
            self.state = "running"
            self._gate.open()
            after = {r: unlocked.get(r) or restored.get(r) or before[r] for r in ranks}
            return [_report(r, self._pids[r], "resume", steps[r], before[r], after[r], sign=1)
                    for r in ranks]
        finally:
            self._lock.release()

    # -- the rest --------------------------------------------------------------------

    def _unchanged(self, operation: Literal["suspend", "resume"],
                   state: Literal["checkpointed", "running"]) -> list[SuspendReport]:
        return [SuspendReport(rank=r, pid=self._pids[r], operation=operation,
                              state=state, changed=False, seconds=0.0) for r in self._ranks]

    @staticmethod
    def _error(operation: str, failed: dict[int, CudaDriverError], states: dict[int, str],
               timeout: float | None, late: bool) -> CheckpointError:
        timed_out = late or any(e.name == "CUDA_ERROR_TIMEOUT" for e in failed.values())
        if timed_out:
            return CheckpointTimeoutError(
                operation, failed, states, f"the timeout of {timeout:g} s passed" if late else "")
        return CheckpointError(operation, failed, states)

    def close(self) -> None:
        """Stop the controller (the executor shuts down; its workers are gone). Not under
        ``_lock``: a suspend stuck in a driver call must not hold shutdown up; killing the
        controller ends that call's wait (ControllerGone), and ``closed`` stops a new one."""
        self.state = "closed"
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.close()


def refusal(device: str, backend: str, reports: Sequence[DeviceReport]) -> dict[int, str]:
    """Why an executor's workers cannot be suspended (rank -> reason; -1: all of them)."""
    if backend != "mp":
        return {-1: f"suspend needs local worker processes, not backend={backend!r}"}
    if device != "cuda":
        return {-1: "CPU workers hold no GPU state to park (device='cpu'); nothing to suspend"}
    return {r.rank: r.checkpoint_detail or "not checkpointable"
            for r in reports if not r.checkpointable}


def _timeout_ms(deadline: float | None) -> int:
    if deadline is None:
        return 0
    return max(1, int((deadline - time.monotonic()) * 1000))


def _passed(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _record(steps: dict[int, dict[str, float]], name: str, results: dict[int, PidResult]) -> None:
    for rank, result in results.items():
        steps[rank][name] = result.seconds


def _report(rank: int, pid: int, operation: Literal["suspend", "resume"],
            steps: dict[str, float], before: PidResult, after: PidResult,
            sign: int) -> SuspendReport:
    """``sign`` -1: report GPU MiB freed (before - after); +1: taken back (after - before).
    None when NVML saw the pid on no GPU either time (another pid namespace)."""
    gpu = None if before.gpu_mib is None or after.gpu_mib is None or \
        before.gpu_mib == after.gpu_mib == 0 else sign * (after.gpu_mib - before.gpu_mib)
    host = None if before.rss_bytes is None or after.rss_bytes is None else \
        after.rss_bytes - before.rss_bytes
    return SuspendReport(rank=rank, pid=pid, operation=operation, state=after.state,
                         changed=bool(steps), seconds=sum(steps.values()), steps=steps,
                         gpu_mib=gpu,
                         host_bytes=host)
