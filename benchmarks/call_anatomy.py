"""Where a back-to-back call's time goes over shared memory, hop by hop.

Timestamps on CLOCK_MONOTONIC (one clock for every process) at five points of each
``collective_rpc("noop")`` (``--call noop``) or ``collective_rpc("small", (1, "x"),
{"c": [1.0, 2.0]})`` (``--call small``: an int result), p50 over ``--calls`` calls per
world size:

    a  the driver enters collective_rpc         q  a worker's reply is published (the
    p  the request is published (the stamp         stamp the ring core puts in its slot)
       the core puts in its slot)               e  the driver's wait in the ring core
                                                   returns
                                                f  collective_rpc returns

so ``a->p`` is the driver until its request is published (the call made and entered,
checked and encoded for arguments, sent: for a no-op on the compiled core all one call,
the round trip of ``executor/_calltable.c``), ``p->q`` a worker's turn (its wait noticing
the request, its decoding for a call with arguments, the method, the reply written: all
in the worker's ring core), ``q->e`` the reply's hand-off (or, when the reply came before
the driver waited, the driver's own steps in between) and ``e->f`` the driver after its
wait (the call ended, for a value its reply decoded). The points are the slots' stamps
and a wrapper around the rings' ``collect`` (private attributes: the script describes
this tree, not an interface), whose call costs about 0.1 us in ``e->f``. Where the
driver's wait runs inside its compiled round trip (a no-op or a call with plain
arguments on the compiled core), there is no ``e`` to stamp: the table shows ``q->f``,
the reply's hand-off and the driver after it, as one hop. Nothing runs in the workers
but the calls. Diagnostic only: no target.

Usage: ``python benchmarks/call_anatomy.py [--call noop] [--sizes 1,2,4,8] [--calls 20000]``.
"""

from __future__ import annotations

import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_out_option, arg_parser, machine, print_table, write_json

from gpuexec import Executor, Worker

ns = time.monotonic_ns
_U64 = struct.Struct("<Q")


class NoopWorker(Worker):
    def noop(self) -> None:
        return None

    def small(self, a: int, b: str, c: list[float] | None = None) -> int:
        return a


# --call: the call measured, as (method, args, kwargs)
CALLS: dict[str, tuple[str, tuple[Any, ...], dict[str, Any] | None]] = {
    "noop": ("noop", (), None),
    "small": ("small", (1, "x"), {"c": [1.0, 2.0]}),
}


def _stamp(view: memoryview, slot_off: int) -> int:
    """The publish time the ring core stamped into the slot at ``slot_off``."""
    return int(_U64.unpack_from(view, slot_off + 8)[0])


def _stamp_returns(obj: Any, name: str, into: list[int]) -> None:
    """Stamp each return of ``obj.name`` into ``into``."""
    fn: Callable[..., Any] = getattr(obj, name)

    def wrapped(*args: Any) -> Any:
        out = fn(*args)
        into.append(ns())
        return out

    setattr(obj, name, wrapped)


def measure(world: int, call: str, calls: int, warmup: int) -> dict[str, float]:
    method, call_args, call_kwargs = CALLS[call]
    with Executor(NoopWorker, world, device="cpu", transport="shm") as ex:
        transport: Any = ex._channel._transport  # private: see the module docstring
        request, replies = transport._shm.request, transport._shm.replies
        waits: list[int] = []
        _stamp_returns(transport._shm, "collect", waits)
        for _ in range(warmup):
            ex.collective_rpc(method, call_args, call_kwargs)
        waits.clear()
        entered: list[int] = []
        returned: list[int] = []
        published: list[int] = []
        answered: list[list[int]] = []
        rpc = ex.collective_rpc
        for _ in range(calls):
            entered.append(ns())
            rpc(method, call_args, call_kwargs)
            returned.append(ns())
            # Read once the call is done (no slot is written again before the next one):
            # the request's slot, and the slot of each ring's reply.
            published.append(_stamp(request._view, request._data + (
                (request._seq - 1) % request._n_slots) * request._slot_size))
            answered.append([_stamp(r._view, r._lengths[
                (_U64.unpack_from(r._view, r._off)[0] - 1) % r._n_slots]) for r in replies])

    def p50(values: list[int]) -> float:
        return statistics.median(values) / 1000

    rows = range(calls)
    hops = {
        "a->p driver until the request is published": p50([published[i] - entered[i]
                                                            for i in rows]),
        "p->q first worker's turn": p50([min(answered[i]) - published[i] for i in rows]),
        "p->q last worker's turn": p50([max(answered[i]) - published[i] for i in rows]),
    }
    if len(waits) < calls:  # the wait ran inside the compiled round trip: no e
        hops["q->f reply (the last) and the driver after it"] = p50(
            [returned[i] - max(answered[i]) for i in rows])
    else:
        # The last wait that returned before each call did (a call may wait more than
        # once).
        last_wait, k = [], 0
        for i in range(calls):
            while k + 1 < len(waits) and waits[k + 1] <= returned[i]:
                k += 1
            last_wait.append(waits[k])
        hops["q->e reply (the last)"] = p50([last_wait[i] - max(answered[i]) for i in rows])
        hops["e->f driver after the wait"] = p50([returned[i] - last_wait[i] for i in rows])
    hops["a->f whole call"] = p50([returned[i] - entered[i] for i in rows])
    return hops


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--call", choices=sorted(CALLS), default="noop",
                    help="the call measured (see above)")
    ap.add_argument("--sizes", default="1,2,4,8", help="world sizes, comma-separated")
    ap.add_argument("--calls", type=int, default=20000, help="timed calls per world size")
    ap.add_argument("--warmup", type=int, default=3000, help="untimed calls before them")
    add_out_option(ap)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {str(world): measure(world, args.call, args.calls, args.warmup)
               for world in sizes}
    hops = list(dict.fromkeys(h for r in results.values() for h in r))
    print(f"p50 of each hop of a back-to-back {args.call} call over shared memory "
          "(microseconds)")
    print_table(["hop", *(f"world {w}" for w in sizes)],
                [[hop, *(f"{results[str(w)][hop]:.2f}" if hop in results[str(w)] else "-"
                        for w in sizes)] for hop in hops])
    path = write_json("call_anatomy.json" if args.call == "noop" else
                      f"call_anatomy_{args.call}.json",
                      {"machine": machine(), "call": args.call, "calls": args.calls,
                       "p50_us": results}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
