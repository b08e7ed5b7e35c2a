"""``collective_rpc`` latency of two versions of gpuexec, A/B in one run on one host.

A baseline's ``gpuexec`` package (``--baseline-dir``, a tree holding it, or
``--baseline-ref``, a git revision of this checkout) and this checkout's each run in a
long-lived agent process (``_ab_agent.py``) that keeps its executors open. The two are
measured in pairs, one right after the other (the order alternating; both agents started
afresh every ``--restart-every`` rounds, so neither keeps a lucky placement of its
processes on the host's cores for the whole run), ``--rounds`` times
for every world size, transport and call (no-op, and small arguments: two positional
values and a keyword list), so both see the same machine state; a shared host's load
moves between pairs, not within one. Calls ``--gap-ms`` apart are paired the same way,
``--spaced-rounds`` times.

Per measurement the result is the median over the rounds of each pair's p50 ratio
new/old, with a 95 % bootstrap interval of that median, and the driver thread's CPU time
per call of each side (the least noisy number on a shared host). Target: no-op and
small-argument p50 new/old <= 1.03 at every world size over ZeroMQ and shared memory,
and the spaced mode unchanged. A row's verdict says ``met`` when the interval's upper
end is within the target, ``missed`` when its lower end is above it, and ``unresolved``
when the interval straddles it (more rounds, or a quieter host). Usage: ``python
benchmarks/ab_rpc.py [--baseline-ref main] [--rounds 40] [--sizes 1,2,4,8] [--out DIR]``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from _common import add_out_option, arg_parser, export_package, machine, print_table, write_json  # noqa: E402

TARGET = 1.03
BOOTSTRAP = 2000


class Agent:
    """One tree's ``_ab_agent.py`` process and its line protocol."""

    def __init__(self, tree: Path) -> None:
        bench = tree / "benchmarks"
        bench.mkdir(exist_ok=True)
        shutil.copy(HERE / "_ab_agent.py", bench / "_ab_agent.py")
        path = [str(tree), os.environ.get("PYTHONPATH", "")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
        self.proc = subprocess.Popen([sys.executable, str(bench / "_ab_agent.py")],
                                     env=env, cwd=bench, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        package = self._answer()["package"]
        if not str(package).startswith(str(tree)):  # the A/B would compare X with X
            self.close()
            raise RuntimeError(f"the agent for {tree} imported {package}")

    def _answer(self) -> dict[str, Any]:
        out: IO[str] | None = self.proc.stdout
        line = out.readline() if out is not None else ""
        if not line:
            raise RuntimeError(f"agent exited with {self.proc.wait()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def measure(self, **request: Any) -> dict[str, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def median_interval(ratios: list[float], rng: random.Random) -> tuple[float, float, float]:
    """The median of ``ratios`` and its 95 % bootstrap interval."""
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios)))
                  for _ in range(BOOTSTRAP))
    return (statistics.median(ratios), meds[int(0.025 * BOOTSTRAP)],
            meds[int(0.975 * BOOTSTRAP) - 1])


def verdict(hi: float, lo: float) -> str:
    return "met" if hi <= TARGET else "missed" if lo > TARGET else "unresolved"


