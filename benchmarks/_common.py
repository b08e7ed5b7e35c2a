"""Shared helpers for the benchmark scripts: percentiles, tables, JSON output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Default output: a directory git ignores. The committed results under results/ are
# written there on purpose, with --out.
OUT = Path(__file__).resolve().parent / "out"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def time_calls(fn: Callable[[], Any], n: int, warmup: int) -> dict[str, float]:
    """Run ``fn`` ``warmup`` + ``n`` times; p50/p99/mean of the last ``n`` in microseconds."""
    for _ in range(warmup):
        fn()
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        lat.append((time.perf_counter() - t) * 1e6)
    return {"p50_us": statistics.median(lat), "p99_us": percentile(lat, 0.99),
            "mean_us": statistics.fmean(lat), "n": n}


def machine() -> dict[str, Any]:
    gpu = ""
    try:
        import pynvml

        pynvml.nvmlInit()
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        gpu = f"{pynvml.nvmlDeviceGetCount()}x {name}"
    except Exception:
        gpu = "none"
    return {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "gpus": gpu,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's layout and shows the default of every option that
    takes a value, unless its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.option_strings and action.nargs != 0 and "default" not in text \
                and action.default not in (None, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def arg_parser(description: str | None) -> argparse.ArgumentParser:
    """The argument parser of a benchmark script (defaults shown in --help)."""
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def verdict(ok: bool | None) -> str:
    """``met`` / ``missed`` for a target; ``n/a`` where this run could not measure it."""
    return "n/a" if ok is None else "met" if ok else "missed"


def print_targets(checks: list[tuple[str, str, bool | None]]) -> list[dict[str, Any]]:
    """Print one row per target (target, what this run measured, met / missed) and return
    them for the JSON."""
    print()
    print_table(["target", "measured", "verdict"],
                [[target, measured, verdict(ok)] for target, measured, ok in checks])
    return [{"target": target, "measured": measured, "verdict": verdict(ok)}
            for target, measured, ok in checks]


def add_out_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="directory for the JSON (default: benchmarks/out/, which git "
                         "ignores)")


def write_json(name: str, payload: dict[str, Any], out_dir: str | None = None) -> Path:
    target = Path(out_dir) if out_dir else OUT
    target.mkdir(parents=True, exist_ok=True)
    path = target / name
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[f"{c:.1f}" if isinstance(c, float) else str(c)
                                           for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def export_package(ref: str, into: Path) -> Path:
    """The ``gpuexec`` package of git revision ``ref`` of this checkout, unpacked under
    ``into``: a tree to put first on the path for an A/B against this checkout."""
    archive = into / "src.tar"
    with archive.open("wb") as f:
        subprocess.run(["git", "-C", str(OUT.parent.parent), "archive", ref, "gpuexec"],
                       stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"
