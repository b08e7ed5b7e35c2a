"""Installing gpuexec: the Makefile's set-up logic and the built wheel in a venv without torch.

The Makefile is run for real with a stand-in ``python`` that records every pip command
and answers the way each kind of machine would (a local CPU wheel, only PyPI, CUDA wheels
slipping in), so a change to the set-up cannot silently re-break a fresh machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PUBLIC_INDEX = "https://pypi.org/simple"

# Stands in for python3 (and, copied into the venv, for its python): `-m venv DIR` makes
# DIR/bin/python, every `-m pip` command is logged; `pip install ... torch` without
# --index-url fails unless FAKE_LOCAL_CPU_TORCH=1 (PyPI serves no +cpu build), with it
# fails when FAKE_CPU_INDEX_DOWN=1; `pip list` shows a CUDA wheel when FAKE_NVIDIA=1.
FAKE_PYTHON = r"""#!/bin/bash
echo "$*" >> "$FAKE_LOG"
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; exit 0; fi
if [ "$1 $2 $3" = "-m pip install" ]; then
  case " $* " in
    *" torch "*)
      case " $* " in
        *" --index-url "*) [ "$FAKE_CPU_INDEX_DOWN" = 1 ] && exit 1 ;;
        *) [ "$FAKE_LOCAL_CPU_TORCH" = 1 ] && exit 0
           echo "ERROR: No matching distribution found for torch" >&2; exit 1 ;;
      esac ;;
  esac
  exit 0
fi
if [ "$1 $2 $3" = "-m pip list" ] && [ "$FAKE_NVIDIA" = 1 ]; then
  echo "nvidia-cublas-cu12 12.8.4.1"
