"""Values of every kind the faithful-values tests send, a worker that echoes, builds and
checks them, and the comparison they must pass (importable by path from every start
method, so the classes here are "classes in an importable module")."""

from __future__ import annotations

import dataclasses
import enum
import importlib
import math
import os
import sys
import time
from collections import deque, namedtuple
from decimal import Decimal
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np

from gpuexec import Worker

try:
    import torch
except ImportError:  # pragma: no cover - torch is optional
    torch = None  # type: ignore[assignment]


class Color(enum.Enum):
    RED = "red"
    GREEN = 2


class Perm(enum.IntFlag):
    R = 4
    W = 2
    X = 1


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass
class Point:
    x: Any
    y: Any


@dataclasses.dataclass(frozen=True)
class Frozen:
    name: str
    parts: tuple[Any, ...]


Pair = namedtuple("Pair", ["left", "right"])


class Plain:
    """A user class with neither dataclass nor pickle support of its own."""

    def __init__(self, payload: Any) -> None:
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        return type(other) is Plain and same(self.payload, other.payload)

    def __hash__(self) -> int:
        return 0


def same(a: Any, b: Any) -> bool:
    """``type(a) is type(b)`` and equal, at every depth; arrays by dtype, shape and
    values; NaN equals NaN (and keeps its sign: -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    t = type(a)
    if t is float:
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) ==
                                                     math.copysign(1, b))
    if t is complex:
        return same(a.real, b.real) and same(a.imag, b.imag)
    if t is Decimal:
        return str(a) == str(b)
    if isinstance(a, (np.ndarray, np.generic)):  # the same bytes: NaN, NaT and -0.0 too
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if torch is not None and isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and \
            a.requires_grad == b.requires_grad and \
            torch.equal(a.detach().reshape(-1).view(torch.uint8),
                        b.detach().reshape(-1).view(torch.uint8))
    if isinstance(a, enum.Enum):
        return a is b
    if isinstance(a, (list, tuple, deque)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b)) and \
            getattr(a, "maxlen", None) == getattr(b, "maxlen", None)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(x, b[k]) for k, x in a.items()) and \
            all(same(k, next(j for j in b if j == k)) for k in a)
    if isinstance(a, (set, frozenset)):
        return a == b and all(same(x, next(y for y in b if y == x)) for x in a)
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name))
                   for f in dataclasses.fields(a))
    return bool(a == b)


def main_class() -> type:
    """A dataclass that lives in ``__main__`` (as a user's script would define it):
    cloudpickle carries such a class by value."""
    cls = dataclasses.make_dataclass("MainThing", [("value", Any)])
    cls.__module__ = "__main__"
    return cls


class _Boom:
    """Pickles fine; unpickling raises (``__reduce__`` failing on load)."""

    def __reduce__(self) -> Any:
        return (_explode, ("no way back",))


def _explode(message: str) -> None:
    raise ValueError(message)


class _ExitOnLoad:
    """Unpickling it raises SystemExit."""

    def __reduce__(self) -> Any:
        return (sys.exit, (3,))


class _InterruptOnLoad:
    """Unpickling it raises KeyboardInterrupt (not a real Ctrl-C)."""

    def __reduce__(self) -> Any:
        return (_interrupt, ())


def _interrupt() -> None:
    raise KeyboardInterrupt


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


class Untypeable(Exception):
    """An exception whose ``__str__`` raises SystemExit."""

    def __str__(self) -> str:
        raise SystemExit(4)


def ghost(directory: str, name: str) -> Any:
    """An instance of a class from module ``name``, written into ``directory`` (which
    only this process has on its path)."""
    # Every rank writes the file: each its own copy, moved into place whole, so that no
    # rank imports a file another rank has just truncated.
    mine = Path(directory, f"{name}.py.{os.getpid()}")
    mine.write_text(
        "class Ghost:\n    def __eq__(self, other):\n        return type(other) is Ghost\n")
    os.replace(mine, Path(directory, f"{name}.py"))
    if directory not in sys.path:
        sys.path.insert(0, directory)
    return importlib.import_module(name).Ghost()


class ValueWorker(Worker):
    def echo(self, *args: Any, **kwargs: Any) -> Any:
        return [list(args), kwargs]

    def profile(self, on: bool) -> list[str]:
        """Record the names of the Python functions this worker's main thread calls from
        now on (``on``), or stop and give them."""
        if on:
            self._seen: list[str] = []
            sys.setprofile(lambda frame, event, arg: self._seen.append(frame.f_code.co_name)
                           if event == "call" else None)
            return []
        sys.setprofile(None)
        return self._seen

    def identity(self, value: Any) -> Any:
        return value

    def keep(self, **kwargs: Any) -> list[bool]:
        """Keep ``kwargs`` (see ``kept``); whether each name came interned, as names the
        worker's ring core passes by name are (the interned str equal to a new copy of
        the name is the name itself)."""
        self._kept = kwargs
        return [sys.intern((name + ".")[:-1]) is name for name in kwargs]

    def kept(self) -> Any:
        return self._kept

    def by_rank(self, kinds: list[str], late_rank: int = -1, late_s: float = 0.0) -> Any:
        """This rank's kind of result (``kinds[rank]``): ``"int"`` 7, ``"tuple"`` (7,) (a
        value the codec must carry), ``"raise"`` a ValueError; rank ``late_rank`` answers
        ``late_s`` seconds late."""
        if self.rank == late_rank:
            time.sleep(late_s)
        kind = kinds[self.rank]
        if kind == "raise":
            raise ValueError(f"rank {self.rank} raised")
        return (7,) if kind == "tuple" else 7

    def build(self, blob: bytes) -> Any:
        """A result built here (from a pickle sent as plain bytes)."""
        return cloudpickle.loads(blob)

    def check(self, value: Any, blob: bytes) -> list[int]:
        """The indices of the items of ``value`` (a list) that did not arrive intact."""
        expected = cloudpickle.loads(blob)
        return [i for i, (x, y) in enumerate(zip(value, expected, strict=True))
                if not same(x, y)]

    def return_boom(self, on_rank: int = -1) -> Any:
        """A result the driver cannot unpickle (from rank ``on_rank`` only, if given)."""
        if on_rank >= 0 and on_rank != self.rank:
            return None
        return {"ok": 1, "bad": [_Boom()]}

    def return_exit_on_load(self) -> Any:
        return _ExitOnLoad()

    def return_interrupt_on_load(self) -> Any:
        return [_InterruptOnLoad()]

    def return_ghost(self, directory: str, name: str) -> Any:
        return ghost(directory, name)

    def return_lock(self) -> Any:
        import threading

        return {"k": (1, threading.Lock())}

    def raise_unprintable(self) -> None:
        raise Unprintable()

    def raise_untypeable(self) -> None:
        raise Untypeable()

    def raise_surrogate(self) -> None:
        raise ValueError("bad \udc80 text")

    def raise_exit(self) -> None:
        raise SystemExit(5)

    def raise_interrupt(self) -> None:
        raise KeyboardInterrupt

    def pid(self) -> int:
        import os

        return os.getpid()
