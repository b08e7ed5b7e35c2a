"""What a value of a call becomes on the wire, and back: the same type and an equal value.

The rule, for arguments, keyword arguments and results, at any depth, on every transport:
a value arrives with the same type and an equal value, or the call fails with
:class:`~gpuexec.errors.ValueNotCarriedError` naming where the value sat
(``args[0]['k'][2]``), its type and why. There is no third outcome: msgpack's own
conversions (a dataclass into a dict, an enum into its value, a tuple or a set into a
list, a datetime into a string) never happen, because only the types msgpack gives back
unchanged are left to it::

    ===============================================  =====================================
    value (exact type, not a subclass)               travels as
    ===============================================  =====================================
    None, bool, int in [-2**63, 2**64), float,       msgpack itself: the fast path, where
    str, bytes, list, dict with str keys             the only cost is one type check per
                                                     item (:func:`plain`)
    numpy.ndarray (plain dtypes), CPU torch.Tensor   an array extension, bytes out of band
                                                     (:mod:`gpuexec.ipc.codec`)
    tuple, set, frozenset, dict with other keys,     an extension type each, no pickle: they
    complex, int beyond 64 bits, bytearray, str      arrive as the same type, also where
    with lone surrogates, numpy scalars              pickle is refused
    everything else: dataclasses, enums,             cloudpickle (protocol 5, large buffers
    namedtuples, datetime, UUID, Decimal, Fraction,  out of band), only on a channel that
    deque, OrderedDict, subclasses of the above,     allows pickle; elsewhere refused with
    your own classes, tensors that need autograd...  ValueNotCarriedError before sending
    memoryview, open text files                      refused (ValueNotCarriedError): a view
                                                     of this process's memory, a handle of
                                                     its files (cloudpickle would send
                                                     bytes and an io.StringIO)
    ===============================================  =====================================

Every pickle carries the type name of what was pickled; the receiver compares it with
the type of what it rebuilt, and an object whose ``__reduce__`` rebuilds another type
is not carried (``ValueNotCarriedError``, naming the rank) rather than arriving as that
other type. The check is per pickle, so it covers each value that travels by pickle (at
any depth of plain containers); what an object's own pickle holds inside it (the
fields of a dataclass) is rebuilt as that object's pickle says.

Depth: containers (lists, dicts, tuples, sets) nest at most ``MAX_DEPTH`` levels, and a
container that contains itself is a cycle; either fails with ``ValueNotCarriedError``
naming the path where the limit was passed (or the cycle closed), on the sending side,
before anything is sent. The limit does not depend on either process's recursion limit:
what one side encodes the other can always decode (a value nested deeper than the
receiver's interpreter allows would otherwise be dropped there, and its call never
answered). Objects that travel by pickle keep their own cycles (pickle memoizes them);
one too deep to pickle or unpickle fails with the same error.

A value the receiver cannot rebuild (its class is missing there, its ``__reduce__``
raises on load, unpickling raises even ``SystemExit``, a tensor arrives where torch is
not installed) does not lose the message: the decoder raises
:class:`~gpuexec.ipc.codec.UndecodableValue` carrying the decoded envelope (call id,
rank), and the receiver ends that one call with the typed error. Only a message whose
structure is broken (not msgpack, unknown tag, missing or extra frames) is dropped and
counted.
"""

from __future__ import annotations

import io
import pickle
import reprlib
import signal
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any

import cloudpickle
from msgspec.msgpack import Ext

from ..errors import ValueNotCarriedError

# Extension codes of values (the codec's array codes are 1-7).
TUPLE = 10
SET = 11
FROZENSET = 12
DICT = 13         # a dict with keys other than str: [k0, v0, k1, v1, ...]
COMPLEX = 14
BIGINT = 15       # an int outside msgpack's range: little-endian two's complement
BYTEARRAY = 16
STR = 17          # a str with lone surrogates: UTF-8 with surrogatepass
NPSCALAR = 18     # [dtype.str or dtype.char (whichever names its type), raw bytes]
PICKLE = 19       # [type name, path, first out-of-band frame, count, cloudpickle bytes]
CODES = frozenset(range(TUPLE, PICKLE + 1))

