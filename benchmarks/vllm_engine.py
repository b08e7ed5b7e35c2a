"""vLLM's own ``mp`` executor against gpuexec's (``VllmExecutor``), on vLLM's real engine.

For each tensor-parallel size and executor, a fresh process builds an ``LLM`` (the engine
core in its own process, as vLLM runs it by default) on a tiny random Llama written here
(2 layers, hidden 128, vocab 512; token-id prompts) and measures:

* start-up: ``LLM(...)`` until ready. gpuexec twice: ``gpuexec`` forks the workers from a
  zygote that has preloaded torch and vLLM (the adapter's default); ``gpuexec-cold`` from
  a zygote that preloaded only torch, so each worker imports vLLM itself. vLLM's ``mp``
  spawns its workers on CPU (each imports everything);
* batch: ``generate`` of 8 prompts x 32 tokens, after a warm-up; ``step`` is that over 32;
* rpc: ``LLM.collective_rpc("check_health")`` round trip (median of 100), the engine's
  path to the executor and back: a step pays the executor's part of it;
* idle CPU: each worker's CPU share (CPU seconds / wall seconds) over 3 s of 1-token
  requests arriving 5 ms and 100 ms apart, and over 2 s with no request at all.

Usage (in the vLLM venv, ``make test-vllm`` builds it):
``python benchmarks/vllm_engine.py [--tp 1,2] [--out DIR]``. Prints a table and writes
``vllm_engine.json``; ratios are against ``mp`` measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

from _common import add_out_option, arg_parser, machine, print_table, write_json  # noqa: E402

BACKENDS = {
    "mp": "mp",
    "gpuexec": "gpuexec.integrations.vllm.VllmExecutor",
    "gpuexec-cold": "_vllm_variants.ColdVllmExecutor",
}
ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1",
       "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _workers() -> list[Any]:
    """The engine's worker processes: the processes of this tree whose only children (if
    any) are multiprocessing's resource trackers or gpuexec's guardians (the engine core
    and gpuexec's zygote have workers as children; each gpuexec worker has a guardian)."""
    import psutil

    def tracker(p: Any) -> bool:
        return "resource_tracker" in " ".join(p.cmdline()) or p.name() == "gpuexec-guard"

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if not tracker(p) and all(tracker(c) for c in p.children()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def _cpu_share(procs: list[Any], seconds: float, gap: float | None, llm: Any,
               one: Any) -> list[float]:
    """Each process's CPU seconds per wall second while 1-token requests arrive ``gap`` s
    apart (None: no request)."""
    before = [p.cpu_times() for p in procs]
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if gap is None:
            time.sleep(seconds)
            break
        llm.generate(one[0], one[1], use_tqdm=False)
        time.sleep(gap)
    wall = time.monotonic() - start
    after = [p.cpu_times() for p in procs]
    return [round(((a.user + a.system) - (b.user + b.system)) / wall, 4)
            for a, b in zip(after, before, strict=True)]


def run_one(backend: str, tp: int, model: str) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=model, skip_tokenizer_init=True, tensor_parallel_size=tp,
              distributed_executor_backend=BACKENDS[backend], dtype="float32",
              max_model_len=256, enforce_eager=True, max_num_seqs=8, seed=0)
    startup = time.perf_counter() - start
    prompts = [TokensPrompt(prompt_token_ids=[(7 * i + 13 * j) % 500 + 5 for j in range(12)])
               for i in range(8)]
    greedy = SamplingParams(temperature=0.0, max_tokens=32, detokenize=False, ignore_eos=True)
    one = ([prompts[0]], SamplingParams(temperature=0.0, max_tokens=1, detokenize=False))
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, detokenize=False), use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, greedy, use_tqdm=False)
    batch = time.perf_counter() - start
    rpc = []
    for _ in range(100):
        t = time.perf_counter()
        llm.collective_rpc("check_health")
        rpc.append((time.perf_counter() - t) * 1e6)
    procs = _workers()
    idle = {"5ms": _cpu_share(procs, 3.0, 0.005, llm, one),
            "100ms": _cpu_share(procs, 3.0, 0.1, llm, one),
            "none": _cpu_share(procs, 2.0, None, llm, one)}
    result = {"backend": backend, "tp": tp, "startup_s": round(startup, 2),
              "batch_s": round(batch, 3), "step_ms": round(batch / 32 * 1e3, 2),
              "rpc_p50_us": round(statistics.median(rpc), 1), "workers": len(procs),
              "idle_cpu": idle, "tokens": [list(o.outputs[0].token_ids) for o in outs]}
    llm.llm_engine.engine_core.shutdown()
    return result


def main() -> None:
    parser = arg_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--tp", default="1,2",
                        help="tensor-parallel sizes, comma-separated")
    add_out_option(parser)
    parser.add_argument("--one", nargs=3, metavar=("BACKEND", "TP", "MODEL"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        os.environ.update(ENV)
        res = run_one(args.one[0], int(args.one[1]), args.one[2])
        print("RESULT " + json.dumps(res), flush=True)
        return
    from vllm_suite.tiny_model import write_tiny_llama

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_tiny_llama(Path(tmp) / "tiny-llama"))
        for tp in [int(x) for x in args.tp.split(",")]:
            for backend in BACKENDS:
                proc = subprocess.run(
                    [sys.executable, __file__, "--one", backend, str(tp), model],
                    capture_output=True, text=True, env={**os.environ, **ENV}, timeout=900)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    sys.exit(f"{backend} tp={tp} failed:\n{proc.stderr[-3000:]}")
                results.append(json.loads(line[0].removeprefix("RESULT ")))
                print(f"done: {backend} tp={tp}", file=sys.stderr, flush=True)
    rows = []
    for r in results:
        base = next(b for b in results if b["tp"] == r["tp"] and b["backend"] == "mp")
        r["same_tokens_as_mp"] = r["tokens"] == base["tokens"]
        idle = r["idle_cpu"]
        rows.append([r["backend"], r["tp"], r["startup_s"],
                     f"{r['startup_s'] / base['startup_s']:.2f}", r["batch_s"], r["step_ms"],
                     r["rpc_p50_us"], f"{r['rpc_p50_us'] / base['rpc_p50_us']:.2f}",
                     "/".join(f"{x:.3f}" for x in idle["5ms"]),
                     "/".join(f"{x:.3f}" for x in idle["100ms"]),
                     "/".join(f"{x:.3f}" for x in idle["none"]), r["same_tokens_as_mp"]])
    print_table(["executor", "tp", "start s", "x mp", "batch s", "step ms", "rpc us", "x mp",
                 "cpu 5ms", "cpu 100ms", "cpu idle", "tokens=mp"], rows)
    path = write_json("vllm_engine.json", {"machine": machine(), "results": results}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
