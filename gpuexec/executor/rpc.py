"""The calls of an :class:`~gpuexec.Executor`: ``collective_rpc`` (blocking or a
``Future``), ``collective_rpc_async`` (awaited on an event loop) and ``check_health``.

A mixin of the executor, kept apart so that the constructor, properties and shutdown
(:mod:`.executor`) and the call paths each fit in one screenful of reading. A call is
validated here (:mod:`.validate`) before anything is encoded, waits at the gate while
the executor is suspended (:mod:`.hold`), and is then sent and waited for by the
channel (:mod:`.channel`).

The anatomy of a call, from here to the workers and back, with what it costs (module
crossings, locks, allocations) is drawn at the top of :mod:`.channel`, which owns it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Literal, overload

from ..errors import CallRefusedError, InvalidArgumentError
from ..ipc import source
from ..ipc.values import plain
from .aio import AsyncSlots, await_call
from .channel import DriverChannel, PendingCall
from .config import ExecutorConfig
from .hold import CallGate
from .ownership import Ownership
from .validate import call_args, call_kwargs, flag, reply_rank, seconds, target_ranks

_ARG_TYPES = (tuple, list)  # args taken as they are (anything else: validate.call_args)


def _future(call: PendingCall) -> Future[Any]:
    assert call.future is not None  # a non_block call
    return call.future


class RpcMethods:
    """The call methods of :class:`~gpuexec.Executor` (set up by its constructor)."""

    _channel: DriverChannel
    _gate: CallGate
    _config: ExecutorConfig
    _owner: Ownership
    _all_ranks: list[int]
    _async_slots: AsyncSlots

    @overload
    def collective_rpc(self, method: str | Callable[..., Any], args: Sequence[Any] = ...,
                       kwargs: Mapping[str, Any] | None = ..., *, timeout: float | None = ...,
                       ranks: Sequence[int] | None = ..., unique_reply_rank: None = ...,
                       non_block: Literal[False] = ...) -> list[Any]: ...

    @overload
    def collective_rpc(self, method: str | Callable[..., Any], args: Sequence[Any] = ...,
                       kwargs: Mapping[str, Any] | None = ..., *, timeout: float | None = ...,
                       ranks: Sequence[int] | None = ..., unique_reply_rank: int,
                       non_block: Literal[False] = ...) -> Any: ...

    @overload
    def collective_rpc(self, method: str | Callable[..., Any], args: Sequence[Any] = ...,
                       kwargs: Mapping[str, Any] | None = ..., *, timeout: float | None = ...,
                       ranks: Sequence[int] | None = ..., unique_reply_rank: int | None = ...,
                       non_block: Literal[True]) -> Future[Any]: ...

    def collective_rpc(
        self,
        method: str | Callable[..., Any],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        ranks: Sequence[int] | None = None,
        unique_reply_rank: int | None = None,
        non_block: bool = False,
    ) -> Any:
        """Call ``method`` on every worker (or on ``ranks``) and gather the results.

        ``method`` is a method name of the worker class, or a callable run in each
        worker as ``method(worker, *args, **kwargs)`` (sent with cloudpickle over the
        private channel). Returns the results in the order of ``ranks`` (default: all
        ranks in rank order); with ``unique_reply_rank`` only that rank's result (every
        targeted rank still runs the call and reports errors); with ``non_block=True``
        a :class:`concurrent.futures.Future` of the same. Do not modify array arguments
        of a ``non_block`` call before its future is done: they are sent without a copy.

        Values keep their type both ways (tuples stay tuples, dataclasses stay
        dataclasses: :mod:`gpuexec.ipc.values`). Raises
        :class:`~gpuexec.errors.ValueNotCarriedError` when a value cannot travel
        faithfully (before sending for an argument; naming the rank when a worker could
        not rebuild the arguments or send its result, or its result cannot be rebuilt
        here), :class:`~gpuexec.errors.RemoteError` when the method raised in a worker
        (the lowest failing rank; the workers stay usable), ``RpcTimeoutError`` when
        ``timeout`` (default ``rpc_timeout``) passes, ``WorkerDiedError`` when a worker
        died, ``ExecutorClosedError`` after shutdown.
        """
        if method.__class__ is str and ranks is None and unique_reply_rank is None and \
                timeout is None and non_block is False and method and \
                not self._owner.foreign and not self._gate.holding:
            # The hot path's forms (a method by name, arguments at most, the rest left to
            # its default): every check of _submit passes by construction for a call
            # without arguments, and for plain ones (found so by the compiled step, which
            # otherwise does nothing), so they are skipped.
            if args.__class__ is tuple and not args and kwargs is None:
                return self._channel.call_bare(method, self._all_ranks,
                                               self._config.rpc_timeout)
            call_plain = self._channel.call_plain
            if call_plain is not None:
                out = call_plain(method, args, kwargs, self._all_ranks,
                                 self._config.rpc_timeout)
                if out is not None:
                    return out
        if non_block is False:
            return self._submit(method, args, kwargs, timeout, ranks, unique_reply_rank,
                                False, wait=True)
        return _future(self._submit(method, args, kwargs, timeout, ranks, unique_reply_rank,
                                    non_block))  # checked there

    @overload
    async def collective_rpc_async(
            self, method: str | Callable[..., Any], args: Sequence[Any] = ...,
            kwargs: Mapping[str, Any] | None = ..., *, timeout: float | None = ...,
            ranks: Sequence[int] | None = ..., unique_reply_rank: None = ...) -> list[Any]: ...

    @overload
    async def collective_rpc_async(
            self, method: str | Callable[..., Any], args: Sequence[Any] = ...,
            kwargs: Mapping[str, Any] | None = ..., *, timeout: float | None = ...,
            ranks: Sequence[int] | None = ..., unique_reply_rank: int) -> Any: ...

    async def collective_rpc_async(
        self,
        method: str | Callable[..., Any],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        ranks: Sequence[int] | None = None,
        unique_reply_rank: int | None = None,
    ) -> Any:
        """:meth:`collective_rpc` for an asyncio event loop (a serving engine's): the same
        arguments, results and errors, awaited without blocking the loop and without a
        thread per call (see :mod:`.aio`).

        At most ``max_concurrent_batches`` calls of one loop are outstanding; later ones
        wait for a slot before they are sent. Workers run calls one at a time in the order
        they were sent, so two calls in flight do not compute in parallel: the second is
        already queued at the workers while the first computes, which hides its dispatch
        and the first one's gather. Cancelling the awaiting task cancels the call in every
        worker still running it (as ``Future.cancel()`` does, see :meth:`collective_rpc`);
        the executor stays usable.
        Raises ``RpcTimeoutError``, ``WorkerDiedError``, ``RemoteError`` and
        ``ExecutorClosedError`` as :meth:`collective_rpc` does.
        """
        self._owner.check()  # before the slots' lock, which a fork may find held
        if self._gate.holding:  # suspended: checked, then held unsent until resume
            held = self._submit(method, args, kwargs, timeout, ranks, unique_reply_rank, True)
            assert held.future is not None
            # a cancelled await cancels the held call's Future: it is never sent
            return await asyncio.wrap_future(held.future)
        async with self._async_slots.for_running_loop():
            call = self._submit(method, args, kwargs, timeout, ranks, unique_reply_rank, True)
            return await await_call(call)

    @overload
    def _submit(self, method: str | Callable[..., Any], args: Sequence[Any],
                kwargs: Mapping[str, Any] | None, timeout: float | None,
                ranks: Sequence[int] | None, unique_reply_rank: int | None,
                non_block: bool) -> PendingCall: ...

    @overload
    def _submit(self, method: str | Callable[..., Any], args: Sequence[Any],
                kwargs: Mapping[str, Any] | None, timeout: float | None,
                ranks: Sequence[int] | None, unique_reply_rank: int | None,
                non_block: Literal[False], wait: Literal[True]) -> Any: ...

    def _submit(self, method: str | Callable[..., Any], args: Sequence[Any],
                kwargs: Mapping[str, Any] | None, timeout: float | None,
                ranks: Sequence[int] | None, unique_reply_rank: int | None,
                non_block: bool, wait: bool = False) -> Any:
        """Validate a call's arguments (:mod:`.validate`) and send it; the caller waits
        for it, or (``wait``, a blocking call) its result is returned. Every call passes
        here: the common forms (a method name, a tuple or list of arguments, defaults
        elsewhere) are recognised inline, anything else goes through the validators,
        which accept the same and explain the rest."""
        owner = self._owner
        if owner.foreign:
            owner.check()
        if method.__class__ is str and method:
            name = method
        else:
            name = self._callable_name(method)
        call_list = list(args) if args.__class__ in _ARG_TYPES else call_args(args)
        # Arguments msgpack carries as they are are found here, once, with the names'
        # check (plain: str keys); the encoder then does not look at them again.
        if kwargs is None:
            call_dict, simple = {}, True
        elif kwargs.__class__ is dict and plain(kwargs):
            call_dict, simple = dict(kwargs), True
        else:  # another mapping, or names or values to look at closer
            call_dict = call_kwargs(kwargs)
            simple = plain(call_dict)
        size = self._config.world_size
        target = self._all_ranks if ranks is None else target_ranks(ranks, size)
        value_rank = None if unique_reply_rank is None else \
            reply_rank(unique_reply_rank, target, size)
        deadline = self._config.rpc_timeout if timeout is None else seconds("timeout", timeout)
        if non_block.__class__ is not bool:
            flag("non_block", non_block)
        # pickled last: every check above is cheap
        blob = None if isinstance(method, str) else source.dumps(method)
        simple = simple and (not call_list or plain(call_list))
        if self._gate.holding:  # suspended: the call waits in the driver, unsent (see .hold)
            held = self._held(name, blob, call_list, call_dict, target, value_rank, deadline,
                              non_block, simple)
            return self._channel.wait(held) if wait else held
        if wait:
            return self._channel.call(name, blob, call_list, call_dict, target, value_rank,
                                      deadline, simple)
        return self._channel.submit(name, blob, call_list, call_dict, target, value_rank,
                                    deadline, non_block, simple)

    def _held(self, name: str, blob: bytes | None, call_list: list[Any],
              call_dict: dict[str, Any], target: list[int], value_rank: int | None,
              deadline: float | None, non_block: bool, simple: bool) -> PendingCall:
        """A checked call made while suspended: its values are tried on the encoder first
        (so one that cannot travel fails now, not after resume), then it waits at the gate
        (a blocking call in its caller's thread; a ``non_block`` one in the gate, without
        a thread of its own). For ``non_block``, the call returned stands for the held
        one: only its ``future`` is meant to be used."""
        self._channel.check_encodable(name, blob, call_list, call_dict,
                                      -1 if value_rank is None else value_rank, simple)

        def send(left: float | None) -> PendingCall:
            return self._channel.submit(name, blob, call_list, call_dict, target,
                                        value_rank, left, non_block, simple)

        if not non_block:
            return send(self._gate.hold(deadline, name))
        future = self._gate.defer(lambda left: _future(send(left)), deadline, name)
        return PendingCall(0, name, target, value_rank, deadline, future)

    def _callable_name(self, method: object) -> str:
        """The name of a call's ``method`` other than a plain non-empty ``str``."""
        if isinstance(method, str):
            if not method:
                raise InvalidArgumentError("method name must not be empty")
            return method
        if callable(method):
            name = getattr(method, "__qualname__", None) or repr(method)
            if not self._config.allow_callables:
                raise CallRefusedError(
                    f"callable {name!r} refused: this executor was built with "
                    "allow_callables=False; call a method of the worker class by name")
            return str(name)
        raise InvalidArgumentError(
            f"method must be a name or a callable, not {type(method).__name__}")

    def check_health(self, timeout: float = 10.0) -> None:
        """Ping every worker; raise ``RpcTimeoutError`` naming the ranks that did not
        answer within ``timeout`` (a positive number of seconds; None or ``inf``: no
        deadline), or ``WorkerDiedError`` if one is gone. Each answer carries what that
        worker dropped so far (see :meth:`stats`)."""
        self._owner.check()
        self._channel.wait(self._channel.ping(seconds("timeout", timeout)))
