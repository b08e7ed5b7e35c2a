"""What the driver's channel asks of a transport: the one interface both wires implement.

The channel (:mod:`.channel`) owns the locks and the call table; a transport owns the
wire. Each method says which of the channel's locks its caller holds, so a transport
takes none itself::

    send(ranks, frames) -> bool   write one request for ``ranks`` (send lock held);
                                  False: no room now, the channel waits and retries
    recv_for(call, deadline)      receive replies into the call table until ``call`` is
                                  done, or until ``deadline`` (``time.monotonic()``;
                                  None: none) at the latest (pump lock)
    pump(timeout_ms) -> [fd]      the monitor's round: replies and the workers' sentinels
                                  together; returns the sentinels that fired (pump lock)
    drain()                       take the replies ready now, never waiting (pump lock)
    wake()                        make a ``recv_for`` that waits return now (wake lock)
    close()                       release the wire (all three locks, once)
    dispatch(frames)              a message read from the reply socket by someone else
                                  (a respawn's handshake; pump lock): delivered, or kept
                                  for the ring marker that announces it (shm)
    forget(rank, sentinel)        a rank is being replaced (``Executor.respawn``): stop
                                  watching its old sentinel, and return what the new
                                  worker needs to join the wire, if anything (pump and
                                  send locks)
    adopt(sentinel)               the new worker is ready: watch its sentinel (pump and
                                  send locks)

Implementations: :class:`.zmq_transport.ZmqTransport` (an XPUB socket out, a PULL socket
in) and :class:`.shm_transport.ShmTransport` (shared-memory rings, with ZeroMQ for what
does not fit a slot). The channel chooses one, in one place, when it is made.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from ..ipc.messages import ShmSpec
from .calls import PendingCall


class Transport(ABC):
    """The wire between the driver and its workers; see the module docstring."""

    #: requests may carry large arrays as shared-memory payloads (``shm_payload``)
    carries_shm_payloads = False

    @abstractmethod
    def send(self, ranks: Sequence[int], frames: list[Any]) -> bool: ...

    @abstractmethod
    def recv_for(self, call: PendingCall, deadline: float | None) -> None: ...

    def core_lane(self) -> tuple[Any, ...] | None:
        """What the compiled round trip of a blocking call reads of this transport (see
        :meth:`.shm_transport.ShmTransport.core_lane`); None: it has none."""
        return None

    @abstractmethod
    def pump(self, timeout_ms: int) -> list[int]: ...

    @abstractmethod
    def drain(self) -> None: ...

    @abstractmethod
    def wake(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def dispatch(self, frames: list[Any]) -> None: ...

    @abstractmethod
    def forget(self, rank: int, sentinel: int) -> ShmSpec | None: ...

    @abstractmethod
    def adopt(self, sentinel: int) -> None: ...