SCALARS = frozenset({str, int, float, bool, type(None), bytes})
MAX_DEPTH = 100  # levels of nested containers in one value (see the module docstring)
_INT_MIN, _INT_END = -(1 << 63), 1 << 64
_COMPLEX = struct.Struct("<dd")
# What a failure while pickling or unpickling is contained as. KeyboardInterrupt is
# contained too (see _contained) unless it can be a real Ctrl-C: the driver's main thread
# with Python's SIGINT handler, where the caller must still be interrupted.
CONTAINED = (Exception, SystemExit, GeneratorExit)


def _contained(e: BaseException) -> bool:
    """Whether an exception raised while rebuilding a value ends just that value (True)
    or must go on (a real Ctrl-C; workers ignore SIGINT, so theirs never is)."""
    if not isinstance(e, KeyboardInterrupt):
        return isinstance(e, CONTAINED)
    return not (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler)


_scalars_only = SCALARS.issuperset
_CONTAINERS = frozenset({list, dict, tuple, set, frozenset})
_WHOLE = object()  # Walk._value: "pickle this whole" (never leaves the walk)


def plain(v: Any, depth: int = 0) -> bool:
    """True when msgpack alone carries ``v`` faithfully (up to int range and lone
    surrogates, which the encoder notices by itself): the fast path's whole cost, one
    type check per item (a long list of scalars is checked in C). False also for
    containers nested deeper than ``MAX_DEPTH`` (a cycle included): the walk names them."""
    t = type(v)
    if t is list:
        if len(v) > 16 and _scalars_only(map(type, v)):
            return True
        if depth > MAX_DEPTH:
            return False
        for x in v:
            tx = type(x)
            if tx in SCALARS or ((tx is list or tx is dict) and plain(x, depth + 1)):
                continue
            return False
        return True
    if t is dict:
        if depth > MAX_DEPTH:
            return False
        for k, x in v.items():
            if type(k) is not str:
                return False
            tx = type(x)
            if tx in SCALARS or ((tx is list or tx is dict) and plain(x, depth + 1)):
                continue
            return False
        return True
    return t in SCALARS


def plain_values(d: dict[str, Any]) -> bool:
    """:func:`plain` for the values of a call's keyword arguments, whose names the
    executor has already checked (str) and msgspec's decoder checks again."""
    for x in d.values():
        tx = type(x)
        if tx in SCALARS or ((tx is list or tx is dict) and plain(x)):
            continue
        return False
    return True


