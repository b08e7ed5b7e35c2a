"""``python -m gpuexec.worker.checkpoint_controller DRIVER_PID``: the checkpoint controller.

Why a process of its own
------------------------
The driver API's checkpoint calls (``cuCheckpointProcessLock/Checkpoint/Restore/Unlock/
GetState``) need ``cuInit`` in the calling process, and the driver process must never
initialise CUDA: that breaks every worker it forks later and is the very bug gpuexec
exists to avoid. So the executor starts this small process on the first ``suspend()``
(``subprocess``: a fresh interpreter, nothing inherited), and it makes the calls on the
workers' pids. It is a process entry point, like ``python -m gpuexec.worker``, so it lives
in the worker room next to the libcuda binding it uses; the executor knows only its module
name and the messages of :mod:`gpuexec.ipc.checkpoint`.

Lifecycle
---------
``start → Hello → { Step → StepReply }* → EOF on stdin → exit``. It dies with the driver:
the worker watchdog (a pidfd of the driver; :mod:`.watchdog`) ends it the moment the
driver exits for any reason, SIGKILL included, even in the middle of a driver call, and
EOF on stdin ends it when the executor shuts down. SIGINT is ignored (a Ctrl-C reaches the
whole process group; the driver decides). It holds no GPU memory: it creates no context.

Each step runs the call for every pid at once, one thread per pid (ctypes releases the
GIL), so N workers take about as long as one; each result carries the call's CUresult
(name and text from the driver), the pid's state afterwards, the call's wall time, and
what NVML (when installed) and ``/proc`` say the pid holds afterwards.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import msgspec

from ..errors import CudaDriverError
from ..ipc.checkpoint import (
    Hello,
    PidResult,
    RankState,
    Step,
    StepReply,
    ToController,
    encode_frame,
    read_frame,
)
from .cuda_driver import CHECKPOINT_FUNCTIONS, CUDA_SUCCESS, CudaDriver, load_driver
from .watchdog import start_watchdog

_FUNCTION = {"lock": "cuCheckpointProcessLock", "checkpoint": "cuCheckpointProcessCheckpoint",
             "restore": "cuCheckpointProcessRestore", "unlock": "cuCheckpointProcessUnlock",
             "state": "cuCheckpointProcessGetState"}
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int) -> int | None:
    """Resident host memory of ``pid`` (``/proc/<pid>/statm``), None when unreadable."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def gpu_mib(pid: int) -> float | None:
    """MiB ``pid`` holds on all GPUs by NVML; None without NVML (``pynvml``)."""
    from .. import nvml

    if not nvml.available():
        return None
    return sum(nvml.process_mib(pid).values())


def hello() -> tuple[Hello, CudaDriver | None]:
    """Load libcuda, ``cuInit``, check the entry points: can this machine checkpoint?"""
    driver = load_driver()
    if driver is None:
        return Hello(ok=False, driver="", detail="no CUDA driver (libcuda.so.1) could be "
                     "loaded"), None
    try:
        driver.init()
        described = driver.describe()
    except CudaDriverError as e:
        return Hello(ok=False, driver="", detail=f"the CUDA driver did not start: {e}"), None
    if not driver.supports_checkpoint:
        missing = [f for f in CHECKPOINT_FUNCTIONS if driver.symbols[f] is None]
        return Hello(ok=False, driver=described, detail=(
            f"the CUDA driver has no checkpoint API (missing {', '.join(missing)}; it needs "
            "NVIDIA driver 570 or newer)")), None
    return Hello(ok=True, driver=described, detail=""), driver


_STATES: dict[str, RankState] = {s: s for s in ("running", "locked", "checkpointed", "failed")}


def _state(driver: CudaDriver, pid: int) -> RankState:
    try:
        return _STATES.get(driver.process_state(pid), "unknown")
    except CudaDriverError:
        return "unknown"


def run_step(driver: CudaDriver, step: Step) -> StepReply:
    """``step.op`` on every pid at once; never raises for a driver error (it is reported)."""
    calls: dict[str, Callable[[int], object]] = {
        "lock": lambda pid: driver.checkpoint_lock(pid, step.timeout_ms),
        "checkpoint": driver.checkpoint_checkpoint, "restore": driver.checkpoint_restore,
        "unlock": driver.checkpoint_unlock, "state": driver.process_state}
    call = calls[step.op]

    def one(pid: int) -> PidResult:
        start = time.perf_counter()
        code, name, text = 0, CUDA_SUCCESS, "no error"
        try:
            call(pid)
        except CudaDriverError as e:
            code, name, text = e.code, e.name, e.text
        seconds = time.perf_counter() - start
        return PidResult(pid=pid, function=_FUNCTION[step.op], code=code, name=name, text=text,
                         state=_state(driver, pid), seconds=seconds, gpu_mib=gpu_mib(pid),
                         rss_bytes=rss_bytes(pid))

    if len(step.pids) <= 1:
        return StepReply([one(pid) for pid in step.pids])
    with ThreadPoolExecutor(len(step.pids), thread_name_prefix="gpuexec-checkpoint") as pool:
        return StepReply(list(pool.map(one, step.pids)))


def serve(driver_pid: int, stdin: int, stdout: int) -> None:
    """The controller's loop; returns at EOF on ``stdin``."""
    start_watchdog(driver_pid)
    greeting, driver = hello()
    os.write(stdout, encode_frame(greeting))
    if driver is None:
        return
    decoder = msgspec.msgpack.Decoder(ToController)
    while True:
        try:
            step = decoder.decode(read_frame(stdin))
        except EOFError:
            return
        reply = encode_frame(run_step(driver, step))
        view = memoryview(reply)
        while view:
            view = view[os.write(stdout, view):]


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin, stdout = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)  # stray prints cannot corrupt the frames
    os.dup2(devnull, 1)
    os.close(devnull)
    serve(int(sys.argv[1]), stdin, stdout)


if __name__ == "__main__":
    main()
