"""The gpuexec command, the examples and the benchmarks as a user meets them: misuse is a
usage error (exit 2, no traceback), edge values work or are refused up front, --help runs."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import subprocess_env

import gpuexec
from gpuexec.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("argv, message", [
    (["demo", "--calls", "0"], "argument --calls: must be >= 1, not 0"),
    (["demo", "--world-size", "0"], "argument --world-size: must be >= 1, not 0"),
    (["demo", "--world-size", "-1"], "argument --world-size: must be >= 1, not -1"),
    (["demo", "--calls", "many"], "argument --calls: not an integer: 'many'"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    (["bogus"], "invalid choice: 'bogus'"),
    ([], "the following arguments are required"),
])
def test_misuse_is_a_usage_error(argv: list[str], message: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: gpuexec")
    assert message in err and "Traceback" not in err


def test_every_option_has_help() -> None:
    def walk(parser: argparse.ArgumentParser) -> list[argparse.Action]:
        found: list[argparse.Action] = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    found += walk(sub)
            found.append(action)
        return found

    actions = walk(build_parser())
    assert {a.dest for a in actions} >= {"world_size", "calls", "command"}
    assert [a.dest for a in actions if not a.help] == []


def test_module_entry_point_names_itself_and_prints_no_traceback() -> None:
    r = subprocess.run([sys.executable, "-m", "gpuexec", "demo", "--calls", "0"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env=subprocess_env())
    assert r.returncode == 2
    assert r.stderr.splitlines()[0].startswith("usage: python -m gpuexec demo")
    assert "Traceback" not in r.stderr


def test_demo_with_one_call_and_one_worker(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--world-size", "1", "--calls", "1"]) == 0
    out = capsys.readouterr().out
    assert "gpuexec demo: 1 worker(s)" in out
    assert out.count("matches the driver's reference") == 1
    assert "round trip over 1 calls" in out


def _example(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                          timeout=180, cwd=ROOT, env=subprocess_env(CUDA_VISIBLE_DEVICES=""))


def test_serving_loop_serves_every_request_and_counts_agree() -> None:
    # 10 requests over 3 clients: neither a multiple of the clients nor of the default 64.
    r = _example("examples/serving_loop.py", "--device", "cpu", "--requests", "10",
                 "--clients", "3", "--max-batch", "4")
    assert r.returncode == 0, r.stderr
    assert "served 10 of 10 requests from 3 clients" in r.stdout
    steps = int(re.search(r"^(\d+) steps,", r.stdout, re.M).group(1))  # type: ignore[union-attr]
    assert f"steps counted by the extension per rank: [{steps}, {steps}]" in r.stdout


def _example_main(name: str) -> Any:
    """The ``main`` of ``examples/<name>.py``, imported in this process (parsing and
    refusing need no subprocess; the run above is the end-to-end one)."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        return importlib.import_module(name).main
    finally:
        sys.path.remove(str(ROOT / "examples"))


