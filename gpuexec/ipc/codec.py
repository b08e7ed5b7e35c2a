"""Message <-> zmq frames, with numpy arrays and CPU tensors out of band.

A message becomes ``[header, buf_0, buf_1, ...]``: the header is the msgpack of the
typed message, and every numpy array or CPU torch tensor found in it is replaced by
a small msgpack extension ``(dtype, shape, frame index)`` whose bytes travel as
their own zmq frame, sent without copying (``copy=False``) and received as a
writable view of the zmq message (``np.frombuffer`` / ``torch.frombuffer``). Arrays
smaller than ``INLINE_LIMIT`` bytes are copied inline: a frame costs more than that.

Non-contiguous arrays are made contiguous (values, dtype and shape arrive intact, 0-d
arrays included; strides become C order). Every other value keeps its type too: the
rule and the table of what travels how are in :mod:`gpuexec.ipc.values` (tuples are
tuples; anything msgpack would convert takes an extension type of its own, or cloudpickle
*only* when the codec was built with ``allow_pickle=True``, which gpuexec does solely for
its private channel to processes it started; elsewhere it is refused, never converted).

Decoders are typed (one closed union per socket) and build nothing but the declared
message types: a frame set whose structure does not decode raises
:class:`MalformedMessage`, which receivers count (by its ``reason``) and drop; one whose
envelope decodes but a value does not (a class missing here, a failing unpickle) raises
:class:`UndecodableValue` with the envelope, and the receiver ends that call with a typed
error instead. Every out-of-band buffer is checked
against its declared dtype and shape (the byte counts must match exactly, so a huge
declared shape allocates nothing), and a message must use every frame it came with.
"""

from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import msgspec

from ..errors import ValueNotCarriedError
from . import arrays, shm_payload, values
from .messages import Call, Failure, Reply, ValueFault

INLINE_LIMIT = 4096
_IDS_CACHED = 1024  # headers an encoder keeps the bytes of (see Encoder._around_id)

_EXT_NDARRAY = 1   # payload: [dtype.str, shape, frame index]     (out of band)
_EXT_TENSOR = 2    # payload: [torch dtype name, shape, frame index]
# 3: the old pickle payload; values.PICKLE (19) and the other value codes are in .values
_EXT_NDARRAY_INLINE = 4  # payload: [dtype.str, shape, raw bytes]
_EXT_TENSOR_INLINE = 5
_EXT_NDARRAY_SHM = 6  # payload: [dtype.str, shape, driver pid, fd, inode, nbytes] (shm_payload)
_EXT_TENSOR_SHM = 7

Frame = Any  # bytes, memoryview or zmq.Frame: anything exposing the buffer protocol
T = TypeVar("T")


def send_frames(sock: Any, frames: list[Frame], flags: int = 0) -> None:
    """Send ``frames`` as one multipart message; zero-copy only where there are buffers
    (a zero-copy send of a small frame costs more than copying it)."""
    if len(frames) == 1:
        sock.send(frames[0], flags)
    else:
        sock.send_multipart(frames, flags, copy=False)


def recv_frames(sock: Any, flags: int = 0) -> list[Frame]:
    """Receive one multipart message: the header as bytes, buffers as zero-copy frames.

    Receiving as a ``zmq.Frame`` and reading its ``more`` flag costs about a third of
    ``sock.rcvmore`` (a socket-option round trip through Python), on every message.
    """
    first = sock.recv(flags, copy=False)
    return recv_rest(sock, first.bytes) if first.more else [first.bytes]


def recv_rest(sock: Any, header: bytes) -> list[Frame]:
    """``[header, *the rest of its multipart message]``, the rest without copying."""
    frames: list[Frame] = [header]
    more = True
    while more:
        frame = sock.recv(copy=False)
        frames.append(frame)
        more = frame.more
    return frames


