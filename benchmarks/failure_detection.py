"""How fast failures are noticed: a dead worker, and a dead driver.

(a) SIGKILL of a worker while a blocking ``collective_rpc`` waits on it: the time from
    the kill (``time.perf_counter()`` in the killing ``threading.Timer`` thread, just
    before ``os.kill``) to the ``WorkerDiedError`` in the caller. Baseline in the same
    run: ``multiprocessing.Pool(2).apply_async`` of a sleeping function whose worker is
    SIGKILLed, and ``.get(timeout=5)``; Pool replaces the worker but never fails the
    lost task, so the expected baseline is "no error within 5 s". The baseline runs in
    a fresh interpreter in its own process group, killed afterwards (see
    :func:`pool_baseline`).
(b) SIGKILL of a driver subprocess holding an Executor whose rank 1 is in a long call:
    the time until its last worker is gone (psutil, polled every 1 ms; a zombie counts
    as gone), which is each worker's guardian process at work.
(c) The same while rank 1 sits in a C call that holds the GIL (libc ``sleep(60)``
    through ``ctypes.PyDLL``, which no Python thread of that worker can interrupt), and
    until *every* process the driver started is gone (workers, guardians, the zygote or
    forkserver, a grandchild rank 1 started). Baselines in the same run, with their
    processes started by ``multiprocessing`` (fork) in the same C call: plain children
    (``daemon=True``), and children whose watchdog is a Python thread waiting on a pidfd
    of the parent (what gpuexec's workers relied on before their guardian); each is
    watched for ``POOL_CAP_S`` and then killed.

Usage: ``python benchmarks/failure_detection.py [--trials 20] [--methods fork]
[--out DIR]``. With the defaults the run takes about a minute on 2 cores.
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing as mp
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil
from _common import add_out_option, arg_parser, machine, print_table, write_json

from gpuexec import Executor, Worker, WorkerDiedError

ROOT = Path(__file__).resolve().parent.parent
TARGET_A_MS = 100.0    # median, worker SIGKILL -> WorkerDiedError
TARGET_B_MS = 1000.0   # max, driver SIGKILL -> last worker gone (also (c): last process)
POOL_CAP_S = 5.0
KILL_DELAY_S = 0.1     # the call is well under way by then


class SleepWorker(Worker):
    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


def _summary(samples_ms: list[float]) -> dict[str, float]:
    return {"p50_ms": statistics.median(samples_ms), "max_ms": max(samples_ms),
            "min_ms": min(samples_ms), "n": len(samples_ms)}


# -- (a) worker SIGKILL -> WorkerDiedError ----------------------------------------------

def worker_death_once(method: str) -> float:
    """One trial: milliseconds from the worker's SIGKILL to the caller's exception."""
    with Executor(SleepWorker, 2, device="cpu", start_method=method,
                  shutdown_timeout=0.1) as ex:
        victim = ex.workers[1].pid
        killed: list[float] = []

        def kill() -> None:
            killed.append(time.perf_counter())
            os.kill(victim, signal.SIGKILL)

        timer = threading.Timer(KILL_DELAY_S, kill)
        timer.start()
        try:
            ex.collective_rpc("sleep", args=(30,))  # every rank: rank 0 stays busy
        except WorkerDiedError as e:
            t_err = time.perf_counter()
            if e.rank != 1 or e.signal_name != "SIGKILL":
                raise RuntimeError(f"unexpected death report: {e}") from e
        else:
            raise RuntimeError("the call returned although its worker was killed")
        finally:
            timer.join()
        return (t_err - killed[0]) * 1e3


# -- (a) baseline: multiprocessing.Pool -------------------------------------------------

_PID_PIPE_W = -1  # inherited by the fork-started Pool workers


def _pool_sleep(trial: int, seconds: float) -> float:
    os.write(_PID_PIPE_W, f"{trial}:{os.getpid()}\n".encode())
    time.sleep(seconds)
    return seconds


def _pool_trials(trials: int) -> list[dict[str, Any]]:
    """All trials at once (a hang costs POOL_CAP_S each): one Pool(2) per trial, the
    worker running the task SIGKILLed, then every AsyncResult watched for POOL_CAP_S
    (what ``.get(timeout=5)`` would do). The pools are not terminated here: the caller
    kills this whole process group."""
    global _PID_PIPE_W
    r, w = os.pipe()
    _PID_PIPE_W = w
    ctx = mp.get_context("fork")
    results = [ctx.Pool(2).apply_async(_pool_sleep, (i, 30)) for i in range(trials)]
    buf = b""
    deadline = time.monotonic() + 10
    while buf.count(b"\n") < trials and time.monotonic() < deadline:
        if select.select([r], [], [], 0.5)[0]:
            buf += os.read(r, 4096)
    busy = dict(tuple(map(int, x.split(b":"))) for x in buf.split())
    if len(busy) != trials:
        raise RuntimeError(f"only {len(busy)} of {trials} pool tasks started")
    killed = [0.0] * trials
    for i in range(trials):
        killed[i] = time.perf_counter()
        os.kill(busy[i], signal.SIGKILL)
    outcome: list[dict[str, Any]] = [{} for _ in range(trials)]
    left = set(range(trials))
    while left and time.perf_counter() - killed[-1] < POOL_CAP_S:
        for i in list(left):
            if results[i].ready():
                t = time.perf_counter()
                try:
                    results[i].get(timeout=0)
                    what = "returned"
                except Exception as e:
                    what = f"raised {type(e).__name__}"
                outcome[i] = {"outcome": what, "ms": (t - killed[i]) * 1e3}
                left.discard(i)
        time.sleep(0.001)
    for i in left:
        try:
            results[i].get(timeout=0.001)
            outcome[i] = {"outcome": "returned", "ms": None}
        except mp.TimeoutError:
            outcome[i] = {"outcome": f"no error within {POOL_CAP_S:g} s", "ms": None}
    return outcome


def pool_baseline(trials: int) -> list[dict[str, Any]]:
    """Run :func:`_pool_trials` in a fresh interpreter in its own process group, then
    SIGKILL that group. Pool.terminate() can hang once a worker was SIGKILLed (it
    joins a replacement worker that never exits), and a fresh interpreter does not
    inherit anything an Executor installed in this one (gpuexec's SIGTERM handler)."""
    code = ("import json, sys; import failure_detection as f; "
            "print(json.dumps(f._pool_trials(int(sys.argv[1]))), flush=True)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen([sys.executable, "-c", code, str(trials)], stdout=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        assert proc.stdout is not None
        if not select.select([proc.stdout], [], [], POOL_CAP_S + 30)[0]:
            raise RuntimeError("the Pool baseline did not report")
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the Pool baseline failed (exit {proc.wait()})")
        out: list[dict[str, Any]] = json.loads(line)
        return out
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its pools and their workers too
        except ProcessLookupError:
            pass
        proc.wait()


# -- (b) driver SIGKILL -> workers gone -------------------------------------------------

DRIVER = """
import json, sys, time
from failure_detection import SleepWorker
from gpuexec import Executor
ex = Executor(SleepWorker, 2, device="cpu", start_method=sys.argv[1])
fut = ex.collective_rpc("sleep", args=(60,), ranks=[1], non_block=True)
time.sleep(0.05)
print(json.dumps({"pids": [w.pid for w in ex.workers], "dir": ex._endpoints.path}), flush=True)
time.sleep(60)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


_KIDS: list[subprocess.Popen[bytes]] = []  # a worker's grandchildren, kept referenced


def hold_gil(w: Worker, marker: str) -> None:
    """Rank 1: start a grandchild, then hold the GIL in C for 60 s (after ``marker``)."""
    if w.rank == 1:
        _KIDS.append(subprocess.Popen(["sleep", "60"]))
        Path(marker).touch()
        ctypes.PyDLL(None).sleep(60)


DRIVER_GIL = """
import json, os, sys, time
from failure_detection import SleepWorker, hold_gil
from gpuexec import Executor
ex = Executor(SleepWorker, 2, device="cpu", start_method=sys.argv[1])
marker = os.path.join(ex._endpoints.path, "in_c")
fut = ex.collective_rpc(hold_gil, args=(marker,), non_block=True)
while not os.path.exists(marker):
    time.sleep(0.001)
time.sleep(0.05)
print(json.dumps({"pids": [w.pid for w in ex.workers], "dir": ex._endpoints.path}), flush=True)
time.sleep(60)
"""


def _driver_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")) if p))


def driver_death_once(method: str, script: str = DRIVER, everything: bool = False) -> float:
    """One trial: milliseconds from the driver's SIGKILL to its last worker gone (with
    ``everything``: to the last process it started, of those alive at the kill)."""
    proc = subprocess.Popen([sys.executable, "-c", script, method], stdout=subprocess.PIPE,
                            text=True, env=_driver_env(), start_new_session=True)
    watched: list[psutil.Process] = []
    ipc_dir = ""
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"driver exited early with {proc.wait()}")
        started = json.loads(line)
        ipc_dir = started["dir"]
        watched = psutil.Process(proc.pid).children(recursive=True) if everything else \
            [psutil.Process(p) for p in started["pids"]]
        t_kill = time.perf_counter()
        os.kill(proc.pid, signal.SIGKILL)
        left = [p.pid for p in watched]
        while left:
            left = [p for p in left if not _gone(p)]
            if left:
                if time.perf_counter() - t_kill > 10:
                    raise RuntimeError(f"{left} still running 10 s after the kill")
                time.sleep(0.001)
        return (time.perf_counter() - t_kill) * 1e3
    finally:
        proc.kill()  # our child: its pid stays ours until wait()
        for w in watched:
            try:
                if w.is_running():  # same pid and start time: never a reused pid
                    w.kill()
            except psutil.Error:
                pass
        proc.wait()
        if ipc_dir:  # a SIGKILLed driver cannot remove its ipc directory itself
            shutil.rmtree(ipc_dir, ignore_errors=True)


# -- (c) baselines: multiprocessing children holding the GIL ------------------------------

MP_DRIVER = """
import ctypes, json, multiprocessing as mp, os, sys, threading, time

def watchdog(parent):
    fd = os.pidfd_open(parent)
    def watch():
        import select
        select.select([fd], [], [])
        os._exit(70)
    threading.Thread(target=watch, daemon=True).start()

def child(parent, with_watchdog, w):
    if with_watchdog:
        watchdog(parent)
    os.write(w, b"x")
    ctypes.PyDLL(None).sleep(60)

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    r, w = os.pipe()
    n, with_watchdog = int(sys.argv[1]), sys.argv[2] == "1"
    kids = [ctx.Process(target=child, args=(os.getpid(), with_watchdog, w), daemon=True)
            for _ in range(n)]
    for k in kids:
        k.start()
    got = 0
    while got < n:
        got += len(os.read(r, n))
    time.sleep(0.05)
    print(json.dumps([k.pid for k in kids]), flush=True)
    time.sleep(60)
"""


def mp_baseline(n: int, with_watchdog: bool) -> dict[str, Any]:
    """``n`` fork children in the C call, their parent SIGKILLed once: how many are gone
    within ``POOL_CAP_S`` and when (all watched at once), then the rest killed."""
    proc = subprocess.Popen([sys.executable, "-c", MP_DRIVER, str(n), str(int(with_watchdog))],
                            stdout=subprocess.PIPE, text=True, env=_driver_env(),
                            start_new_session=True)
    kids: list[psutil.Process] = []
    try:
        assert proc.stdout is not None
        kids = [psutil.Process(p) for p in json.loads(proc.stdout.readline())]
        t_kill = time.perf_counter()
        os.kill(proc.pid, signal.SIGKILL)
        gone_ms: dict[int, float] = {}
        while len(gone_ms) < n and time.perf_counter() - t_kill < POOL_CAP_S:
            for k in kids:
                if k.pid not in gone_ms and _gone(k.pid):
                    gone_ms[k.pid] = (time.perf_counter() - t_kill) * 1e3
            time.sleep(0.001)
        return {"n": n, "gone": len(gone_ms), "samples_ms": sorted(gone_ms.values()),
                "cap_s": POOL_CAP_S}
    finally:
        proc.kill()
        for k in kids:
            try:
                if k.is_running():
                    k.kill()
            except psutil.Error:
                pass
        proc.wait()


def main() -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--trials", type=int, default=20, help="kills per measurement")
    ap.add_argument("--methods", default="fork",
                    help="start methods for (a) and (b), comma-separated")
    add_out_option(ap)
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    # Each (a) trial shuts down an executor whose rank 0 is still in its 30 s call:
    # the "sending SIGTERM" warning is expected there, once per trial.
    logging.getLogger("gpuexec").setLevel(logging.ERROR)
    t_start = time.monotonic()
    rows: list[list[Any]] = []
    results: dict[str, Any] = {"worker_death": {}, "driver_death": {}, "driver_death_gil": {},
                               "driver_death_gil_baseline": {}}

    for method in methods:
        worker_death_once(method)  # warm-up (imports, forkserver start)
        a = [worker_death_once(method) for _ in range(args.trials)]
        s = _summary(a)
        results["worker_death"][method] = {**s, "samples_ms": a}
        rows.append([f"(a) worker SIGKILL -> WorkerDiedError [{method}]", s["n"], s["p50_ms"],
                     s["max_ms"], f"p50 <= {TARGET_A_MS:g} ms",
                     "yes" if s["p50_ms"] <= TARGET_A_MS else "NO"])

    pool = pool_baseline(args.trials)
    errors = [o["ms"] for o in pool if o["ms"] is not None]
    hung = sum(o["ms"] is None for o in pool)
    results["pool_baseline"] = {"trials": pool, "hung": hung, "cap_s": POOL_CAP_S}
    p50 = statistics.median(errors) if errors else f"none of {len(pool)} in {POOL_CAP_S:g} s"
    worst = max(errors) if errors else "-"
    rows.append(["(a) baseline mp.Pool(2) .get() after SIGKILL", len(pool), p50, worst,
                 "(reference)", f"{hung}/{len(pool)} hung"])

    for method in methods:
        b = [driver_death_once(method) for _ in range(args.trials)]
        s = _summary(b)
        results["driver_death"][method] = {**s, "samples_ms": b}
        rows.append([f"(b) driver SIGKILL -> workers gone [{method}]", s["n"], s["p50_ms"],
                     s["max_ms"], f"max <= {TARGET_B_MS:g} ms",
                     "yes" if s["max_ms"] <= TARGET_B_MS else "NO"])

    for method in methods:
        c = [driver_death_once(method, DRIVER_GIL, everything=True) for _ in range(args.trials)]
        s = _summary(c)
        results["driver_death_gil"][method] = {**s, "samples_ms": c}
        rows.append([f"(c) driver SIGKILL, GIL held in C -> all gone [{method}]", s["n"],
                     s["p50_ms"], s["max_ms"], f"max <= {TARGET_B_MS:g} ms",
                     "yes" if s["max_ms"] <= TARGET_B_MS else "NO"])
    for label, with_watchdog in (("plain mp.Process", False),
                                 ("mp.Process + watchdog thread", True)):
        base = mp_baseline(args.trials, with_watchdog)
        results["driver_death_gil_baseline"][label] = base
        done = base["samples_ms"]
        rows.append([f"(c) baseline {label}, GIL held in C", base["n"],
                     statistics.median(done) if done else f"none in {POOL_CAP_S:g} s",
                     max(done) if done else "-", "(reference)",
                     f"{base['n'] - base['gone']}/{base['n']} alive after {POOL_CAP_S:g} s"])

    print_table(["measurement", "n", "p50 ms", "max ms", "target", "met"], rows)
    elapsed = time.monotonic() - t_start
    print(f"targets: (a) median <= {TARGET_A_MS:g} ms; (b), (c) every trial <= "
          f"{TARGET_B_MS:g} ms; "
          f"run took {elapsed:.1f} s")
    path = write_json("failure_detection.json", {
        "machine": machine(), "trials": args.trials, "methods": methods,
        "targets": {"worker_death_p50_ms": TARGET_A_MS, "driver_death_max_ms": TARGET_B_MS},
        "kill_delay_s": KILL_DELAY_S, "results": results, "elapsed_s": elapsed}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