@pytest.mark.parametrize("name, argv, message", [
    ("serving_loop", ["--requests", "0"], "argument --requests: must be >= 1, not 0"),
    ("serving_loop", ["--clients", "-3"], "argument --clients: must be >= 1, not -3"),
    ("serving_loop", ["--world-size", "3"], "must divide the hidden size 1024"),
    ("serving_loop", ["--device", "cuda"], "no CUDA device is visible"),
    ("tensor_parallel_mlp", ["--world-size", "0"], "must be >= 1, not 0"),
    ("tensor_parallel_mlp", ["--batch", "x"], "argument --batch: not an integer: 'x'"),
    ("tensor_parallel_mlp", ["--world-size", "3"],
     "--d-hidden 1024 does not divide by --world-size 3"),
    ("tensor_parallel_mlp", ["--device", "cuda"], "no CUDA device is visible"),
])
def test_examples_refuse_bad_values_up_front(name: str, argv: list[str], message: str,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    main = _example_main(name)
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


HELP_ALL = """
import contextlib, io, runpy, sys
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as e:
            assert e.code in (0, None), (path, e.code)
    print("=== " + path)
    print(out.getvalue())
"""


def test_benchmarks_help_runs_and_speaks_of_the_product() -> None:
    r = subprocess.run([sys.executable, "-c", HELP_ALL, *map(str, BENCHMARKS)],
                       capture_output=True, text=True, timeout=180, cwd=ROOT,
                       env=subprocess_env(CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 0, r.stderr
    sections = r.stdout.split("=== ")[1:]
    assert len(sections) == len(BENCHMARKS)
    for section in sections:
        name, _, text = section.partition("\n")
        assert "usage:" in text, name
        assert "--out DIR" in text or name.endswith("plot.py"), name
        # every option that takes a value says its default
        options = re.split(r"\n(?=  -)", text.partition("options:")[2])
        for option in options:
            if re.match(r"\s*(-\w, )?--[\w-]+ [A-Z]", option):
                assert "default" in option, (name, option)


def test_benchmark_prints_a_verdict_per_target(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "benchmarks/rpc_latency.py", "--sizes", "1",
                        "--calls", "30", "--warmup", "3", "--rounds", "1",
                        "--spaced-calls", "10", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=subprocess_env(CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 0, r.stderr
    table = r.stdout.split("verdict\n")[1].split("\nwrote ")[0].splitlines()[1:]
    assert len(table) == 4  # two back-to-back targets, two spaced ones, at world 1
    assert all(re.search(r"  (met|missed)$", row) for row in table), table
    saved = json.loads((tmp_path / "rpc_latency.json").read_text())["targets"]
    assert [t["verdict"] for t in saved] == [row.split()[-1] for row in table]


def test_every_benchmark_with_a_target_gives_verdicts() -> None:
    for path in BENCHMARKS:
        text = path.read_text()
        if re.search(r"\btargets?\b:", text, re.I):
            assert "print_targets(" in text or '"met"' in text, path.name


WORK_ITEMS = re.compile(r"\bissue\s+\d+|\[\w+\] issue|issue's target", re.I)


def test_user_facing_text_names_no_work_items() -> None:
    files = [ROOT / "README.md", *BENCHMARKS, *(ROOT / "examples").glob("*.py"),
             *(ROOT / "gpuexec").rglob("*.py")]
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in files
             for m in WORK_ITEMS.finditer(p.read_text())]
    assert found == []


def test_benchmark_output_goes_where_git_ignores_it() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _common
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert _common.OUT == ROOT / "benchmarks" / "out"
    r = subprocess.run(["git", "check-ignore", "-q", "benchmarks/out/rpc_latency.json"],
                       cwd=ROOT, timeout=30)
    if r.returncode == 128:
        pytest.skip("not a git checkout")
    assert r.returncode == 0


def test_version_flag_prints_the_version() -> None:
    r = subprocess.run([sys.executable, "-m", "gpuexec", "--version"], capture_output=True,
                       text=True, timeout=60, cwd=ROOT, env=subprocess_env())
    assert r.returncode == 0
    assert r.stdout.strip() == f"gpuexec {gpuexec.__version__}"


NO_TORCH_DOCTOR = ("import sys; sys.modules['torch'] = None; from gpuexec.cli import main; "
                   "sys.exit(main(['doctor']))")  # as where torch is not installed


def _doctor(torch: bool = True, **env: str) -> list[str]:
    argv = ["-m", "gpuexec", "doctor"] if torch else ["-c", NO_TORCH_DOCTOR]
    r = subprocess.run([sys.executable, *argv], capture_output=True,
                       text=True, timeout=60, cwd=ROOT, env=subprocess_env(**env))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return r.stdout.splitlines()


def test_doctor_lists_every_gpu_the_driver_reports(tmp_path: Path) -> None:
    """From libcuda itself (the fake's two devices), with no torch and no device nodes."""
    from fakecuda import build_fake_libcuda

    lib = build_fake_libcuda(tmp_path)
    out = _doctor(torch=False, GPUEXEC_LIBCUDA=str(lib))
    assert "visible GPUs: 2" in out and any(ln.startswith("torch: not installed") for ln in out)
    assert ("  GPU 0: Fake CUDA Device 0, 16.0 GiB, compute capability 9.0, "
            "context in this process: no") in out
    assert ("  GPU 1: Fake CUDA Device 1, 32.0 GiB, compute capability 9.1, "
            "context in this process: no") in out
    gpus = out[out.index("visible GPUs: 2"):]
    with_torch = _doctor(GPUEXEC_LIBCUDA=str(lib))  # torch installed: the same list
    assert with_torch[with_torch.index("visible GPUs: 2"):] == gpus


def test_doctor_without_a_driver_says_so() -> None:
    out = _doctor(GPUEXEC_LIBCUDA="/nonexistent/libcuda.so.1")
    assert "CUDA driver: not found (no libcuda.so.1): CPU workers only" in out