fi
exit 0
"""


def _torch_pin() -> str:
    pins = re.findall(r"^torch==(\S+)", (ROOT / "constraints.txt").read_text(), re.M)
    assert len(pins) == 1, "constraints.txt must pin torch exactly once"
    return pins[0]


def _make(tmp_path: Path, has_gpu: str, target: str = ".installed",
          **fake: str) -> tuple[subprocess.CompletedProcess[str], list[str], Path]:
    if shutil.which("make") is None:
        pytest.fail("make is not installed")
    fake_py = tmp_path / "python3"
    fake_py.write_text(FAKE_PYTHON)
    fake_py.chmod(0o755)
    log = tmp_path / "pip.log"
    venv = tmp_path / "venv"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "FAKE_LOG": str(log), **fake}
    r = subprocess.run(["make", "-C", str(ROOT), f"{venv}/{target}", f"VENV={venv}",
                        f"PYTHON={fake_py}", f"HAS_GPU={has_gpu}"],
                       capture_output=True, text=True, timeout=60, env=env)
    lines = log.read_text().splitlines() if log.exists() else []
    return r, lines, venv


def _torch_installs(lines: list[str]) -> list[str]:
    return [ln for ln in lines if ln.startswith("-m pip install") and ln.endswith(" torch")]


def test_cpu_machine_takes_a_local_cpu_wheel_first(tmp_path: Path) -> None:
    r, lines, venv = _make(tmp_path, "", FAKE_LOCAL_CPU_TORCH="1")
    assert r.returncode == 0, r.stderr
    assert (venv / "cpu-constraints.txt").read_text().strip() == f"torch=={_torch_pin()}+cpu"
    cons = f"-c constraints.txt -c {venv}/cpu-constraints.txt"
    [torch] = _torch_installs(lines)
    assert cons in torch and "--index-url" not in torch
    final = lines[-2]  # then `pip list` of the guard
    assert final.startswith("-m pip install") and cons in final
    assert "-e .[torch,dev,ray,bench,metrics]" in final
    assert lines.index(torch) < lines.index(final)  # torch alone, before the rest
    assert (venv / ".installed").exists()


def test_cpu_machine_with_only_public_indexes_uses_pytorchs_cpu_index(tmp_path: Path) -> None:
    r, lines, venv = _make(tmp_path, "")
    assert r.returncode == 0, r.stderr
    first, second = _torch_installs(lines)
    assert "--index-url" not in first
    assert f"--index-url {CPU_INDEX} --extra-index-url {PUBLIC_INDEX}" in second
    assert f"-c constraints.txt -c {venv}/cpu-constraints.txt" in second
    assert f"torch {_torch_pin()}+cpu is not on the configured indexes" in r.stdout
    # The first attempt's pip error goes to a log, not the user's terminal.
    assert "No matching distribution" not in r.stdout + r.stderr
    assert "No matching distribution" in (venv / "torch-install.log").read_text()
    assert (venv / ".installed").exists()


def test_cpu_machine_fails_when_no_cpu_build_can_be_had(tmp_path: Path) -> None:
    r, lines, venv = _make(tmp_path, "", FAKE_CPU_INDEX_DOWN="1")
    assert r.returncode != 0
    assert f"error: no CPU build of torch {_torch_pin()} could be installed" in r.stderr
    assert len(_torch_installs(lines)) == 2
    assert not any("-e ." in ln for ln in lines)  # never falls through to a CUDA torch
    assert not (venv / ".installed").exists()


def test_cuda_wheels_on_a_machine_without_gpu_fail_the_setup(tmp_path: Path) -> None:
    r, _, venv = _make(tmp_path, "", FAKE_LOCAL_CPU_TORCH="1", FAKE_NVIDIA="1")
    assert r.returncode != 0
    assert "error: CUDA wheels were installed on a machine without a GPU" in r.stderr
    assert not (venv / ".installed").exists()


def test_gpu_machine_installs_the_default_build_in_one_step(tmp_path: Path) -> None:
    r, lines, venv = _make(tmp_path, "1", FAKE_NVIDIA="1")
    assert r.returncode == 0, r.stderr
    installs = [ln for ln in lines if ln.startswith("-m pip install") and "-e ." in ln]
    assert installs == ["-m pip install -q -c constraints.txt -e .[torch]",
                        "-m pip install -q -c constraints.txt -e .[torch,dev,ray,bench,metrics]"]
    assert not _torch_installs(lines)
    assert "+cpu" not in "\n".join(lines) and CPU_INDEX not in "\n".join(lines)
    assert not (venv / "cpu-constraints.txt").exists()


def test_demo_setup_installs_only_the_core_and_torch(tmp_path: Path) -> None:
    r, lines, venv = _make(tmp_path, "", ".base", FAKE_LOCAL_CPU_TORCH="1")
    assert r.returncode == 0, r.stderr
    installs = [ln for ln in lines if ln.startswith("-m pip install") and "-e ." in ln]
    assert installs == [f"-m pip install -q -c constraints.txt -c {venv}/cpu-constraints.txt "
                        "-e .[torch]"]
    assert (venv / ".base").exists() and not (venv / ".installed").exists()
    # `make demo` needs no more than that; `make test` adds the tools on top of it.
    # The ring core is built on the core install alone (optional: see the README).
    for goal, needs in (("demo", [".venv/.ringcore"]),
                        ("test", [".venv/.installed", ".venv/.ringcore"]),
                        (".venv/.ringcore", [".venv/.base", "gpuexec/ipc/_ringcore.c",
                                             "gpuexec/ipc/_ring.h", "gpuexec/ipc/_plain.h",
                                             "gpuexec/ipc/_collect.h",
                                             "gpuexec/executor/_calltable.c", "setup.py"]),
                        (".venv/.installed", [".venv/.base"])):
        dry = subprocess.run(["make", "-C", str(ROOT), "-n", "-p", goal], capture_output=True,
                             text=True, timeout=60)
        rule = re.search(rf"^{re.escape(goal)}: (.*)$", dry.stdout, re.M)
        assert rule and rule.group(1).split() == needs, goal


def test_clean_removes_every_build_output(tmp_path: Path) -> None:
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    made = [".venv", ".venv-vllm", ".pytest_cache", ".mypy_cache", ".ruff_cache", "build",
            "dist", "gpuexec.egg-info", "tests/_build"]
    for d in made:
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "x").write_text("x")
    (tmp_path / "keep.py").write_text("")
    r = subprocess.run(["make", "-C", str(tmp_path), "clean"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert [d for d in made if (tmp_path / d).exists()] == []
    assert (tmp_path / "keep.py").exists() and (tmp_path / "tests").exists()


def test_dry_run_reads_the_torch_version_from_constraints() -> None:
    r = subprocess.run(["make", "-C", str(ROOT), "-n", "-B", "/nonexistent-venv/.installed",
                        "VENV=/nonexistent-venv", "HAS_GPU="],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f'echo "torch=={_torch_pin()}+cpu" > /nonexistent-venv/cpu-constraints.txt' \
        in r.stdout
    assert f"--index-url {CPU_INDEX}" in r.stdout


def test_requirements_name_no_torch() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.lower().startswith("torch")]
    extras = project["optional-dependencies"]
    assert extras["torch"] == ["torch>=2.1"]
    for name, reqs in extras.items():
        names = [re.split(r"[<>=!~\[; ]", r)[0].lower() for r in reqs]
        assert len(names) == len(set(names)), name
        core = {re.split(r"[<>=!~\[; ]", d)[0].lower() for d in project["dependencies"]}
        assert not core & set(names), f"extra {name} repeats a core requirement"


@dataclass(frozen=True)
class NoTorchVenv:
    wheel: Path
    python: Path
    env: dict[str, str]  # a clean environment: nothing of the checkout or this run's site
    cwd: Path

    def run(self, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=120,
                              env={**self.env, **env}, cwd=self.cwd)


def _copy_source(src: Path) -> None:
    """What a source distribution holds (no build output of the checkout)."""
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "gpuexec", src / "gpuexec",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))


@pytest.fixture(scope="module")
def no_torch_venv(tmp_path_factory: pytest.TempPathFactory) -> NoTorchVenv:
    """The wheel, built from a copy of the package (the checkout stays clean), installed
    into a fresh venv (not --system-site-packages) with the pinned versions of its
    requirements and nothing else."""
    tmp = tmp_path_factory.mktemp("no_torch")
    src = tmp / "src"
    src.mkdir()
    _copy_source(src)
    out = tmp / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    [wheel] = out.glob("gpuexec-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    py = venv / "bin" / "python"
    pip_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                        "-c", str(ROOT / "constraints.txt"), str(wheel)],
                       capture_output=True, text=True, timeout=180, env=pip_env)
    assert r.returncode == 0, r.stderr
    env = {"PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
           "HOME": str(tmp)}
    return NoTorchVenv(wheel, py, env, tmp)


def test_wheel_holds_the_package_its_license_and_no_torch_requirement(
        no_torch_venv: NoTorchVenv) -> None:
    with zipfile.ZipFile(no_torch_venv.wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    outside = [n for n in names
               if not n.startswith("gpuexec/") and not re.match(r"gpuexec-[^/]+\.dist-info/", n)]
    assert outside == []
    assert "gpuexec/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    torch_reqs = [ln for ln in meta.splitlines() if ln.startswith("Requires-Dist: torch")]
    assert torch_reqs == ['Requires-Dist: torch>=2.1; extra == "torch"']
    assert "License-Expression: Apache-2.0" in meta and "Project-URL: " in meta
    # the compiled ring core, built against the limited API: one wheel for CPython >= 3.10
    assert "gpuexec/ipc/_ringcore.abi3.so" in names
    assert "gpuexec/executor/_calltable.abi3.so" in names
    assert "-cp310-abi3-linux_" in no_torch_venv.wheel.name


def test_the_installed_wheel_runs_the_compiled_core(no_torch_venv: NoTorchVenv) -> None:
    v = no_torch_venv
    r = v.run(str(v.python), "-m", "gpuexec", "doctor")
    assert "shared-memory ring core: compiled (C, abi3)" in r.stdout, r.stdout + r.stderr
    assert "call table steps: compiled (C, abi3)" in r.stdout, r.stdout + r.stderr


def test_a_machine_without_a_compiler_still_installs(tmp_path: Path) -> None:
    """The compiled core is optional: a failed build leaves a working pure-Python wheel."""
    src = tmp_path / "src"
    src.mkdir()
    _copy_source(src)
    out = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CC": "false"})  # a compiler that always fails
    assert r.returncode == 0, r.stderr
    [wheel] = out.glob("gpuexec-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert not [n for n in z.namelist() if n.endswith(".so")]
        assert "gpuexec/ipc/ringcore_py.py" in z.namelist()


def test_the_compiled_core_is_built_in_this_checkout() -> None:
    """The set-up (``make``) builds it; the suite runs on it and on the pure-Python twin
    (the ``ring_core`` fixture), so a checkout without it would test only one core."""
    from gpuexec.ipc import ringcore

    assert ringcore.load("compiled").NAME == "compiled"


FALLBACK = """
import importlib.abc, logging, sys

