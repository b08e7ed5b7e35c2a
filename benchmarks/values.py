"""What keeping every value's type costs: the codec and ``collective_rpc`` before and
after, measured in the same run.

A/B: the previous release's code (``--baseline-ref``, default ``main``, exported from git
into a temporary directory) and this checkout run the same measurements in alternating
child processes (``--rounds`` each; the best p50 of each is kept, which filters out the
noise of a shared host). Measured per payload:

* ``codec``: a call's whole codec work, in process: the ``Call`` encoded (driver) and
  decoded (worker), a ``Reply`` of None encoded (worker) and decoded (driver);
* ``rpc``: a blocking ``collective_rpc`` round trip to one CPU worker, per transport.

Payloads: a no-op call, small arguments (an int, a short str, a list of 8 ints, a
float kwarg), an engine-like argument (a dict of 16 dataclasses holding tuples and enums,
``benchmarks/_vllm_like.py``), and a 1 MiB array. The baseline carries the engine-like
argument wrongly (as dicts, lists and ints); this checkout carries it as it is. The
ratio new/old is the result. Usage: ``python benchmarks/values.py [--calls 2000]
[--rounds 3] [--out DIR]`` (default DIR: ``benchmarks/out/``, which git ignores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TARGET_RATIO = 1.03  # no-op and small-argument collective_rpc p50, new / old
REPO = HERE.parent
sys.path.insert(0, str(HERE))


def _payloads() -> dict[str, tuple[list[Any], dict[str, Any]]]:
    import numpy as np
    from _vllm_like import engine_step

    return {
        "no-op": ([], {}),
        "small args": ([7, "prefill", [1, 2, 3, 4, 5, 6, 7, 8]], {"scale": 0.5}),
        "engine-like (dict of dataclasses)": ([engine_step()], {}),
        "1 MiB array": ([np.ones(1 << 17)], {}),
    }


def measure(calls: int, warmup: int, transports: list[str]) -> dict[str, Any]:
    """Run in a child process, against whichever ``gpuexec`` is first on the path."""
    from _common import time_calls
    from _vllm_like import TakeWorker

    import gpuexec
    from gpuexec import Executor
    from gpuexec.ipc.codec import Decoder, Encoder
    from gpuexec.ipc.messages import Call, Reply, ToDriver, ToWorker

    out: dict[str, Any] = {"gpuexec": str(Path(gpuexec.__file__).parent)}
    enc = Encoder(allow_pickle=True)
    dec: Decoder[Any] = Decoder(ToWorker, allow_pickle=True)
    reply_enc = Encoder(allow_pickle=True)
    reply_dec: Decoder[Any] = Decoder(ToDriver, allow_pickle=True)
    payloads = _payloads()
    for name, (args, kwargs) in payloads.items():
        def codec(args: list[Any] = args, kwargs: dict[str, Any] = kwargs) -> None:
            # A call's whole codec work: the request out and in, a reply (None) back.
            frames = enc.encode(Call(1, "take", None, args, kwargs))
            dec.decode(frames) if len(frames) > 1 else dec.decode_header(frames[0])
            reply_dec.decode_header(reply_enc.encode(Reply(1, 0, None))[0])
        out[f"codec|{name}"] = time_calls(codec, calls * 5, warmup)
    for transport in transports:
        with Executor(TakeWorker, 1, device="cpu", transport=transport) as ex:
            out[f"rpc {transport}|no-op"] = time_calls(lambda: ex.collective_rpc("noop"),
                                                       calls, warmup)
            for name, (args, kwargs) in payloads.items():
                if name == "no-op":
                    continue
                out[f"rpc {transport}|{name}"] = time_calls(
                    lambda a=args, k=kwargs: ex.collective_rpc("take", args=a, kwargs=k),
                    calls, warmup)
    return out


def _child(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    path = [str(root), str(HERE), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--calls",
           str(args.calls), "--warmup", str(args.warmup), "--transports", args.transports]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir(),
                          timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"measurement in {root} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    from _common import add_out_option, arg_parser

    ap = arg_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000, help="timed calls per measurement")
    ap.add_argument("--warmup", type=int, default=200, help="untimed calls first")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating old/new rounds; the best p50 of each is kept")
    ap.add_argument("--transports", default="zmq,shm", help="comma-separated: zmq, shm")
    ap.add_argument("--baseline-ref", default="main",
                    help="git revision whose gpuexec package is the baseline")
    ap.add_argument("--baseline-dir", default=None, metavar="DIR",
                    help="a directory holding the baseline's gpuexec package (instead of "
                         "--baseline-ref, where there is no git history; default: none, use "
                         "--baseline-ref)")
    add_out_option(ap)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.calls, args.warmup, args.transports.split(","))))
        return 0
    from _common import export_package, machine, print_table, print_targets, write_json

    with tempfile.TemporaryDirectory(prefix="gpuexec-values-") as tmp:
        old_root = Path(args.baseline_dir).resolve() if args.baseline_dir else \
            export_package(args.baseline_ref, Path(tmp))
        best: dict[str, dict[str, dict[str, float]]] = {"old": {}, "new": {}}
        for r in range(args.rounds):
            for label, root in (("old", old_root), ("new", REPO)):
                t0 = time.perf_counter()
                got = _child(root, args)
                if not got["gpuexec"].startswith(str(root)):  # the A/B would compare X with X
                    raise RuntimeError(f"the {label} run imported {got['gpuexec']}, not {root}")
                print(f"round {r + 1}/{args.rounds} {label} ({got.pop('gpuexec')}): "
                      f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
                for key, stats in got.items():
                    if key not in best[label] or stats["p50_us"] < best[label][key]["p50_us"]:
                        best[label][key] = stats
    rows = []
    results = []
    for key in best["new"]:
        what, payload = key.split("|")
        old, new = best["old"].get(key), best["new"][key]
        ratio = new["p50_us"] / old["p50_us"] if old else float("nan")
        rows.append([what, payload, old["p50_us"] if old else "-", new["p50_us"],
                     f"{ratio:.2f}"])
        results.append({"measure": what, "payload": payload, "old": old, "new": new,
                        "ratio_p50": ratio})
    print(f"\nbaseline: {args.baseline_dir or args.baseline_ref}; best p50 of "
          f"{args.rounds} alternating rounds, microseconds")
    print_table(["measure", "payload", "old p50", "new p50", "new/old"], rows)
    # The engine-like argument was carried wrongly before: its ratio is the cost of
    # carrying it faithfully, not a target.
    checks = [(f"{r['measure']}, {r['payload']}: p50 new/old <= {TARGET_RATIO}",
               f"{r['ratio_p50']:.2f}", r["ratio_p50"] <= TARGET_RATIO
               if r["ratio_p50"] == r["ratio_p50"] else None)  # NaN: no baseline
              for r in results if r["measure"].startswith("rpc")
              and r["payload"] in ("no-op", "small args")]
    targets = print_targets(checks)
    path = write_json("values.json", {"machine": machine(), "baseline_ref": args.baseline_ref,
                                      "calls": args.calls, "rounds": args.rounds,
                                      "results": results, "targets": targets}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
