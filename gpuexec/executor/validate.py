"""The arguments of a call, checked before anything is encoded or sent.

A request the workers cannot decode would be dropped there and counted, and its caller
would wait for an answer that never comes; a value Python would quietly reinterpret (a
string split into characters, ``True`` taken for rank 1) would run the wrong call. So
every argument of :meth:`~gpuexec.Executor.collective_rpc` and
:meth:`~gpuexec.Executor.check_health` is checked here first, and a bad one raises
:class:`~gpuexec.errors.InvalidArgumentError` (a ``ValueError`` and a ``TypeError``)
naming the argument; nothing reaches any worker.

Rules (the README states the same):

* ``args``: a tuple or a list (a string, a dict or an iterator is refused, never split).
* ``kwargs``: None or a mapping whose keys are all strings.
* ``timeout``: None (no deadline) or a positive real number of seconds; ``inf`` means no
  deadline, like None; zero, negative numbers, NaN, bools and strings are refused. A
  timeout beyond ``FOREVER_S`` (about 24 days, the longest wait the sockets and locks
  underneath can be given) is no deadline either: ``1e300`` waits, it does not overflow.
* ``ranks``: None (every rank) or a non-empty sequence of distinct ranks; a rank is an
  integer (not a bool) in ``range(world_size)``.
* ``unique_reply_rank``: None or one of the targeted ranks (not a bool).
* ``non_block``: a bool.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import InvalidArgumentError


def call_args(args: object) -> list[Any]:
    """``args`` as the list the message carries."""
    if not isinstance(args, (tuple, list)):
        raise InvalidArgumentError(
            f"args must be a tuple or a list of positional arguments, not "
            f"{type(args).__name__} (for one argument write args=(value,))")
    return list(args)


def call_kwargs(kwargs: object) -> dict[str, Any]:
    """``kwargs`` as the dict the message carries."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise InvalidArgumentError(
            f"kwargs must be a mapping of keyword arguments, not {type(kwargs).__name__}")
    out = dict(kwargs)
    for key in out:
        if not isinstance(key, str):
            raise InvalidArgumentError(
                f"kwargs keys must be strings (keyword names), not {key!r}")
    return out


FOREVER_S = (2**31 - 1) / 1000  # ZeroMQ's RCVTIMEO is an int of milliseconds


def seconds(name: str, value: object) -> float | None:
    """A deadline in seconds: None, ``inf`` or more than ``FOREVER_S`` -> None (no
    deadline); else a positive finite float."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(
            f"{name} must be a number of seconds or None, not {type(value).__name__} "
            f"{value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int or a Fraction beyond float: forever, or refused below
        number = math.inf if value > 0 else -math.inf  # type: ignore[operator]
    if number > FOREVER_S:  # inf included
        return None
    if not number > 0 or math.isnan(number):
        raise InvalidArgumentError(
            f"{name} must be a positive number of seconds (or None for no deadline), "
            f"not {value!r}")
    return number


def _rank(value: object, world_size: int, name: str) -> int:
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{name}: {value!r} is a bool, not a rank")
    if not isinstance(value, numbers.Integral):  # int, numpy integers
        raise InvalidArgumentError(f"{name}: {value!r} is not a rank (an integer)")
    rank = int(value)
    if not 0 <= rank < world_size:
        raise InvalidArgumentError(
            f"{name}: rank {rank} is out of range for world_size {world_size}")
    return rank


def target_ranks(ranks: object, world_size: int) -> list[int]:
    """The ranks a call goes to, in the order their results are returned."""
    if isinstance(ranks, (str, bytes, Mapping)) or not isinstance(ranks, Iterable):
        raise InvalidArgumentError(
            f"ranks must be a sequence of ranks, not {type(ranks).__name__}")
    out = [_rank(r, world_size, "ranks") for r in ranks]
    if not out or len(set(out)) != len(out):
        raise InvalidArgumentError(f"ranks must be distinct and non-empty, not {out}")
    return out


def reply_rank(value: object, target: list[int], world_size: int) -> int | None:
    """``unique_reply_rank``: None, or one of ``target``."""
    if value is None:
        return None
    rank = _rank(value, world_size, "unique_reply_rank")
    if rank not in target:
        raise InvalidArgumentError(
            f"unique_reply_rank={rank} is not among the targeted ranks {target}")
    return rank


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be True or False, not {value!r}")
    return value