class MalformedMessage(ValueError):
    """A frame set that does not decode into the receiver's message union.

    ``reason`` says which check failed, for the receivers' drop counters: ``"empty"``,
    ``"undecodable"`` (not msgpack, truncated, trailing bytes), ``"unknown_type"`` (a
    tag or fields the receiver does not accept), ``"bad_buffer"`` (an array whose
    frame is missing or whose size does not match its dtype and shape),
    ``"extra_frames"`` (frames no array refers to), ``"pickle_refused"`` (a pickle or
    shared-memory payload on a channel that does not allow it), ``"bad_pickle"`` (a
    pickle that does not load), ``"bad_value"`` (another value not rebuilt). The last
    three (but a shared-memory payload) come as :class:`UndecodableValue`, which the
    receivers answer instead of dropping.
    """

    def __init__(self, message: str, reason: str = "undecodable") -> None:
        super().__init__(message)
        self.reason = reason



def _buffer(frame: Frame) -> memoryview:
    buf = getattr(frame, "buffer", None)  # zmq.Frame
    return buf if buf is not None else memoryview(frame)


class UndecodableValue(MalformedMessage):
    """The message decoded, but a value in it could not be rebuilt here (see
    :mod:`gpuexec.ipc.values`): its class is missing, unpickling raised, pickle is
    refused, torch is not installed... ``envelope`` is the message (that value replaced
    by a placeholder), so the receiver can end that call with a typed error instead of
    dropping it; ``fault`` says where the value sat and why. ``reason`` is the drop
    counters' (``pickle_refused``, ``bad_pickle``, ``bad_value``)."""

    def __init__(self, envelope: Any, fault: values.Unrebuilt) -> None:
        super().__init__(str(fault), fault.drop_reason)
        self.envelope = envelope
        self.fault = fault

    def failure(self) -> Failure:
        """The answer to the call in ``envelope``: rebuilding a value of it failed."""
        f = self.fault
        return Failure.make("gpuexec.errors.ValueNotCarriedError", str(f), "",
                            ValueFault(f.path, f.type_name, f.reason))


_UNREBUILT = object()  # stands for a value that could not be rebuilt (never escapes)
_SCALARS = values.SCALARS
plain = values.plain
plain_values = values.plain_values


def around_id(make: Callable[[int], Any]) -> tuple[bytes, bytes]:
    """The bytes before and after the id (the first field) in the header of the message
    ``make(id)`` makes: msgpack writes the id in its shortest form, as msgspec does, so
    ``before + msgspec.msgpack.encode(id) + after`` is that header for every id."""
    zero, one = msgspec.msgpack.encode(make(0)), msgspec.msgpack.encode(make(1))
    at = next(i for i, (a, b) in enumerate(zip(zero, one, strict=True)) if a != b)
    return zero[:at], zero[at + 1:]  # ids 0 and 1 take one byte each


def none_reply_parts(rank: int) -> tuple[bytes, bytes]:
    """:func:`around_id` of ``Reply(id, rank)``: what a worker sends for a method that
    returned None (:meth:`Encoder.none_reply`), known by its bytes on arrival."""
    return around_id(lambda i: Reply(i, rank))


