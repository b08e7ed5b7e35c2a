"""What the caller of a call gets when a rank answered with a failure.

A worker answers with a :class:`~gpuexec.ipc.messages.Failure` when its method raised
(the caller gets :class:`~gpuexec.errors.RemoteError`) or when a value of the call could
not travel faithfully: the worker could not rebuild the arguments, or could not send its
result (:class:`~gpuexec.errors.ValueNotCarriedError` naming the rank). A reply whose
result the driver itself cannot rebuild is turned into the same kind of failure here, so
that call ends with the error instead of waiting for an answer that was dropped.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import RemoteError, ValueNotCarriedError
from ..ipc.codec import UndecodableValue
from ..ipc.messages import Failure, Reply


def call_error(failures: Mapping[int, Failure], method: str
               ) -> RemoteError | ValueNotCarriedError:
    """The error of a call whose ranks in ``failures`` failed: the lowest rank's own
    error, holding every failed rank's in ``errors``."""
    first, *rest = sorted(failures)
    others = {rank: rank_error(rank, failures[rank], method) for rank in rest}
    return rank_error(first, failures[first], method, others)


def rank_error(rank: int, failure: Failure, method: str,
               others: Mapping[int, RemoteError | ValueNotCarriedError] | None = None
               ) -> RemoteError | ValueNotCarriedError:
    """What ``rank``'s ``failure`` raises (``others``: the other failed ranks' errors)."""
    type_name, message, traceback = failure.texts()
    fault = failure.value
    if fault is not None:
        return ValueNotCarriedError(fault.path, fault.type_name, fault.reason, rank,
                                    method, traceback, others)
    return RemoteError(rank, type_name, message, traceback, method, others)


def undecodable_reply(e: UndecodableValue) -> Reply | None:
    """The reply in ``e`` with its value replaced by the failure to rebuild it; None when
    ``e`` holds no reply (then it is dropped and counted)."""
    reply = e.envelope
    if not isinstance(reply, Reply):
        return None
    return Reply(reply.call_id, reply.rank, None, e.failure())
