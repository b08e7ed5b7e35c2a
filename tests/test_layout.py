"""The package's folder rules, checked on the source (``ast``, nothing imported):

* ``gpuexec/ipc`` (what both sides share: messages, codec, rings) imports neither
  ``executor`` nor ``worker``; the neutral top-level modules import no room at all;
* ``worker`` never imports ``executor`` (a worker process must not load the driver);
* ``executor`` uses only the worker's public entry points (:data:`WORKER_ENTRY_POINTS`);
* every exception class a user can receive derives from ``GpuexecError`` and lives in
  ``gpuexec/errors.py``; the few others are internal signals, listed with the place
  that catches them;
* no module is longer than :data:`MAX_LINES`, except those listed with a reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gpuexec"
MAX_LINES = 400

# The worker modules the driver may import, and why each is an entry point.
WORKER_ENTRY_POINTS = {
    "gpuexec.worker": "the package: Worker and the composition rule for extensions",
    "gpuexec.worker.base": "Worker, the class users subclass",
    "gpuexec.worker.process": "run_worker, the worker process's main (started by launcher)",
    "gpuexec.worker.ray_actor": "RayWorkerActor, the worker's main inside a Ray actor",
}

# Modules at the top of the package that any room may import: they import no room.
NEUTRAL = {"gpuexec.errors", "gpuexec.optional", "gpuexec.cuda_state", "gpuexec.nvml"}

# Modules allowed past MAX_LINES, with the reason.
LONG_MODULES = {
    "gpuexec.errors": "every exception a user can receive, in one place (a rule below)",
    "gpuexec.ipc.codec": "encoder and decoder of one wire format, kept side by side",
    "gpuexec.ipc.values": "the value rule: its table, the walk that sends by it and the "
                          "rebuild that checks it, side by side",
    "gpuexec.worker.cuda_driver": "one ctypes binding per libcuda entry point, nothing else",
    "gpuexec.executor.executor": "the public Executor: its constructor's docstring is the "
                                 "reference for every option",
    "gpuexec.executor.channel": "the driver's three locks, their written order and every "
                                "path that takes them (send, wait, close), side by side",
    "gpuexec.ipc.shm_ring": "the ring's writer and readers: one layout and one table of "
                            "slot states, each side's moves next to the other's",
    "gpuexec.ipc.ringcore_py": "the compiled core's twin: one function per C function, "
                               "with the same contract on the same bytes",
    "gpuexec.executor.calls": "how a call ends, under the call table's one lock: results, "
                              "failures, timeouts, cancellations and their watches",
}

# Exception classes outside errors.py: internal signals, never raised to a user.
INTERNAL_EXCEPTIONS = {
    "ControllerGone": "suspension.py: becomes CheckpointError / WorkerDiedError",
    "MalformedMessage": "codec.py: a dropped frame, counted in stats",
    "UndecodableValue": "codec.py: becomes the call's ValueNotCarriedError",
    "Refused": "values.py: becomes ValueNotCarriedError",
    "Unrebuilt": "values.py: becomes ValueNotCarriedError",
    "BadBuffer": "arrays.py: a malformed frame, counted",
    "RingTimeout": "shm_ring.py: no room in a ring now; the sender waits or retries",
    "FutureCancelled": "calls.py: marks a call whose Future.cancel() took it back",
}

EXCEPTION_ROOTS = {"BaseException", "Exception", "ValueError", "TypeError", "TimeoutError",
                   "RuntimeError", "OSError", "ImportError", "PermissionError", "KeyError"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports (absolute names, lazy imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # submodules by name
    return {m for m in out if m == "gpuexec" or m.startswith("gpuexec.")}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


MODULES = _modules()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_follow_the_folder_rules(name: str) -> None:
    room = _room(name)
    known = set(MODULES)
    for target in _imports(name, MODULES[name]):
        if target not in known:
            continue  # a name imported from a module, not a module
        there = _room(target)
        if name in NEUTRAL:
            assert target in NEUTRAL, f"{name} is neutral but imports {target}"
        elif room == "ipc":
            assert there not in ("executor", "worker", "integrations"), \
                f"{name} (ipc) imports {target}"
        elif room == "worker":
            assert there not in ("executor", "integrations"), f"{name} imports {target}"
        elif room == "executor" and there == "worker":
            assert target in WORKER_ENTRY_POINTS, \
                f"{name} imports {target}, not one of the worker's entry points"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_are_short(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    if name in LONG_MODULES:
        assert lines <= 2 * MAX_LINES, f"{name}: {lines} lines"
    else:
        assert lines <= MAX_LINES, f"{name}: {lines} lines (split it, or list it with a reason)"


def test_listed_exceptions_still_exist() -> None:
    names = set(_exception_classes())
    assert set(LONG_MODULES) <= set(MODULES)
    assert set(INTERNAL_EXCEPTIONS) <= {n for n, _ in names}


def _exception_classes() -> list[tuple[str, str]]:
    """(class, module) of every exception class defined in the package."""
    classes: dict[str, tuple[list[str], str]] = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = [b.id if isinstance(b, ast.Name) else
                         b.attr if isinstance(b, ast.Attribute) else "" for b in node.bases]
                classes[node.name] = (bases, name)
    exceptions: set[str] = set()
    grew = True
    while grew:
        grew = False
        for cls, (bases, _) in classes.items():
            if cls not in exceptions and any(b in EXCEPTION_ROOTS or b in exceptions
                                             for b in bases):
                exceptions.add(cls)
                grew = True
    return [(cls, classes[cls][1]) for cls in sorted(exceptions)]


def test_user_facing_exceptions_live_in_errors() -> None:
    stray = [(cls, module) for cls, module in _exception_classes()
             if module != "gpuexec.errors" and cls not in INTERNAL_EXCEPTIONS]
    assert not stray, f"exceptions outside gpuexec/errors.py: {stray}"


def test_the_rules_see_a_violation(tmp_path: Path) -> None:
    """The import parser resolves relative imports: the test cannot pass by seeing none."""
    fake = tmp_path / "zygote_server.py"
    fake.write_text("from ..executor.start_method import x\nfrom . import base\n")
    got = _imports("gpuexec.worker.zygote_server", fake)
    assert "gpuexec.executor.start_method" in got and "gpuexec.worker.base" in got


# Private attributes tests may read, none of them gpuexec's (a test that needs to reach
# into an executor uses gpuexec.testing, which the package keeps in step with itself).
TEST_PRIVATE_READS = {
    "_exit": "os._exit, in forked children",
    "_actions": "argparse's parser: every option has help",
    "_SubParsersAction": "argparse's sub-command action, to walk every sub-command",
    "_resource_tracker": "multiprocessing's tracker, isolated per test run",
    "_forkserver": "multiprocessing's fork server, isolated per test run",
    "_sleep": "torch.cuda._sleep: GPU work of a known length (a cancelled NCCL barrier)",
    "_current_frames": "sys._current_frames: a test worker waits until its main thread "
                       "is inside a collective",
}


def _private_reads(root: Path) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") \
                    or node.attr.startswith("__") or node.attr in TEST_PRIVATE_READS:
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue  # the test's own helper classes
            bad.append(f"{path.relative_to(root)}:{node.lineno}: .{node.attr}")
    return bad


def test_tests_read_no_private_fields(tmp_path: Path) -> None:
    bad = _private_reads(Path(__file__).resolve().parent)
    assert not bad, "tests reading private fields:\n" + "\n".join(bad)
    (tmp_path / "test_peek.py").write_text("def test(ex):\n    ex._channel.send_raw([])\n")
    assert _private_reads(tmp_path) == ["test_peek.py:2: ._channel"]