class NoCore(importlib.abc.MetaPathFinder):  # as if the build had failed
    def find_spec(self, name, path=None, target=None):
        if name == "gpuexec.ipc._ringcore":
            raise ImportError("no compiler here")
        return None

sys.meta_path.insert(0, NoCore())
logging.basicConfig(format="LOG %(message)s")
from gpuexec import Executor, Worker
from gpuexec.ipc import ringcore

class W(Worker):
    def plus(self, a):
        return a + 1 + self.rank

for _ in range(2):
    with Executor(W, 1, device="cpu", transport="shm") as ex:
        print("results", ex.collective_rpc("plus", args=(41,)))
print("core", ringcore.describe())
try:
    ringcore.load("compiled")
except Exception as e:
    print("refused", type(e).__name__, e)
"""


def _auto_core_env() -> dict[str, str]:
    """The environment of a script that must choose its core itself (``auto``), also
    when the suite runs on the pure-Python core (``GPUEXEC_CORE=python``)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "GPUEXEC_CORE": "auto"}


def test_without_the_compiled_core_one_log_line_and_the_same_results(tmp_path: Path) -> None:
    script = tmp_path / "fallback.py"
    script.write_text(FALLBACK)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=120, env=_auto_core_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:2] == ["results [42]"] * 2
    logged = [ln for ln in r.stderr.splitlines() if ln.startswith("LOG ")]
    assert len(logged) == 1 and "compiled ring core is not built (no compiler here)" in \
        logged[0], r.stderr
    assert "core pure Python (the compiled core is not built: no compiler here)" in r.stdout
    assert "refused ConfigError GPUEXEC_CORE=compiled, but the compiled ring core is not " \
        "built (no compiler here)" in r.stdout


