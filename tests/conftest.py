"""Shared fixtures: start methods, leak checks."""

from __future__ import annotations

import glob
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

START_METHODS = ["zygote", "subprocess", "fork", "spawn", "forkserver"]
ROOT = Path(__file__).resolve().parent.parent

# Every private directory this test run makes (its own executors', its subprocess
# drivers' and their workers') lands in one runtime directory of its own, set before any
# executor reads the environment: the leak checks then count only what this run made,
# never the directories of another gpuexec user or test run on the same machine.
RUN_DIR = tempfile.mkdtemp(prefix="gxtest-")
os.environ["XDG_RUNTIME_DIR"] = RUN_DIR
# The executors of this test process keep their zygote warm between them (each would pay an
# interpreter start and `import torch` otherwise); tests of the default pass keep_zygote=False.
os.environ["GPUEXEC_KEEP_ZYGOTE"] = "1"


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a Python subprocess of a test: this checkout and ``tests/`` first
    on the path, then whatever path this run already had (site dirs of a GPU host)."""
    path = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {"PYTHONPATH": os.pathsep.join(p for p in path if p),
           "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "XDG_RUNTIME_DIR": RUN_DIR}
    env.update(extra)
    return env


def gpuexec_dirs() -> set[str]:
    """Private ipc directories this test run's executors made: under :data:`RUN_DIR`,
    or under a runtime directory a test chose itself (the ``/tmp/gpx-*`` fallback for a
    path too long for a socket is shared with others, so it is not counted)."""
    roots = {RUN_DIR}
    if os.environ.get("XDG_RUNTIME_DIR"):
        roots.add(os.environ["XDG_RUNTIME_DIR"])
    found: set[str] = set()
    for root in roots:
        found.update(glob.glob(os.path.join(root, "gpuexec-*")))
    return {d for d in found if "bench" not in d}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove this run's directory (a leak has been reported by its test already)."""
    import shutil

    shutil.rmtree(RUN_DIR, ignore_errors=True)


def _helper_pids() -> set[int]:
    """Long-lived helpers: multiprocessing's forkserver and resource tracker, and
    gpuexec's zygotes."""
    from multiprocessing import forkserver, resource_tracker

    from gpuexec.executor.zygote_client import zygote_pids

    pids = {getattr(forkserver._forkserver, "_forkserver_pid", None),
            getattr(resource_tracker._resource_tracker, "_pid", None)}
    pids |= zygote_pids()  # they live as long as this process
    return {p for p in pids if p}


def worker_children() -> list[psutil.Process]:
    """Live descendants of this test process, multiprocessing's helpers excepted."""
    helpers = _helper_pids()
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid not in helpers and child.status() != psutil.STATUS_ZOMBIE:
                out.append(child)
        except psutil.Error:
            pass
    return out


def wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    """Pids still alive (not zombies) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    alive = pids
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return []
        time.sleep(0.02)
    return alive


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves worker processes or ipc directories behind."""
    dirs_before = gpuexec_dirs()
    pids_before = {p.pid for p in worker_children()}
    yield
    leftover = [p.pid for p in worker_children() if p.pid not in pids_before]
    assert wait_gone(leftover) == [], f"worker processes left running: {leftover}"
    assert gpuexec_dirs() - dirs_before == set(), "ipc directories left behind"


@pytest.fixture(params=["compiled", "python"])
def ring_core(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
              ) -> Iterator[str]:
    """Run the test on each ring core: this process's rings, and (through the
    environment every launcher hands on) its workers'. The compiled core must be built
    here (``tests/test_install.py`` checks that), so it is never skipped."""
    from gpuexec.ipc import ringcore

    name: str = request.param
    before = ringcore.current().NAME
    monkeypatch.setenv(ringcore.ENV, name)
    ringcore.select(name)
    try:
        yield name
    finally:
        ringcore.select(before)


def forecast_spy() -> Any:
    """An :class:`~gpuexec.ipc.forecast.ArrivalForecast` that also lists what it learns,
    in order: ``("arrived", published)`` and ``("answered", when)``."""
    from gpuexec.ipc.forecast import ArrivalForecast

    class Spy(ArrivalForecast):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[str, float]] = []

        def observe(self, published: float) -> None:
            self.seen.append(("arrived", published))
            super().observe(published)

        def replied(self, when: float) -> None:
            self.seen.append(("answered", when))
            super().replied(when)

    return Spy()
