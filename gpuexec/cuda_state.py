"""What this process knows about its own CUDA state, read without calling CUDA.

Neutral (imports no room): the driver's start-method choice (:mod:`gpuexec.executor.
start_method`) and the zygote's safety check (:mod:`gpuexec.worker.zygote_server`) both
ask it whether a fork would find CUDA dead.
"""

from __future__ import annotations

import os
import re
import sys

import msgspec

_CUDA_USERS = (
    (re.compile(r"libtorch_cuda\.so"), "torch"),
    (re.compile(r"libcupy|cupy_backends|cupy/_core"), "cupy"),
    (re.compile(r"numba"), "numba"),
    (re.compile(r"xla_extension|jaxlib|libjax"), "jax"),
    (re.compile(r"libcudart\.so"), "the CUDA runtime (libcudart)"),
    (re.compile(r"tensorflow"), "tensorflow"),
    (re.compile(r"libnvidia-ml\.so"), "NVML (pynvml)"),
)
# cuInit maps the control device and the GPUs; loading libcuda alone maps neither.
_DEVICE_FILE = re.compile(r"/dev/nvidia(ctl|\d+)$")


class CudaState(msgspec.Struct, frozen=True):
    """What this process knows about its own CUDA state, without calling CUDA."""

    libcuda_mapped: bool        # the driver library is loaded (not yet a problem for fork)
    libcuda_path: str
    driver_initialized: bool    # cuInit ran: the driver mapped /dev/nvidiactl or a GPU
    torch_initialized: bool     # torch.cuda.is_initialized()
    loaded_by: list[str]        # libraries that likely loaded CUDA, e.g. ["torch"]

    @property
    def initialized(self) -> bool:
        """True when forked children would find CUDA dead."""
        return self.driver_initialized or self.torch_initialized

    def describe(self) -> str:
        who = ", ".join(self.loaded_by) or "an unknown library"
        lib = self.libcuda_path or "libcuda"
        if not self.initialized:
            if self.libcuda_mapped:
                return (f"CUDA is loaded but not initialised in this process ({lib} is mapped, "
                        f"by {who}; cuInit has not run)")
            return "CUDA is not initialised in this process"
        what = []
        if self.driver_initialized:
            what.append(f"{lib} is mapped and has mapped the GPU device files (cuInit ran)")
        if self.torch_initialized:
            what.append("torch.cuda.is_initialized() is True")
        return f"CUDA is initialised in this process ({'; '.join(what)}; loaded by {who})"


def cuda_state(maps_path: str = "/proc/self/maps") -> CudaState:
    """Read :class:`CudaState` from ``maps_path`` (this process's memory map) and torch."""
    try:
        with open(maps_path) as f:
            maps = f.read()
    except OSError:
        maps = ""
    libcuda = ""
    devices = False
    loaded_by: list[str] = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        path = fields[5] if len(fields) == 6 else ""
        if not path:
            continue
        if _DEVICE_FILE.match(path):
            devices = True
            continue
        if not libcuda and re.match(r"libcuda\.so", os.path.basename(path)):
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
    return CudaState(bool(libcuda), libcuda, bool(libcuda) and devices, torch_init,
                     loaded_by if libcuda or torch_init else [])