class Encoder:
    """Encodes messages into frames. Thread-safe (one lock around the shared state).

    The values of a message (``Call.args`` / ``kwargs``, ``Reply.value``) keep their
    type (:mod:`gpuexec.ipc.values`): plain msgpack data is encoded as it is after one
    type check per item (the hot path: no lock, no hook, no copy); anything else is
    walked into extension types first. A value that cannot travel faithfully raises
    :class:`~gpuexec.errors.ValueNotCarriedError` naming where it sat.
    """

    def __init__(self, *, allow_pickle: bool, shm_payloads: bool = False) -> None:
        self.allow_pickle = allow_pickle
        # True: arrays of PAYLOAD_THRESHOLD bytes or more go into shared-memory segments
        # (see shm_payload); encode_with_segments then returns their descriptors.
        self.shm_payloads = shm_payloads
        self._segments: list[int] = []
        self._meta = msgspec.msgpack.Encoder()
        self._plain = msgspec.msgpack.Encoder()  # no hook: the walk made every value plain
        self._lock = threading.Lock()
        self._frames: list[Frame] = []  # out-of-band frames of the message being encoded
        self._dtypes: dict[Any, bool] = {}  # numpy dtype -> rebuilt exactly from dtype.str
        # method name (bare_call) or rank (none_reply) -> the bytes of that header
        # around its id (see _around_id); any thread (one dict operation at a time)
        self._ids: dict[str | int, tuple[bytes, bytes]] = {}

    def encode(self, msg: Any) -> list[Frame]:
        """``[header, *buffers]`` for ``msg`` (an encoder without shared-memory payloads)."""
        return self.encode_with_segments(msg)[0]

    @property
    def bare_headers(self) -> dict[str | int, tuple[bytes, bytes]]:
        """The pieces :meth:`bare_call` puts around a call id, by method name (as it has
        made them; the same dict for the encoder's life): the compiled round trip builds
        the header from them itself."""
        return self._ids

    def bare_call(self, call_id: int, method: str) -> bytes | None:
        """The header of ``Call(call_id, method, None, [], {})`` (a call by name without
        arguments: the no-op of the hot path), the very bytes :meth:`encode` gives,
        without building the Call (see :meth:`_around_id`). None when the name cannot
        be encoded as it is (:meth:`encode` explains why)."""
        parts = self._ids.get(method)
        if parts is None:
            try:
                parts = self._around_id(method, lambda i: Call(i, method, None, [], {}))
            except (OverflowError, UnicodeEncodeError):  # a lone surrogate in the name
                return None
        return parts[0] + self._plain.encode(call_id) + parts[1]

    def none_reply(self, call_id: int, rank: int) -> bytes:
        """The header of ``Reply(call_id, rank)`` (a method that returned None), the very
        bytes :meth:`encode` gives, without encoding it (see :meth:`_around_id`)."""
        parts = self._ids.get(rank)
        if parts is None:
            parts = self._around_id(rank, lambda i: Reply(i, rank))
        return parts[0] + self._plain.encode(call_id) + parts[1]

    def value_reply(self, rank: int, call_id: int, value: Any) -> bytes | None:
        """The header of ``Reply(call_id, rank, value)`` when ``value`` is plain msgpack
        data (:meth:`encode_with_segments`' fast path, the one frame it gives); None when
        it needs the walk (then :meth:`encode` takes it)."""
        if value.__class__ in _SCALARS or plain(value):
            return self._as_is(Reply(call_id, rank, value))
        return None

    def _as_is(self, msg: Any) -> bytes | None:
        """``msg``'s header encoded as it is (its values found plain); None when msgpack
        refuses a scalar (an int beyond 64 bits, a lone surrogate): the walk takes it."""
        try:
            return self._plain.encode(msg)
        except (OverflowError, UnicodeEncodeError):
            return None

    def _around_id(self, key: str | int, make: Callable[[int], Any]) -> tuple[bytes, bytes]:
        """:func:`around_id`, cached under ``key``. Raises what msgpack raises for a
        message it refuses."""
        parts = around_id(make)
        if len(self._ids) >= _IDS_CACHED:
            self._ids.clear()  # names made up at run time: never grow without bound
        self._ids[key] = parts
        return parts

    def encode_with_segments(self, msg: Any, plain_call: bool | None = None
                             ) -> tuple[list[Frame], list[int]]:
        """``(frames, segment descriptors)``: the caller closes the descriptors once every
        receiver has mapped them (the call is complete).

        Most messages hold plain data only (:func:`values.plain`): they are encoded as
        they are, without the walk, the lock or the frame list (the hot path). msgpack
        refuses ints beyond 64 bits and lone surrogates by itself; those take the walk.
        ``plain_call``: whether the caller already found a Call's arguments plain (the
        executor checks them once, together with its own checks of the keyword names);
        None: look here.
        """
        cls = msg.__class__
        if cls is Call:
            args, kwargs = msg.args, msg.kwargs
            fast = plain_call if plain_call is not None else \
                (not args or plain(args)) and (not kwargs or plain_values(kwargs))
        elif cls is Reply:
            fast = msg.value.__class__ in _SCALARS or plain(msg.value)
        else:
            fast = True
        if fast:
            header = self._as_is(msg)
            if header is not None:
                return [header], []
        with self._lock:
            frames: list[Frame] = [b""]
            self._frames = frames
            self._segments = []
            try:
                frames[0] = self._encode_values(msg)
            except BaseException:
                for fd in self._segments:
                    os.close(fd)
                raise
            finally:
                self._frames = []
            segments, self._segments = self._segments, []
            return frames, segments

    def _encode_values(self, msg: Any) -> bytes:
        """The header of ``msg`` after walking its values (caller holds the lock): a
        first pass leaves scalars alone; if msgpack then refuses one (an int beyond 64
        bits, a lone surrogate), a careful pass checks every scalar."""
        method = msg.method if msg.__class__ is Call else ""
        for careful in (False, True):
            walk = values.Walk(self._plain.encode, self._array,
                               self._pickle_buffer if self.allow_pickle else None,
                               lambda: len(self._frames) - 1, careful, method)
            try:
                return self._plain.encode(self._walked(msg, walk))
            except (OverflowError, UnicodeEncodeError) as e:
                if careful:
                    raise ValueNotCarriedError("message", type(msg).__qualname__,
                                               f"msgpack refused it: {e}", method=method) from e
                for fd in self._segments:
                    os.close(fd)
                self._segments = []
                del self._frames[1:]
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _walked(msg: Any, walk: values.Walk) -> Any:
        if msg.__class__ is Call:
            kwargs = {}
            for k, v in msg.kwargs.items():
                if type(k) is not str or (walk.careful and not values.utf8(k)):
                    raise walk.error(k, "kwargs", "keyword argument names must be str "
                                     "(without lone surrogates)")
                kwargs[k] = walk.value(v, ("kwargs", k, "k"))
            args = [walk.value(x, ("args", i, "i")) for i, x in enumerate(msg.args)]
            return msgspec.structs.replace(msg, args=args, kwargs=kwargs)  # both stay typed
        if msg.__class__ is Reply:
            return msgspec.structs.replace(msg, value=walk.value(msg.value, "result"))
        return msg

    def _pickle_buffer(self, buf: pickle.PickleBuffer) -> bool:
        """Protocol-5 buffer callback: large buffers of pickled values (numpy arrays in a
        dataclass) travel out of band like arrays do; small ones stay in the pickle."""
        try:
            raw = buf.raw()
        except BufferError:  # not contiguous
            return True
        if raw.nbytes < INLINE_LIMIT:
            return True
        self._frames.append(raw)
        return False

    def _array(self, obj: Any) -> msgspec.msgpack.Ext | None:
        """The extension for an array or tensor carried as raw bytes (None: not one)."""
        found = arrays.raw_array(obj, self._dtypes)
        if found is None:
            return None
        tensor, dtype, shape, raw = found
        if tensor:
            return self._array_ext(_EXT_TENSOR, _EXT_TENSOR_INLINE, dtype, shape, raw,
                                   _EXT_TENSOR_SHM)
        return self._array_ext(_EXT_NDARRAY, _EXT_NDARRAY_INLINE, dtype, shape, raw,
                               _EXT_NDARRAY_SHM)

    def _array_ext(self, code: int, inline_code: int, dtype: str, shape: Sequence[int],
                   raw: Any, shm_code: int) -> msgspec.msgpack.Ext:
        if self.shm_payloads and raw.nbytes >= shm_payload.PAYLOAD_THRESHOLD:
            fd, ino = shm_payload.write_segment(raw)
            self._segments.append(fd)
            return msgspec.msgpack.Ext(shm_code, self._meta.encode(
                (dtype, list(shape), os.getpid(), fd, ino, raw.nbytes)))
        if raw.nbytes < INLINE_LIMIT:
            return msgspec.msgpack.Ext(inline_code,
                                       self._meta.encode((dtype, list(shape), raw.tobytes())))
        self._frames.append(raw)  # frames[0] is the header: buffer i is frames[i + 1]
        return msgspec.msgpack.Ext(code, self._meta.encode((dtype, list(shape),
                                                             len(self._frames) - 2)))