def utf8(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode()
        return True
    except UnicodeEncodeError:
        return False


def type_name(v: Any) -> str:
    t = type(v)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


_REPR = reprlib.Repr()  # bounded: a key nested thousands deep is not repr'd in full
_REPR.maxlevel = 3
_REPR.maxstring = _REPR.maxother = 40


def _short(v: Any) -> str:
    try:
        r = _REPR.repr(v)
    except CONTAINED:
        return f"<{type_name(v)}>"
    return r if len(r) <= 40 else r[:37] + "..."


Path = Any  # a root name (str), or (parent path, key, kind): formatted only when needed


def path_text(path: Path) -> str:
    """``args[0]['k']<key (1, 2)>``: the way to the value, as Python would index it."""
    parts = []
    while isinstance(path, tuple):
        path, key, kind = path
        parts.append(f"[{key}]" if kind == "i" else f"[{_short(key)}]" if kind == "k"
                     else f"<{kind} {_short(key)}>")
    parts.append(str(path))
    return "".join(reversed(parts))


class Walk:
    """One message's values made ready for a hook-less msgpack encoder (encode side).

    ``encode`` is that encoder (nested payloads of tuples, sets...); ``array`` returns
    the codec's extension for an array or tensor it carries (None otherwise; it raises
    :class:`Refused` for one it refuses, a CUDA tensor); ``pickle_buffer`` is the
    protocol-5 buffer callback taking large buffers out of band, None where pickle is
    refused; ``frames`` counts the out-of-band frames so far. ``careful`` also checks
    int ranges and lone surrogates (a second pass, after msgpack refused the first).

    Pickling is batched: a container whose subtree holds no array or tensor and two or
    more objects that need pickle (an engine's dict of dataclasses) is pickled once, as
    a whole, instead of once per object (each ``cloudpickle.dumps`` has a fixed cost of
    tens of microseconds). Should that pickle fail, the subtree is walked again object
    by object, so the error still names the exact path.
    """

    def __init__(self, encode: Callable[[Any], bytes], array: Callable[[Any], Ext | None],
                 pickle_buffer: Callable[[Any], bool] | None, frames: Callable[[], int],
                 careful: bool, method: str = "") -> None:
        self.encode = encode
        self.array = array
        self.pickle_buffer = pickle_buffer
        self.frames = frames
        self.careful = careful
        self.method = method
        self.batch = pickle_buffer is not None
        self.committed = 0  # arrays, tensors and pickles made: a subtree holding one is
        #                     never pickled whole (its frames are already out)
        self.pickles = 0    # objects found that need pickle
        self.open: list[int] = []  # ids of the containers being walked (depth, cycles)

    def value(self, v: Any, path: Path) -> Any:
        """``v`` ready for msgpack: itself, or extensions in place of what msgpack
        would convert."""
        out = self._value(v, path)
        return self._pickle(v, path) if out is _WHOLE else out

    def _value(self, v: Any, path: Path) -> Any:
        """:meth:`value`, or ``_WHOLE``: ``v`` is to be pickled by the caller, whole."""
        t = type(v)
        if t in SCALARS:
            return self._scalar(v, t) if self.careful else v
        if t is list:
            return self._list(v, path)
        if t is dict:
            if all(type(k) is str for k in v) and (not self.careful or all(map(utf8, v))):
                keys = list(v)
                out = self._items([(x, (path, k, "k")) for k, x in v.items()], v, path)
                return out if out is _WHOLE else dict(zip(keys, out, strict=True))
            pairs = []
            for k, x in v.items():
                pairs.append((k, (path, k, "key")))
                pairs.append((x, (path, k, "k")))
            out = self._items(pairs, v, path)
            return out if out is _WHOLE else Ext(DICT, self.encode(out))
        if t is tuple:
            out = self._list(v, path)
            return out if out is _WHOLE else Ext(TUPLE, self.encode(out))
        if t is set or t is frozenset:
            out = self._items([(x, (path, x, "item")) for x in v], v, path)
            return out if out is _WHOLE else Ext(SET if t is set else FROZENSET,
                                                 self.encode(out))
        if t is complex:
            return Ext(COMPLEX, _COMPLEX.pack(v.real, v.imag))
        if t is bytearray:
            return Ext(BYTEARRAY, bytes(v))
        try:
            ext = self.array(v)
        except Refused as e:
            raise self.error(v, path, str(e)) from None
        if ext is not None:
            self.committed += 1
            return ext
        np = sys.modules.get("numpy")
        if np is not None and isinstance(v, np.generic) and not v.dtype.hasobject \
                and v.dtype.fields is None:
            # dtype.str names the size ('<i8'), which may be another type of that size
            # (numpy.longlong comes back as int64); the type code names the type.
            for code in (v.dtype.str, v.dtype.char):
                if np.dtype(code).type is t:
                    return Ext(NPSCALAR, self.encode([code, v.tobytes()]))
        if not self.batch:
            return self._pickle(v, path)
        self.pickles += 1
        return _WHOLE

    def _scalar(self, v: Any, t: type) -> Any:
        if t is int and not _INT_MIN <= v < _INT_END:
            return Ext(BIGINT, v.to_bytes(v.bit_length() // 8 + 1, "little", signed=True))
        if t is str and not utf8(v):
            return Ext(STR, v.encode("utf-8", "surrogatepass"))
        return v

    def _list(self, v: list[Any] | tuple[Any, ...], path: Path) -> Any:
        if not self.careful and SCALARS.issuperset(map(type, v)):
            return v if type(v) is list else list(v)
        return self._items([(x, (path, i, "i")) for i, x in enumerate(v)], v, path)

    def _items(self, children: list[tuple[Any, Path]], container: Any, path: Path) -> Any:
        """The children of ``container`` ready for msgpack, or ``_WHOLE`` when the whole
        container is better pickled at once (two or more objects below need pickle, and
        nothing below became an array or a pickle of its own)."""
        open_ = self.open
        if len(open_) >= MAX_DEPTH:
            raise self.error(container, path, f"containers nest deeper than {MAX_DEPTH} "
                             "levels here (or the value contains itself)")
        if id(container) in open_:
            raise self.error(container, path, "it contains itself (a cycle): a container "
                             "that is its own descendant cannot be carried")
        committed, pickles = self.committed, self.pickles
        open_.append(id(container))
        try:
            out = [self._value(x, p) for x, p in children]
        finally:
            open_.pop()
        if self.batch and self.committed == committed and self.pickles - pickles >= 2:
            return _WHOLE
        return [self._pickle(x, p) if o is _WHOLE else o
                for o, (x, p) in zip(out, children, strict=True)]

    def _pickle(self, v: Any, path: Path) -> Ext:
        if self.pickle_buffer is None:
            raise self.error(v, path, "it needs pickle, which this executor refuses "
                             "(allow_callables=False); send plain data, arrays, tuples, "
                             "sets or numpy scalars, or allow pickle")
        first = self.frames()
        self.committed += 1
        try:
            blob = dumps(v, self.pickle_buffer)
        except CONTAINED as e:
            if self.batch and type(v) in _CONTAINERS:  # name the very object that failed
                self.batch = False
                try:
                    return self.value(v, path)  # type: ignore[no-any-return]
                finally:
                    self.batch = True
            raise self.error(v, path, f"pickling it raised {type(e).__name__}: "
                             f"{_exc_text(e)}") from e
        where = path_text(path)
        return Ext(PICKLE, self.encode([type_name(v), where, first, self.frames() - first,
                                        blob]))

    def error(self, v: Any, path: Path, reason: str) -> ValueNotCarriedError:
        return ValueNotCarriedError(path_text(path), type_name(v), reason, method=self.method)


class _Pickler(cloudpickle.CloudPickler):  # type: ignore[misc]  # untyped base
    """cloudpickle, less its reducers that rebuild another type: a ``memoryview``
    (cloudpickle sends its bytes) and an open text file (it sends the file's content as
    an ``io.StringIO``) are refused instead: each is a view of this process's memory or a
    handle of its files, which no other process can be given."""

    def reducer_override(self, obj: Any) -> Any:
        t = type(obj)
        if t is memoryview:
            raise pickle.PicklingError(
                "a memoryview is a view of this process's memory; send bytes(view), a "
                "bytearray or a numpy array (numpy.frombuffer(view)) instead")
        if t is io.TextIOWrapper:
            raise pickle.PicklingError(
                "an open file is a handle of this process; send its path or its "
                "content instead")
        np = sys.modules.get("numpy")
        if np is not None and t is np.ndarray and not obj.flags.writeable:
            # numpy pickles a read-only array's bytes as read-only: it would arrive so
            return obj.copy().__reduce_ex__(self.proto)
        return super().reducer_override(obj)


def dumps(v: Any, buffer_callback: Callable[[Any], bool] | None) -> bytes:
    """``cloudpickle.dumps(v, protocol=5, buffer_callback=...)`` with :class:`_Pickler`."""
    out = io.BytesIO()
    _Pickler(out, protocol=5, buffer_callback=buffer_callback).dump(v)
    return out.getvalue()


class Refused(Exception):
    """An array or tensor the codec will not carry (raised by the ``array`` callback)."""


class Unrebuilt(Exception):
    """A value the receiver could not rebuild (decode side): ``path``, ``type_name``,
    ``reason``, and ``drop_reason`` for the receivers' counters."""

    def __init__(self, path: str, type_name: str, reason: str,
                 drop_reason: str = "bad_value") -> None:
        super().__init__(f"{path} ({type_name}): {reason}")
        self.path = path
        self.type_name = type_name
        self.reason = reason
        self.drop_reason = drop_reason


def _exc_text(e: BaseException) -> str:
    try:
        return str(e)
    except CONTAINED as inner:
        return f"<str() of it raised {type(inner).__name__}>"


class Rebuild:
    """Turns the value extensions back into values (decode side).

    ``nested`` decodes an extension's msgpack payload (with the same extension hook);
    ``buffers(first, count)`` returns out-of-band frames for a pickle (raising the
    codec's ``MalformedMessage`` for frames that are not there); ``allow_pickle`` False
    refuses pickles without loading them; ``where`` names this process in reasons;
    ``malformed`` is the codec's frame-level error, let through.
    """

    def __init__(self, nested: Callable[[Any], Any],
                 buffers: Callable[[int, int], list[Any]], allow_pickle: bool,
                 where: str, malformed: type[Exception]) -> None:
        self.nested = nested
        self.buffers = buffers
        self.malformed = malformed  # the codec's frame-level error: never contained here
        self.allow_pickle = allow_pickle
        self.where = where

    def ext(self, code: int, data: memoryview) -> Any:
        """The value of one extension; raises :class:`Unrebuilt`."""
        if code == PICKLE:
            return self._unpickle(data)
        try:
            if code in (TUPLE, SET, FROZENSET, DICT):
                items = self.nested(data)
                if type(items) is not list:
                    raise TypeError("payload is not an array")
                if code == TUPLE:
                    return tuple(items)
                if code == SET:
                    return set(items)
                if code == FROZENSET:
                    return frozenset(items)
                it = iter(items)
                return dict(zip(it, it, strict=True))
            if code == COMPLEX:
                return complex(*_COMPLEX.unpack(data))
            if code == BIGINT:
                return int.from_bytes(data, "little", signed=True)
            if code == BYTEARRAY:
                return bytearray(data)
            if code == STR:
                return bytes(data).decode("utf-8", "surrogatepass")
            return self._npscalar(data)
        except (Unrebuilt, self.malformed):
            raise
        except CONTAINED as e:
            raise Unrebuilt("a value", f"extension {code}",
                            f"rebuilding it in {self.where} raised {type(e).__name__}: "
                            f"{_exc_text(e)}") from None

    def _npscalar(self, data: memoryview) -> Any:
        import numpy as np

        dtype, raw = self.nested(data)
        dt = np.dtype(dtype)
        if dt.hasobject or dt.fields is not None or len(raw) != dt.itemsize:
            raise ValueError(f"refused numpy scalar of dtype {dtype!r}")
        return np.frombuffer(raw, dtype=dt)[0]

    def _unpickle(self, data: memoryview) -> Any:
        try:
            name, path, first, count, blob = self.nested(data)
        except CONTAINED:
            raise Unrebuilt("a value", "pickle", "malformed pickle payload",
                            "bad_pickle") from None
        buffers = self.buffers(first, count)  # MalformedMessage: frames not there
        if not self.allow_pickle:
            raise Unrebuilt(path, name, f"it needs pickle, which {self.where} refuses "
                            "(allow_callables=False)", "pickle_refused")
        try:
            value = cloudpickle.loads(blob, buffers=buffers)
        except BaseException as e:
            if not _contained(e):
                raise
            raise Unrebuilt(path, name, f"unpickling it in {self.where} raised "
                            f"{type(e).__name__}: {_exc_text(e)}", "bad_pickle") from None
        if type_name(value) != name:  # its __reduce__ rebuilds another type
            raise Unrebuilt(path, name, f"its pickle rebuilt it in {self.where} as "
                            f"{type_name(value)}, not {name}", "bad_pickle")
        return value
