"""numpy arrays and CPU tensors as (dtype, shape, raw bytes), and back without a copy.

The codec (:mod:`gpuexec.ipc.codec`) sends the raw bytes out of band and the dtype and
shape in an extension; this module decides what is carried that way and checks what
arrives. Only exact ``numpy.ndarray`` and ``torch.Tensor`` objects whose bytes say it
all are: a subclass (a masked array, an ``nn.Parameter``), a tensor that needs
autograd, a sparse or quantized tensor, an object dtype or a dtype with metadata is
pickled instead, which keeps what raw bytes would lose. 0-d arrays keep their shape
``()``. Arrays arrive writable on every path (raw, pickled, shared memory), as a fresh
array built by the receiver would be, whether or not the sender's was.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from .values import Refused, Unrebuilt

MAX_NDIM = 64
# The form of what a sender writes, ``dtype.str``: byte order, kind, item size and a
# datetime unit. Anything else (an alias such as 'a' or 'float64', which numpy may warn
# about or read differently from release to release) is a broken message, refused
# before numpy parses it.
_DTYPE_STR = re.compile(r"[<>|](?:[biufcSUV][0-9]{1,9}|[mM]8(?:\[[0-9]{0,9}[A-Za-z]{1,2}\])?)")
_KNOWN_DTYPES: dict[str, Any] = {}  # dtype.str -> numpy dtype, as checked on arrival
_KNOWN_MAX = 256


class BadBuffer(ValueError):
    """A buffer that does not match its declared dtype and shape (a broken message)."""


def raw_array(obj: Any, dtypes: dict[Any, bool]) -> tuple[bool, str, tuple[int, ...], Any] | None:
    """``(is a tensor, dtype name, shape, uint8 view of the bytes)`` for an array or tensor
    carried as raw bytes; None for anything else. ``dtypes`` caches, per numpy dtype,
    whether ``dtype.str`` rebuilds it exactly. Raises :class:`Refused` for a tensor that
    is not on the CPU."""
    np = sys.modules.get("numpy")
    if np is not None and obj.__class__ is np.ndarray:
        dtype = obj.dtype
        ok = dtypes.get(dtype)
        if ok is None:
            ok = dtypes[dtype] = not dtype.hasobject and dtype.fields is None \
                and dtype.itemsize > 0 and np.dtype(dtype.str) == dtype \
                and dtype.metadata is None  # metadata: pickled, which keeps it
        if not ok:
            return None
        # Not ascontiguousarray: it turns a 0-d array into a 1-d one.
        arr = obj if obj.flags.c_contiguous else obj.copy(order="C")
        return False, dtype.str, arr.shape, arr.reshape(-1).view(np.uint8)
    torch = sys.modules.get("torch")
    if torch is not None and obj.__class__ is torch.Tensor:
        if obj.layout != torch.strided or obj.is_quantized or obj.requires_grad:
            return None
        if obj.device.type != "cpu":
            raise Refused(f"a tensor on {obj.device} cannot be sent: move it to the CPU "
                          "first (tensor.cpu()), or share it through CUDA IPC")
        t = obj.resolve_conj().resolve_neg().contiguous()
        return (True, str(t.dtype).removeprefix("torch."), tuple(t.shape),
                t.reshape(-1).view(torch.uint8).numpy())
    return None


def check_size(dtype: str, shape: list[int], nbytes: int, tensor: bool, where: str) -> None:
    """The buffer must hold exactly ``prod(shape)`` items of ``dtype`` (checked before
    anything is allocated or viewed, so a huge declared shape costs nothing). A size
    that does not add up is a broken message (:class:`BadBuffer`: dropped); a tensor
    where torch is missing, or a dtype this process does not know, is a value it cannot
    rebuild (:class:`Unrebuilt`: that call gets the error)."""
    if len(shape) > MAX_NDIM or any(d < 0 for d in shape):
        raise BadBuffer(f"bad array shape {shape[:8]}")
    if tensor:
        try:
            import torch
        except ImportError:
            raise Unrebuilt("a tensor", f"torch.{dtype}",
                            f"torch is not installed in {where}") from None
        tdtype = getattr(torch, dtype, None)
        if not isinstance(tdtype, torch.dtype):
            raise Unrebuilt("a tensor", "torch.Tensor", f"{where} has no torch dtype {dtype!r}")
        itemsize = tdtype.itemsize
    else:
        itemsize = _numpy_dtype(dtype, where).itemsize
    count = 1
    for d in shape:
        count *= d
    if count * itemsize != nbytes:
        raise BadBuffer(f"array of {shape[:8]} x {dtype} declared over a buffer of "
                        f"{nbytes} bytes")


def _numpy_dtype(dtype: str, where: str) -> Any:
    """The numpy dtype a sender wrote as ``dtype.str`` (see :data:`_DTYPE_STR`), one
    that raw bytes carry whole. Raises :class:`BadBuffer` for any other string or dtype,
    :class:`Unrebuilt` for one this process's numpy does not know (another release)."""
    npdtype = _KNOWN_DTYPES.get(dtype)
    if npdtype is not None:
        return npdtype
    if not _DTYPE_STR.fullmatch(dtype):
        raise BadBuffer(f"refused numpy dtype {dtype[:32]!r}")
    import numpy as np

    try:
        npdtype = np.dtype(dtype)
    except Exception:
        raise Unrebuilt("an array", "numpy.ndarray",
                        f"{where} has no numpy dtype {dtype!r}") from None
    if npdtype.str != dtype or npdtype.hasobject or npdtype.fields is not None or \
            npdtype.itemsize == 0:
        raise BadBuffer(f"refused numpy dtype {dtype!r}")
    if len(_KNOWN_DTYPES) >= _KNOWN_MAX:  # item sizes made up by a sender: stay bounded
        _KNOWN_DTYPES.clear()
    _KNOWN_DTYPES[dtype] = npdtype
    return npdtype


def build(dtype: str, shape: list[int], buf: Any, tensor: bool) -> Any:
    """A numpy array or CPU tensor over ``buf`` (checked by :func:`check_size`), without
    copying it."""
    if not tensor:
        import numpy as np

        arr = np.frombuffer(buf, dtype=_numpy_dtype(dtype, "")).reshape(shape)
        # arrays arrive writable, whatever memory carried them (a read-only frame)
        return arr if arr.flags.writeable else arr.copy()
    import torch

    tdtype = getattr(torch, dtype)
    if len(buf) == 0:
        return torch.empty(shape, dtype=tdtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(tdtype).reshape(shape)
