"""Which ring core runs the shared-memory hot path: the compiled one or its pure-Python
twin. Both speak the same bytes, so either side of a ring may run either.

The compiled core (``_ringcore``, C against Python's limited API: one abi3 build for
every CPython >= 3.10) has real acquire/release atomics, a real futex, and releases the
GIL while it spins or sleeps; :mod:`.ringcore_py` does the same with a lock as its fence
and ctypes for the futex. Every function takes ``(view, base, ...)``: the segment's
memoryview (the twin's way in) and its address (the compiled core's).

The choice is made once per process, when the first ring is built, from
``GPUEXEC_CORE``: ``auto`` (the default: compiled when it is built), ``compiled``
(:class:`~gpuexec.errors.ConfigError` when it is not) or ``python``. A driver falling
back from ``auto`` says so in one log line (:func:`announce`); ``gpuexec doctor`` shows
which core runs.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from typing import Any, Protocol, cast

from ..errors import ConfigError

log = logging.getLogger("gpuexec")

ENV = "GPUEXEC_CORE"
CHOICES = ("auto", "compiled", "python")
# The interface below; ``_ringcore.c``'s CORE_API must be the same. A build from an older
# source (an editable install after a pull, before make rebuilt it) is refused: it would
# be called with the wrong arguments.
API = 12


class Core(Protocol):
    """The functions both cores define (see ``_ringcore.c`` for each one's contract)."""

    NAME: str
    WriterFields: type  # base classes (see fields)
    CancelFields: type
    GateFields: type

    def fence(self) -> None: ...
    def published(self, view: memoryview, base: int) -> int: ...
    def publish(self, view: memoryview, base: int, slot_off: int, seq: int,
                n_readers: int, bell_view: memoryview | None, bell_base: int) -> None: ...
    def put_one(self, view: memoryview, base: int, slot_off: int, frame: bytes, seq: int,
                n_readers: int, bell_view: memoryview | None, bell_base: int) -> None: ...
    def take_frame(self, view: memoryview, base: int, reader_off: int, data_off: int,
                   n_slots: int, slot_size: int, max_len: int) -> tuple[bytes, int] | None: ...
    def release(self, view: memoryview, base: int, off: int, seq: int) -> None: ...
    def min_read(self, view: memoryview, base: int, first_off: int,
                 n_readers: int) -> int: ...
    def wait(self, view: memoryview, base: int, seq: int, flag_off: int,
             spin_until: float, sleep_until: float) -> bool: ...
    def next_frame(self, view: memoryview, base: int, reader_off: int, flag_off: int,
                   data_off: int, n_slots: int, slot_size: int, max_len: int,
                   spin: float, timeout: float) -> tuple[bytes, int] | bool: ...
    def ring(self, view: memoryview, base: int) -> None: ...
    def poke(self, view: memoryview, base: int) -> None: ...
    def epoch(self, view: memoryview, base: int) -> int: ...
    def collect(self, views: tuple[memoryview, ...], bases: tuple[int, ...],
                bell_view: memoryview, bell_base: int, data_off: int, n_slots: int,
                slot_size: int, max_len: int, befores: tuple[bytes, ...],
                afters: tuple[bytes, ...], epoch: int, spin_until: float,
                sleep_until: float, middle: bytes,
                want: int) -> tuple[int, int, int, list[bytes] | tuple[()]]: ...
    def gather(self, views: tuple[memoryview, ...], bases: tuple[int, ...],
               bell_view: memoryview, bell_base: int, epoch: int, spin_until: float,
               sleep_until: float) -> int: ...
    def serve(self, view: memoryview, base: int, reader_off: int, flag_off: int,
              data_off: int, n_slots: int, slot_size: int, max_len: int, spin: float,
              timeout: float, reply_view: memoryview, reply_base: int, reply_data_off: int,
              reply_n_slots: int, reply_slot_size: int, bell_view: memoryview | None,
              bell_base: int, call_before: bytes, calls: dict[bytes, str],
              reply_before: bytes, reply_after: bytes, max_reply: int, target: object,
              cancel: object, gate: object, decode: Callable[[bytes], Any] | None,
              call_type: type, reply_frame: Callable[[int, Any], bytes | None] | None,
              first_spin: float) -> tuple[tuple[Any, int] | bool | None,
                         tuple[int, str, Any, BaseException | None, int, bytes | None] | None,
                         list[tuple[int, float]] | None]: ...
    def pack_plain(self, value: object) -> bytes | None: ...
    def unpack_plain(self, frame: bytes) -> tuple[Any] | None: ...


_current: Core | None = None
_why_not = ""          # why the compiled core could not be loaded ("" if it was)
_announced = False


def _compiled() -> Core | None:
    global _why_not
    try:
        module = importlib.import_module("gpuexec.ipc._ringcore")
    except ImportError as e:
        _why_not = str(e) or type(e).__name__
        return None
    built = getattr(module, "API", None)
    if built != API:
        _why_not = (f"the build found is stale: interface {built}, this source needs {API}; "
                    f"rebuild it with make or pip install -e .")
        return None
    return cast(Core, module)


def load(choice: str) -> Core:
    """The core for ``choice`` (one of :data:`CHOICES`)."""
    if choice not in CHOICES:
        raise ConfigError(f"{ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice != "python":
        core = _compiled()
        if core is not None:
            return core
        if choice == "compiled":
            raise ConfigError(f"{ENV}=compiled, but the compiled ring core is not "
                                  f"built ({_why_not})")
    return cast(Core, importlib.import_module("gpuexec.ipc.ringcore_py"))


def current() -> Core:
    """This process's core, chosen on first use (see the module docstring)."""
    global _current
    if _current is None:
        _current = load(os.environ.get(ENV, "auto").strip().lower() or "auto")
    return _current


def select(choice: str) -> Core:
    """Make ``choice`` this process's core for rings built from now on (tests, bench)."""
    global _current
    _current = load(choice)
    return _current


def fields(name: str) -> type:
    """The base class ``name`` (``WriterFields``, ``CancelFields``, ``GateFields``) of
    the objects whose hot attributes the compiled core keeps in a C struct, where it is
    built, whichever core runs: a ring's writer (its position, which the driver's compiled
    round trip reads and advances), a worker's cancellation point and its reply gate
    (which its serve() reads and writes per call), each with no attribute lookup; Python
    reads and writes them as attributes. Else the pure-Python twin's (plain attributes)."""
    core = _compiled() or cast(Core, importlib.import_module("gpuexec.ipc.ringcore_py"))
    base: type = getattr(core, name)
    return base


def describe() -> str:
    """Which core runs here and, for the fallback, why (``gpuexec doctor``)."""
    core = current()
    if core.NAME == "compiled":
        return "compiled (C, abi3)"
    if _why_not:
        return f"pure Python (the compiled core is not built: {_why_not})"
    return f"pure Python ({ENV}=python)"


def announce() -> None:
    """Log, once per process, that the pure-Python fallback runs because the compiled
    core is not built (an explicit ``GPUEXEC_CORE=python`` is not announced)."""
    global _announced
    if _announced:
        return
    _announced = True
    if current().NAME != "compiled" and _why_not:
        log.warning("gpuexec: the compiled ring core is not built (%s); shared memory runs "
                    "on the pure-Python core (same behaviour, slower; see README: "
                    "Installing)", _why_not)