def run_pairs(trees: dict[str, Path], configs: list[dict[str, Any]], rounds: int,
              restart_every: int) -> dict[int, dict[str, list[dict[str, float]]]]:
    """``rounds`` pairs per config, round by round (a load change spreads over every
    config), the side that goes first alternating. Both agents are started afresh every
    ``restart_every`` rounds: where the scheduler happened to put one side's driver and
    workers (a busy core, a shared cache) would otherwise favour it for the whole run."""
    got: dict[int, dict[str, list[dict[str, float]]]] = {
        i: {"old": [], "new": []} for i in range(len(configs))}
    agents: dict[str, Agent] = {}
    try:
        for r in range(rounds):
            if r % restart_every == 0:
                for agent in agents.values():
                    agent.close()
                # started in either order too
                sides = ("old", "new") if (r // restart_every) % 2 == 0 else ("new", "old")
                agents = {side: Agent(trees[side]) for side in sides}
            print(f"round {r + 1}/{rounds}", file=sys.stderr, flush=True)
            for i, cfg in enumerate(configs):
                order = ("old", "new") if (r + i) % 2 == 0 else ("new", "old")
                for side in order:
                    got[i][side].append(agents[side].measure(**cfg))
    finally:
        for agent in agents.values():
            agent.close()
    return got


def main() -> int:
    ap = arg_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-ref", default="main", help="git revision of the baseline")
    ap.add_argument("--baseline-dir", default=None, metavar="DIR",
                    help="a directory holding the baseline's gpuexec package (instead of "
                         "--baseline-ref, where there is no git history; default: none, use "
                         "--baseline-ref)")
    ap.add_argument("--rounds", type=int, default=40, help="pairs per back-to-back config")
    ap.add_argument("--sizes", default="1,2,4", help="world sizes, comma-separated")
    ap.add_argument("--calls", type=int, default=500, help="timed calls per measurement")
    ap.add_argument("--warmup", type=int, default=100, help="untimed calls before them")
    ap.add_argument("--gap-ms", type=float, default=5.0, help="spacing in the spaced mode")
    ap.add_argument("--spaced-rounds", type=int, default=4,
                    help="pairs per spaced config (0: skip the spaced mode)")
    ap.add_argument("--spaced-calls", type=int, default=200,
                    help="timed calls per spaced measurement (after 50 untimed)")
    ap.add_argument("--restart-every", type=int, default=10,
                    help="start both agents afresh every this many rounds")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ap.add_argument("--transports", default="zmq,shm", help="transports, comma-separated")
    add_out_option(ap)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    transports = args.transports.split(",")
    fast = [{"transport": t, "world": n, "kind": k, "calls": args.calls,
             "warmup": args.warmup, "gap_ms": 0.0}
            for n in sizes for t in transports for k in ("noop", "small")]
    spaced = [{"transport": t, "world": n, "kind": "noop", "calls": args.spaced_calls,
               "warmup": 50, "gap_ms": args.gap_ms} for n in sizes for t in transports]
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="gpuexec-ab-") as tmp:
        work = Path(tmp)
        old = work / "old"  # copies: the agent is written into each tree's benchmarks/
        if args.baseline_dir:
            shutil.copytree(Path(args.baseline_dir) / "gpuexec", old / "gpuexec")
        else:
            old = export_package(args.baseline_ref, work)
        new = work / "new"
        shutil.copytree(REPO / "gpuexec", new / "gpuexec")
        trees = {"old": old, "new": new}
        got = run_pairs(trees, fast, args.rounds, args.restart_every) if args.rounds else {}
        got_spaced = run_pairs(trees, spaced, args.spaced_rounds, args.restart_every) \
            if args.spaced_rounds else {}
    rows, results = [], []
    for cfgs, runs in ((fast, got), (spaced, got_spaced)):
        for i, runs_i in runs.items():
            cfg = cfgs[i]
            old_r, new_r = runs_i["old"], runs_i["new"]
            if not old_r:  # --rounds 0: the spaced mode alone
                continue
            ratios = [n["p50_us"] / o["p50_us"] for o, n in zip(old_r, new_r, strict=True)]
            med, lo, hi = median_interval(ratios, rng)
            o50 = statistics.median(x["p50_us"] for x in old_r)
            n50 = statistics.median(x["p50_us"] for x in new_r)
            ocpu = statistics.median(x["cpu_us"] for x in old_r)
            ncpu = statistics.median(x["cpu_us"] for x in new_r)
            mode = f"{cfg['gap_ms']:g} ms apart" if cfg["gap_ms"] else cfg["kind"]
            label = f"{cfg['transport']} {mode}"
            rows.append([label, cfg["world"], f"{o50:.1f}", f"{n50:.1f}", f"{med:.3f}",
                         f"{lo:.3f}-{hi:.3f}", f"{ocpu:.1f}", f"{ncpu:.1f}",
                         verdict(hi, lo)])
            results.append({**cfg, "rounds": len(ratios), "old_p50_us": o50,
                            "new_p50_us": n50, "ratio_median": med, "ratio_ci95": [lo, hi],
                            "old_cpu_us": ocpu, "new_cpu_us": ncpu,
                            "verdict": verdict(hi, lo), "ratios": ratios})
    print(f"target: p50 new/old <= {TARGET} (median of {args.rounds} paired rounds, 95 % "
          f"bootstrap interval; spaced mode {args.spaced_rounds} rounds; microseconds)")
    print_table(["measure", "world", "old p50", "new p50", "new/old", "95 % interval",
                 "old cpu/call", "new cpu/call", "verdict"], rows)
    path = write_json("ab_rpc.json", {"machine": machine(), "rounds": args.rounds,
                                      "baseline": args.baseline_dir or args.baseline_ref,
                                      "results": results}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
