"""PNG plots of the JSON the benchmarks write: ``python benchmarks/plot.py DIR``.

Reads ``DIR/rpc_latency.json`` and ``DIR/payload.json`` where present and writes
``rpc_latency.png`` (p50 per world size for every transport and baseline, back to back
and with calls spaced apart) and ``payload.png`` (broadcast throughput per payload
size) beside them. Needs matplotlib, the ``plot`` extra (``pip install
'gpuexec[plot]'``, or ``pip install '.[plot]'`` in a checkout); the benchmarks themselves
do not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import arg_parser


def _rpc(results: list[dict[str, Any]], out: Path, plt: Any) -> None:
    worlds = [r["world_size"] for r in results]
    fig, (back, spaced) = plt.subplots(1, 2, figsize=(11, 4))
    series = {"bare pyzmq": "bare_pyzmq", "gpuexec zmq": "gpuexec", "gpuexec shm": "gpuexec_shm",
              "multiprocessing.Pipe": "mp_pipe", "ProcessPoolExecutor": "process_pool",
              "loky": "loky"}
    for label, key in series.items():
        if all(key in r for r in results):
            back.plot(worlds, [r[key]["p50_us"] for r in results], marker="o", label=label)
    back.set(title="no-op collective_rpc, back to back", xlabel="workers", ylabel="p50 (us)",
             yscale="log", xticks=worlds)
    back.legend(fontsize=8)
    gap = results[0].get("gap_ms", 5)
    for transport in ("zmq", "shm"):
        spaced.plot(worlds, [r["spaced"][transport]["p50_us"] for r in results], marker="o",
                    label=f"gpuexec {transport} p50")
    cpu = spaced.twinx()
    cpu.plot(worlds, [r["spaced"]["shm"]["worker_cpu_pct_max"] for r in results], "k--",
             marker="x", label="shm worker CPU % (max)")
    cpu.set(ylabel="worker CPU %", ylim=(0, 100))
    spaced.set(title=f"calls {gap:g} ms apart", xlabel="workers", ylabel="p50 (us)",
               yscale="log", xticks=worlds)
    spaced.legend(fontsize=8, loc="upper left")
    cpu.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out)


def _payload(data: dict[str, Any], out: Path, plt: Any) -> None:
    rows = data["results"]
    sizes = [r["mib"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in rows[0]["effective_gb_per_s"]:
        ax.plot(sizes, [r["effective_gb_per_s"][name] for r in rows], marker="o", label=name)
    ax.set(title=f"broadcast to {data['world']} workers", xlabel="payload (MiB)",
           ylabel="effective GB/s (bytes x workers / s)", xscale="log", yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)


def main() -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("directory", type=Path,
                    help="where rpc_latency.json / payload.json are; the PNGs go beside them")
    args = ap.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot.py needs matplotlib, which is not installed: pip install "
              "'gpuexec[plot]' (in a checkout: pip install '.[plot]')", file=sys.stderr)
        return 2
    done = []
    rpc = args.directory / "rpc_latency.json"
    if rpc.exists():
        _rpc(json.loads(rpc.read_text())["results"], rpc.with_suffix(".png"), plt)
        done.append(rpc.with_suffix(".png"))
    payload = args.directory / "payload.json"
    if payload.exists():
        _payload(json.loads(payload.read_text()), payload.with_suffix(".png"), plt)
        done.append(payload.with_suffix(".png"))
    for path in done:
        print(f"wrote {path}")
    return 0 if done else 1


if __name__ == "__main__":
    raise SystemExit(main())
