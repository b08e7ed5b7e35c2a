"""Where a back-to-back no-op call's time goes over shared memory, hop by hop.

Timestamps on CLOCK_MONOTONIC (one clock for every process) at six points of each
``collective_rpc("noop")``, p50 over ``--calls`` calls per world size:

    a  the driver enters collective_rpc         d  the worker starts sending its reply
    b  the driver starts sending the request    e  the driver's wait in the ring core returns
    c  the worker has the request's frame       f  collective_rpc returns

so ``a->b`` and ``e->f`` are the driver's Python around the rings, ``c->d`` the worker's
(decode, dispatch, the method, the reply's header), and ``b->c`` / ``d->e`` the two
hand-offs (a put into a ring, the other side's wait noticing it, the Python between).
The points are put there by wrapping the shared-memory transport's entry points of this
version (private attributes: the script describes this tree, not an interface), so each
hop carries a wrapper call or two (about 0.1 us); ``a->f`` is therefore a little above
what ``hot_path.py`` measures. Diagnostic only: no target.

Usage: ``python benchmarks/call_anatomy.py [--sizes 1,2,4,8] [--calls 20000]``.
"""

from __future__ import annotations

import gc
import statistics
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


class NoopWorker(Worker):
    def noop(self) -> None:
        return None


def _stamp_worker(worker: Worker) -> None:
    """Run in each worker: stamp c (the frame taken) and d (the reply about to leave)."""
    from gpuexec.worker.transport import ShmWorkerTransport

    transport = next(o for o in gc.get_objects() if isinstance(o, ShmWorkerTransport))
    took: list[int] = []
    sent: list[int] = []
    worker.__dict__["_anatomy"] = (took, sent)
    read_frame, send = transport.request.read_frame, transport.send

    def stamped_read(*args: Any) -> Any:
        frame = read_frame(*args)
        took.append(ns())
        return frame

    def stamped_send(frames: list[Any]) -> None:
        sent.append(ns())
        send(frames)

    transport.request.read_frame = stamped_read  # type: ignore[method-assign,assignment]
    transport.send = stamped_send  # type: ignore[method-assign]


def _stamps(worker: Worker) -> tuple[list[int], list[int]]:
    """The worker's stamps so far (this call's own c included, its d not), cleared."""
    took, sent = worker.__dict__["_anatomy"]
    out = (list(took), list(sent))
    took.clear()
    sent.clear()
    return out


def _wrap(obj: Any, name: str, before: list[int] | None, after: list[int] | None) -> None:
    fn: Callable[..., Any] = getattr(obj, name)

    def wrapped(*args: Any) -> Any:
        if before is not None:
            before.append(ns())
        out = fn(*args)
        if after is not None:
            after.append(ns())
        return out

    setattr(obj, name, wrapped)


def measure(world: int, calls: int, warmup: int) -> dict[str, float]:
    with Executor(NoopWorker, world, device="cpu", transport="shm") as ex:
        transport: Any = ex._channel._transport  # private: see the module docstring
        sends: list[int] = []
        waits: list[int] = []
        _wrap(transport, "send", sends, None)
        _wrap(transport._shm, "collect", None, waits)
        ex.collective_rpc(_stamp_worker)
        for _ in range(warmup):
            ex.collective_rpc("noop")
        ex.collective_rpc(_stamps)
        sends.clear()
        waits.clear()
        entered: list[int] = []
        returned: list[int] = []
        rpc = ex.collective_rpc
        for _ in range(calls):
            entered.append(ns())
            rpc("noop")
            returned.append(ns())
        per_rank = ex.collective_rpc(_stamps)
    # The worker's lists start with the stamps call's own d, and end with this one's c.
    took = [t[:calls] for t, _ in per_rank]
    sent = [s[1:calls + 1] for _, s in per_rank]
    # The last wait that returned before each call did (a call may wait more than once).
    last_wait, k = [], 0
    for i in range(calls):
        while k + 1 < len(waits) and waits[k + 1] <= returned[i]:
            k += 1
        last_wait.append(waits[k])

    def p50(values: list[int]) -> float:
        return statistics.median(values) / 1000

    rows = range(calls)
    return {
        "a->b driver before the send": p50([sends[i] - entered[i] for i in rows]),
        "b->c request to the first worker": p50(
            [min(t[i] for t in took) - sends[i] for i in rows]),
        "b->c request to the last worker": p50(
            [max(t[i] for t in took) - sends[i] for i in rows]),
        "c->d worker (the slowest)": p50(
            [max(s[i] - t[i] for t, s in zip(took, sent, strict=True)) for i in rows]),
        "d->e reply (the last)": p50([last_wait[i] - max(s[i] for s in sent) for i in rows]),
        "e->f driver after the wait": p50([returned[i] - last_wait[i] for i in rows]),
        "a->f whole call": p50([returned[i] - entered[i] for i in rows]),
    }


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--sizes", default="1,2,4,8", help="world sizes, comma-separated")
    ap.add_argument("--calls", type=int, default=20000, help="timed calls per world size")
    ap.add_argument("--warmup", type=int, default=3000, help="untimed calls before them")
    add_out_option(ap)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {str(world): measure(world, args.calls, args.warmup) for world in sizes}
    hops = list(next(iter(results.values())))
    print("p50 of each hop of a back-to-back no-op call over shared memory (microseconds)")
    print_table(["hop", *(f"world {w}" for w in sizes)],
                [[hop, *(f"{results[str(w)][hop]:.2f}" for w in sizes)] for hop in hops])
    path = write_json("call_anatomy.json", {"machine": machine(), "calls": args.calls,
                                            "p50_us": results}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