class Decoder(Generic[T]):
    """Decodes frames into one message type (a closed union). One thread at a time.

    A frame set whose structure is broken raises :class:`MalformedMessage` (the receiver
    drops and counts it); one whose envelope decodes but a value does not raises
    :class:`UndecodableValue` with the envelope (the receiver answers that call with a
    typed error). ``where`` names this process in the reasons ("the driver").
    """

    def __init__(self, msg_type: type[T] | Any, *, allow_pickle: bool,
                 copy_buffers: bool = False, allow_shm: bool | None = None,
                 shm_pid: int = 0, where: str = "this process") -> None:
        self.allow_pickle = allow_pickle
        # Shared-memory payloads (memory files of the driver): on the private channel
        # only, like pickle, unless set apart (a worker refusing pickle still maps them).
        self.allow_shm = allow_pickle if allow_shm is None else allow_shm
        self.shm_pid = shm_pid  # > 0: map payloads of this process (the driver) only
        # True when frames are views of memory that will be reused (a ring slot): arrays
        # are then copied out instead of aliasing it.
        self.copy_buffers = copy_buffers
        self.where = where
        self._meta = msgspec.msgpack.Decoder(tuple[str, list[int], int | bytes])
        self._shm_meta = msgspec.msgpack.Decoder(tuple[str, list[int], int, int, int, int])
        self._dec: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(
            msg_type, ext_hook=self._ext_hook)
        self._any: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(
            ext_hook=self._ext_hook)
        self._rebuild = values.Rebuild(self._any.decode, self._oob, allow_pickle, where,
                                       MalformedMessage)
        self._frames: Sequence[Frame] = ()
        self._used: set[int] = set()  # out-of-band frames the message referred to
        self._faults: list[values.Unrebuilt] = []  # values of this message not rebuilt

    def decode(self, frames: Sequence[Frame]) -> T:
        if not frames:
            raise MalformedMessage("empty message", "empty")
        self._frames = frames
        self._used = set()
        header = frames[0]
        try:
            msg = self._dec.decode(header if header.__class__ is bytes else _buffer(header))
        except Exception as e:
            raise self._failed(e) from None
        finally:
            self._frames = ()
        if len(self._used) != len(frames) - 1:
            self._faults.clear()
            raise MalformedMessage(f"{len(frames) - 1 - len(self._used)} frame(s) that no "
                                   "array refers to", "extra_frames")
        if self._faults:
            raise self._undecodable(msg)
        return msg

    def decode_header(self, header: Any) -> T:
        """Decode a message that came as a single frame (no out-of-band buffers)."""
        try:
            msg = self._dec.decode(header)
        except Exception as e:
            raise self._failed(e) from None
        if self._faults:
            raise self._undecodable(msg)
        return msg

    def _failed(self, e: Exception) -> MalformedMessage:
        """What a failed decode raises: the ``MalformedMessage`` raised inside, or one for
        msgspec's error (bad msgpack, a type the union does not accept)."""
        self._faults.clear()
        return e if isinstance(e, MalformedMessage) else _malformed(e)

    def _undecodable(self, msg: Any) -> UndecodableValue:
        fault = self._faults[0]
        self._faults.clear()
        return UndecodableValue(msg, fault)

    def _oob(self, first: int, count: int) -> list[Any]:
        """The out-of-band buffers of a pickle (frames ``first`` .. ``first+count-1``)."""
        if count == 0:
            return []
        if first < 0 or count < 0 or first + count > len(self._frames) - 1:
            raise MalformedMessage("pickle refers to missing frames", "bad_buffer")
        out = []
        for i in range(first, first + count):
            if i in self._used:
                raise MalformedMessage(f"frame {i} used twice", "bad_buffer")
            self._used.add(i)
            buf = _buffer(self._frames[i + 1])
            # a copy where the slot is reused, or where the frame is read-only (numpy
            # would rebuild a read-only array over it)
            out.append(bytearray(buf) if self.copy_buffers or buf.readonly else buf)
        return out

    def _ext_hook(self, code: int, data: memoryview) -> Any:
        try:
            if code in values.CODES:
                return self._rebuild.ext(code, data)
            return self._array_ext(code, data)
        except values.Unrebuilt as e:
            self._faults.append(e)
            return _UNREBUILT

    def _array_ext(self, code: int, data: memoryview) -> Any:
        buf: Any
        if code in (_EXT_NDARRAY_SHM, _EXT_TENSOR_SHM):
            if not self.allow_shm:  # the private channel only, like pickle
                raise MalformedMessage("shared-memory payload on an untrusted channel",
                                       "pickle_refused")
            dtype, shape, pid, fd, ino, nbytes = self._shm_meta.decode(data)
            self._check_size(dtype, shape, nbytes, code == _EXT_TENSOR_SHM)
            if self.shm_pid > 0 and pid != self.shm_pid:
                raise MalformedMessage(f"payload of pid {pid}, not the driver's", "bad_buffer")
            try:
                buf = shm_payload.map_segment(pid, fd, ino, nbytes)
            except (OSError, ValueError) as e:
                raise values.Unrebuilt("an array", dtype, f"{self.where} cannot map its "
                                       f"shared-memory payload: {e}") from None
            return arrays.build(dtype, shape, buf, code == _EXT_TENSOR_SHM)
        if code not in (_EXT_NDARRAY, _EXT_NDARRAY_INLINE, _EXT_TENSOR, _EXT_TENSOR_INLINE):
            raise MalformedMessage(f"unknown extension type {code}", "unknown_type")
        dtype, shape, where = self._meta.decode(data)
        if isinstance(where, int):
            if not 0 <= where < len(self._frames) - 1 or where in self._used:
                raise MalformedMessage(f"array refers to missing frame {where}", "bad_buffer")
            self._used.add(where)
            buf = _buffer(self._frames[where + 1])
            self._check_size(dtype, shape, buf.nbytes, code == _EXT_TENSOR)
            if self.copy_buffers:
                buf = bytearray(buf)
        else:
            self._check_size(dtype, shape, len(where), code == _EXT_TENSOR_INLINE)
            buf = bytearray(where)  # inline: own a writable copy
        return arrays.build(dtype, shape, buf, code in (_EXT_TENSOR, _EXT_TENSOR_INLINE))

    def _check_size(self, dtype: str, shape: list[int], nbytes: int, tensor: bool) -> None:
        try:
            arrays.check_size(dtype, shape, nbytes, tensor, self.where)
        except arrays.BadBuffer as e:
            raise MalformedMessage(str(e), "bad_buffer") from None


def _malformed(e: Exception) -> MalformedMessage:
    """The drop reason of an error raised while decoding."""
    if isinstance(e, msgspec.ValidationError):
        reason = "unknown_type"
    elif isinstance(e, msgspec.DecodeError):
        reason = "undecodable"
    else:  # raised by numpy or torch while building an array
        reason = "bad_buffer"
    return MalformedMessage(f"{type(e).__name__}: {e}", reason)
