"""``collective_rpc`` latency of two versions of gpuexec, A/B in one run on one host.

Runs this checkout's ``benchmarks/rpc_latency.py`` against a baseline's ``gpuexec``
package (``--baseline-dir``, a tree holding it, or ``--baseline-ref``, a git revision of
this checkout) and against this checkout's, in alternating rounds (``--rounds``), so both
see the same machine state; for each world size and measurement the best p50 of each
side is kept and the ratio new/old is the result.

Target: no-op p50 new/old <= 1.03 at every world size, over ZeroMQ and over shared
memory, and the ``--gap-ms`` spaced mode unchanged. Usage: ``python benchmarks/ab_rpc.py
[--baseline-ref main] [--rounds 3] [--sizes 1,2,4,8] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from _common import add_out_option, export_package, machine, print_table, write_json  # noqa: E402

TARGET = 1.03
# (label, key in rpc_latency.json's per-world-size result, p50 path inside it)
MEASURES = [("zmq no-op", ("gpuexec",)), ("shm no-op", ("gpuexec_shm",)),
            ("zmq 5 ms apart", ("spaced", "zmq")), ("shm 5 ms apart", ("spaced", "shm"))]


def _run(tree: Path, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """rpc_latency.py once, importing ``gpuexec`` from ``tree`` (the script puts its own
    parent first on the path, so it runs from a copy inside ``tree``)."""
    bench = tree / "benchmarks"
    bench.mkdir(exist_ok=True)
    for name in ("rpc_latency.py", "_common.py"):
        shutil.copy(HERE / name, bench / name)
    path = [str(tree), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
    probe = subprocess.run([sys.executable, "-c", "import gpuexec; print(gpuexec.__file__)"],
                           env=env, cwd=bench, capture_output=True, text=True, check=True)
    if not probe.stdout.strip().startswith(str(tree)):  # the A/B would compare X with X
        raise RuntimeError(f"a run in {tree} would import {probe.stdout.strip()}")
    cmd = [sys.executable, str(bench / "rpc_latency.py"), "--sizes", args.sizes, "--calls",
           str(args.calls), "--rounds", "1", "--spaced-calls", str(args.spaced_calls),
           "--out", str(out)]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, timeout=1800)
    results: list[dict[str, Any]] = json.loads((out / "rpc_latency.json").read_text())[
        "results"]
    return results


def _p50(result: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    node: Any = result
    for k in keys:
        node = node.get(k) if isinstance(node, dict) else None
    return node.get("p50_us") if isinstance(node, dict) else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-ref", default="main", help="git revision of the baseline")
    ap.add_argument("--baseline-dir", default=None, metavar="DIR",
                    help="a directory holding the baseline's gpuexec package (instead of "
                         "--baseline-ref, where there is no git history)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating old/new rounds")
    ap.add_argument("--sizes", default="1,2,4", help="world sizes, comma-separated")
    ap.add_argument("--calls", type=int, default=3000, help="timed calls per measurement")
    ap.add_argument("--spaced-calls", type=int, default=300,
                    help="calls timed in the 5 ms-apart mode")
    add_out_option(ap)
    args = ap.parse_args()
    best: dict[tuple[str, str, int], float] = {}
    with tempfile.TemporaryDirectory(prefix="gpuexec-ab-") as tmp:
        work = Path(tmp)
        old = work / "old"  # copies: a tree's own benchmarks/ dir is written into
        if args.baseline_dir:
            shutil.copytree(Path(args.baseline_dir) / "gpuexec", old / "gpuexec")
        else:
            old = export_package(args.baseline_ref, work)
        new = work / "new"
        shutil.copytree(REPO / "gpuexec", new / "gpuexec")
        for r in range(args.rounds):
            for side, tree in (("old", old), ("new", new)):
                print(f"round {r + 1}/{args.rounds}: {side}", file=sys.stderr, flush=True)
                out = work / f"out-{side}-{r}"
                for res in _run(tree, args, out):
                    for label, keys in MEASURES:
                        p50 = _p50(res, keys)
                        key = (side, label, res["world_size"])
                        if p50 is not None and (key not in best or p50 < best[key]):
                            best[key] = p50
    rows, results = [], []
    for label, _ in MEASURES:
        for n in sorted({k[2] for k in best if k[1] == label}):
            o, w = best.get(("old", label, n)), best.get(("new", label, n))
            ratio = w / o if o and w else float("nan")
            rows.append([label, n, o, w, f"{ratio:.3f}"])
            results.append({"measure": label, "world_size": n, "old_p50_us": o,
                            "new_p50_us": w, "ratio": ratio})
    print(f"target: no-op p50 new/old <= {TARGET} at every world size (best p50 of "
          f"{args.rounds} alternating rounds each; microseconds)")
    print_table(["measure", "world", "old p50", "new p50", "new/old"], rows)
    path = write_json("ab_rpc.json", {"machine": machine(), "rounds": args.rounds,
                                      "baseline": args.baseline_dir or args.baseline_ref,
                                      "results": results}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
