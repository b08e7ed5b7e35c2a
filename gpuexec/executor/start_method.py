"""Which start method gives working workers from this process, and why.

What breaks ``fork`` is ``cuInit`` having run in the parent: a forked child then finds
CUDA dead (``cuInit`` returns 3 there). It is read without any CUDA call (calling
``cuInit`` to find out would itself break every forked child):

* ``libcuda.so`` mapped into this process (``/proc/self/maps``) shows which library
  *loaded* the driver (torch, CuPy, Numba, JAX, NVML...). Loading is not initialising:
  measured on an H200 host (``benchmarks/results/h200x2/cuda_maps_probe.txt``),
  ``import torch`` and ``nvmlInit()`` map libcuda, and a child forked after them runs
  CUDA fine; so the mapping alone does not refuse ``fork``.
* ``cuInit`` then maps the driver's device files (``/dev/nvidiactl``, ``/dev/nvidiaN``)
  into the process: libcuda mapped *and* a device file mapped means the driver is
  initialised, whichever library called it (``torch.cuda.is_available()`` does).
* ``torch.cuda.is_initialized()`` when torch is already imported.

Methods: ``zygote`` (gpuexec's: workers fork from a pre-warmed interpreter that has
imported torch but never CUDA nor the user's ``__main__``; see
:mod:`gpuexec.executor.zygote_client`), ``subprocess`` (gpuexec's: a fresh interpreter per
worker), and multiprocessing's ``fork``, ``spawn``, ``forkserver``.

Policy (``"auto"``; ``GPUEXEC_START_METHOD`` overrides it when set):

==========================  ==================  ===================================
CUDA in this process        auto                explicit ``fork``
==========================  ==================  ===================================
not loaded, or loaded only  zygote (else fork)  fork
initialised                 zygote (else        :class:`~gpuexec.errors.StartMethodError`
                            subprocess, with    naming what loaded CUDA and the fix
                            one warning)
==========================  ==================  ===================================

The zygote is preferred where pidfds exist (Linux >= 5.3): it needs no ``__main__``
guard, never inherits CUDA state, and a warm one starts workers at fork speed. When it
cannot start, ``auto`` falls back as the table says. ``spawn`` and ``forkserver``
re-import the user's ``__main__`` in each child; :func:`check_not_bootstrapping` turns
the resulting recursion into a clear error.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
import sys

from ..cuda_state import CudaState, cuda_state
from ..errors import StartMethodError

log = logging.getLogger("gpuexec")

START_METHODS = ("auto", "zygote", "subprocess", "fork", "spawn", "forkserver")
_OWN_METHODS = ("zygote", "subprocess")  # gpuexec's launchers, not multiprocessing's
ENV_START_METHOD = "GPUEXEC_START_METHOD"

# Libraries that load libcuda, by the file name they map (what to tell the user).
_warned_auto = False

GUARD_HINT = (
    "Your script has no `if __name__ == \"__main__\":` guard, and start method {method} "
    "re-imports the main module in every worker, which would create the executor again. "
    "Put the code that creates the Executor under\n\n    if __name__ == \"__main__\":\n\n"
    "or use start_method=\"fork\" (possible while CUDA is not initialised in this process)."
)


def resolve_start_method(requested: str, state: CudaState | None = None) -> tuple[str, str]:
    """Resolve ``requested`` to a concrete method and a one-line reason; see the table.

    ``state`` defaults to this process's :func:`cuda_state`.
    """
    global _warned_auto
    env = os.environ.get(ENV_START_METHOD, "").strip()
    source = "start_method"
    if requested == "auto" and env:
        requested, source = env, ENV_START_METHOD
    if requested not in START_METHODS:
        raise StartMethodError(
            f"unknown {source} {requested!r}; expected one of {', '.join(START_METHODS)}")
    available = [*multiprocessing.get_all_start_methods()]
    if zygote_available():
        available += _OWN_METHODS
    elif sys.platform.startswith("linux") or sys.platform == "darwin":
        available.append("subprocess")
    if requested != "auto" and requested not in available:
        raise StartMethodError(f"start method {requested!r} is not available on this platform")
    if state is None:
        state = cuda_state()
    if requested == "fork" and state.initialized:
        raise StartMethodError(
            f"start_method='fork' would give workers whose CUDA is dead: {state.describe()}. "
            "A forked child cannot re-initialise CUDA. Use start_method='spawn' (or 'auto'), "
            "or create the Executor before anything touches CUDA.")
    if requested != "auto":
        return requested, f"{requested} requested ({source})"
    if "zygote" in available:
        return "zygote", ("zygote: workers fork from a pre-warmed interpreter that never "
                          "imported __main__ nor initialised CUDA (fast, guard-free, CUDA-safe)")
    if state.initialized:
        if not _warned_auto:
            _warned_auto = True
            log.warning("gpuexec: %s; starting workers with 'subprocess' instead of 'fork'",
                        state.describe())
        return "subprocess", f"subprocess: {state.describe()}, so fork is unsafe"
    if "fork" in available:
        return "fork", f"fork: {state.describe()} (fastest safe start)"
    return "subprocess", "subprocess: fork is not available on this platform"


_GUARD = re.compile(
    r"""^\s*if\s+(__name__\s*==\s*['"]__main__['"]|['"]__main__['"]\s*==\s*__name__)""",
    re.MULTILINE)


def zygote_available() -> bool:
    """The zygote needs pidfds (Linux >= 5.3) to watch and signal workers it forked."""
    if not (sys.platform.startswith("linux") and hasattr(os, "pidfd_open")
            and hasattr(signal, "pidfd_send_signal")):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True


def fallback_method(state: CudaState | None = None) -> str:
    """What ``auto`` uses when the zygote cannot start: fork while it is safe, else a
    fresh interpreter per worker (guard-free, unlike spawn)."""
    state = cuda_state() if state is None else state
    return "subprocess" if state.initialized else "fork"


def reimports_main(method: str) -> bool:
    """Whether children started with ``method`` re-import the parent's ``__main__``."""
    if method not in ("spawn", "forkserver"):
        return False
    main = sys.modules.get("__main__")
    return bool(getattr(main, "__file__", None))


def main_lacks_guard(module: str = "__main__") -> bool:
    """True when ``module`` (``__main__``, or ``__mp_main__`` while a spawn or forkserver
    child re-imports it) is a script file with no ``if __name__ == "__main__":``."""
    path = getattr(sys.modules.get(module), "__file__", None)
    if not path:
        return False
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return _GUARD.search(f.read()) is None
    except OSError:
        return False


def check_not_bootstrapping() -> None:
    """Raise if this process is a child re-importing ``__main__`` (no guard in the script).

    ``multiprocessing`` marks the process as ``_inheriting`` while it re-imports the main
    module in a spawn or forkserver child; creating an executor then would recurse.
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        if main_lacks_guard("__mp_main__"):
            # The driver reads the same script, finds the same missing guard and raises
            # the one error the user reads; a traceback per worker would only repeat it.
            raise SystemExit(1)
        raise StartMethodError(GUARD_HINT.format(method="spawn/forkserver"))
