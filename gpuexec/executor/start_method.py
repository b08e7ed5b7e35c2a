"""Which start method gives working workers from this process, and why.

Signals that CUDA is initialised here, read without any CUDA call (calling ``cuInit``
in the driver to find out would itself break every forked child):

* ``libcuda.so`` mapped into this process (``/proc/self/maps``): any library that
  loaded the driver (torch, CuPy, Numba, JAX, ...) shows up there;
* ``torch.cuda.is_initialized()`` when torch is already imported.

Policy (``"auto"``; ``GPUEXEC_START_METHOD`` overrides it when set):

==========================  ===========  ==========================================
CUDA in this process        auto         explicit ``fork``
==========================  ===========  ==========================================
not initialised             fork         fork
initialised                 spawn (one   :class:`~gpuexec.errors.StartMethodError`
                            warning)     naming what loaded CUDA and the fix
==========================  ===========  ==========================================

``fork`` is preferred when safe: it is the fastest start and needs no ``__main__``
guard. ``spawn`` and ``forkserver`` re-import the user's ``__main__`` in each child;
:func:`check_not_bootstrapping` turns the resulting recursion into a clear error.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import sys

import msgspec

from ..errors import StartMethodError

log = logging.getLogger("gpuexec")

START_METHODS = ("auto", "fork", "spawn", "forkserver")
ENV_START_METHOD = "GPUEXEC_START_METHOD"

# Libraries that load libcuda, by the file name they map (what to tell the user).
_CUDA_USERS = (
    (re.compile(r"libtorch_cuda\.so"), "torch"),
    (re.compile(r"libcupy|cupy_backends|cupy/_core"), "cupy"),
    (re.compile(r"numba"), "numba"),
    (re.compile(r"xla_extension|jaxlib|libjax"), "jax"),
    (re.compile(r"libcudart\.so"), "the CUDA runtime (libcudart)"),
    (re.compile(r"tensorflow"), "tensorflow"),
)
_warned_auto = False

GUARD_HINT = (
    "Your script has no `if __name__ == \"__main__\":` guard, and start method {method} "
    "re-imports the main module in every worker, which would create the executor again. "
    "Put the code that creates the Executor under\n\n    if __name__ == \"__main__\":\n\n"
    "or use start_method=\"fork\" (possible while CUDA is not initialised in this process)."
)


class CudaState(msgspec.Struct, frozen=True):
    """What this process knows about its own CUDA state, without calling CUDA."""

    libcuda_mapped: bool
    libcuda_path: str
    torch_initialized: bool
    loaded_by: list[str]        # libraries that likely loaded CUDA, e.g. ["torch"]

    @property
    def initialized(self) -> bool:
        return self.libcuda_mapped or self.torch_initialized

    def describe(self) -> str:
        if not self.initialized:
            return "CUDA is not initialised in this process"
        what = []
        if self.libcuda_mapped:
            what.append(f"{self.libcuda_path or 'libcuda'} is mapped")
        if self.torch_initialized:
            what.append("torch.cuda.is_initialized() is True")
        who = ", ".join(self.loaded_by) or "an unknown library"
        return f"CUDA is initialised in this process ({'; '.join(what)}; loaded by {who})"


def cuda_state(maps_path: str = "/proc/self/maps") -> CudaState:
    try:
        with open(maps_path) as f:
            maps = f.read()
    except OSError:
        maps = ""
    libcuda = ""
    loaded_by: list[str] = []
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        name = os.path.basename(path)
        if not libcuda and re.match(r"libcuda\.so", name):
            libcuda = path
        for pattern, who in _CUDA_USERS:
            if who not in loaded_by and pattern.search(path):
                loaded_by.append(who)
    torch_init = False
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            torch_init = bool(torch.cuda.is_initialized())
        except Exception:
            torch_init = False
    if torch_init and "torch" not in loaded_by:
        loaded_by.insert(0, "torch")
    return CudaState(bool(libcuda), libcuda, torch_init, loaded_by if libcuda or torch_init else [])


def resolve_start_method(requested: str) -> tuple[str, str]:
    """Resolve ``requested`` to a concrete method and a one-line reason; see the table."""
    global _warned_auto
    env = os.environ.get(ENV_START_METHOD, "").strip()
    source = "start_method"
    if requested == "auto" and env:
        requested, source = env, ENV_START_METHOD
    if requested not in START_METHODS:
        raise StartMethodError(
            f"unknown {source} {requested!r}; expected one of {', '.join(START_METHODS)}")
    available = multiprocessing.get_all_start_methods()
    if requested != "auto" and requested not in available:
        raise StartMethodError(f"start method {requested!r} is not available on this platform")
    state = cuda_state()
    if requested == "fork" and state.initialized:
        raise StartMethodError(
            f"start_method='fork' would give workers whose CUDA is dead: {state.describe()}. "
            "A forked child cannot re-initialise CUDA. Use start_method='spawn' (or 'auto'), "
            "or create the Executor before anything touches CUDA.")
    if requested != "auto":
        return requested, f"{requested} requested ({source})"
    if state.initialized:
        if not _warned_auto:
            _warned_auto = True
            log.warning("gpuexec: %s; starting workers with 'spawn' instead of 'fork'",
                        state.describe())
        return "spawn", f"spawn: {state.describe()}, so fork is unsafe"
    if "fork" in available:
        return "fork", "fork: CUDA is not initialised in this process (fastest safe start)"
    return "spawn", "spawn: fork is not available on this platform"


_GUARD = re.compile(
    r"""^\s*if\s+(__name__\s*==\s*['"]__main__['"]|['"]__main__['"]\s*==\s*__name__)""",
    re.MULTILINE)


def reimports_main(method: str) -> bool:
    """Whether children started with ``method`` re-import the parent's ``__main__``."""
    if method not in ("spawn", "forkserver"):
        return False
    main = sys.modules.get("__main__")
    return bool(getattr(main, "__file__", None))


def main_lacks_guard() -> bool:
    """True when ``__main__`` is a script file with no ``if __name__ == "__main__":``."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
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
        raise StartMethodError(GUARD_HINT.format(method="spawn/forkserver"))