NO_STEPS = FALLBACK.replace('"gpuexec.ipc._ringcore"', '"gpuexec.executor._calltable"')
NO_STEPS += """
from gpuexec.executor.calls import describe_steps
print("steps", describe_steps())
"""


def test_without_the_compiled_table_steps_one_log_line_and_the_same_results(
        tmp_path: Path) -> None:
    """The ring core built, the call table's steps not (or stale): the table runs in
    Python, said once."""
    script = tmp_path / "no_steps.py"
    script.write_text(NO_STEPS)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=120, env=_auto_core_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:3] == ["results [42]"] * 2 + ["core compiled (C, abi3)"]
    logged = [ln for ln in r.stderr.splitlines() if ln.startswith("LOG ")]
    assert logged == ["LOG gpuexec: the compiled call table steps are not built (no "
                      "compiler here); the call table runs in Python (same behaviour, "
                      "slower)"], r.stderr
    assert "steps Python (the compiled steps are not built: no compiler here)" in r.stdout
    stale = tmp_path / "stale_steps.py"
    stale.write_text("import sys, types\n"  # a build from an older source
                     "old = types.ModuleType('gpuexec.executor._calltable')\n"
                     "old.API = 0\n"
                     "sys.modules[old.__name__] = old\n" + NO_STEPS)
    r = subprocess.run([sys.executable, str(stale)], capture_output=True, text=True,
                       timeout=120, env=_auto_core_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:2] == ["results [42]"] * 2
    assert "the build found is stale" in r.stderr and "steps Python" in r.stdout


STALE = """
import logging, sys, types
from gpuexec.ipc import ringcore

old = types.ModuleType("gpuexec.ipc._ringcore")  # a build from an older source
old.NAME, old.API = "compiled", ringcore.API - 1
sys.modules["gpuexec.ipc._ringcore"] = old
logging.basicConfig(format="LOG %(message)s")
from gpuexec import Executor, Worker

class W(Worker):
    def plus(self, a):
        return a + 1 + self.rank

with Executor(W, 1, device="cpu", transport="shm") as ex:
    print("results", ex.collective_rpc("plus", args=(41,)))
print("core", ringcore.describe())
"""


def test_a_stale_build_of_the_core_is_refused_and_the_twin_runs(tmp_path: Path) -> None:
    """An editable install keeps its old build after a pull until make rebuilds it: a
    build whose interface differs is not called (one log line says why)."""
    script = tmp_path / "stale.py"
    script.write_text(STALE)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=120, env=_auto_core_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "results [42]"
    from gpuexec.ipc.ringcore import API

    stale = f"the build found is stale: interface {API - 1}, this source needs {API}; rebuild"
    logged = [ln for ln in r.stderr.splitlines() if ln.startswith("LOG ")]
    assert len(logged) == 1 and stale in logged[0], r.stderr
    assert f"core pure Python (the compiled core is not built: {stale}" in r.stdout


GUARD_FREE = """
from gpuexec import Executor, Worker
from gpuexec.errors import MissingDependencyError
import numpy as np

class W(Worker):
    def scaled(self, a):
        return a * (self.rank + 1)

ex = Executor(W, 2, device="cpu")
out = ex.collective_rpc("scaled", args=(np.arange(4.0),))
print("results", [o.tolist() for o in out], ex.start_method)
ex.shutdown()
try:
    Executor(W, 2, device="cpu", distributed_backend="gloo")
except MissingDependencyError as e:
    print("refused:", e)
"""


def test_guard_free_script_runs_two_workers_without_torch(no_torch_venv: NoTorchVenv) -> None:
    v = no_torch_venv
    r = v.run(str(v.python), "-c", "import torch")
    assert r.returncode == 1 and "No module named 'torch'" in r.stderr
    script = v.cwd / "noguard.py"
    script.write_text(GUARD_FREE)
    r = v.run(str(v.python), str(script))
    assert r.returncode == 0, r.stderr
    assert "results [[0.0, 1.0, 2.0, 3.0], [0.0, 2.0, 4.0, 6.0]]" in r.stdout
    assert "refused: distributed_backend='gloo' needs torch, which is not installed here: " \
           "pip install 'gpuexec[torch]'" in r.stdout


def test_console_script_without_torch(no_torch_venv: NoTorchVenv) -> None:
    gpuexec = str(no_torch_venv.python.parent / "gpuexec")
    r = no_torch_venv.run(gpuexec, "demo", "--calls", "0")
    assert r.returncode == 2 and r.stderr.startswith("usage: gpuexec demo")
    r = no_torch_venv.run(gpuexec, "demo", "--calls", "20")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("matches the driver's reference") == 2
    assert "not installed" in r.stdout and "Traceback" not in r.stderr


LIBCUDA_DEVICE = """
import ctypes, os, sys
from gpuexec.ipc.messages import WorkerSpec
from gpuexec.worker.device import init_device

fake = ctypes.CDLL(os.environ["GPUEXEC_LIBCUDA"])
fake.fake_set_device_count(2)
fake.fake_set_active(1, 1)   # a stale primary context on GPU 1
spec = WorkerSpec(rank=0, local_rank=0, world_size=1, local_world_size=1, device="cuda",
                  gpu=0, isolate_devices=False, stale_context_policy="release", driver_pid=0,
                  driver_is_parent=False, req_endpoint="", rep_endpoint="", worker_cls="")
report = init_device(spec)
print(report.device, [(a.device, a.action) for a in report.actions], report.warnings,
      "torch" in sys.modules, fake.fake_get_refcount(1))
"""


def test_cuda_device_handling_through_libcuda_without_torch(no_torch_venv: NoTorchVenv,
                                                            tmp_path: Path) -> None:
    from fakecuda import build_fake_libcuda

    lib = build_fake_libcuda(tmp_path)
    r = no_torch_venv.run(str(no_torch_venv.python), "-c", LIBCUDA_DEVICE,
                          GPUEXEC_LIBCUDA=str(lib))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "cuda:0 [(1, 'released')] [] False 0"
