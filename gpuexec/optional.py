"""Optional dependencies, imported only by the features that need them.

The core (Executor, Worker, every transport, numpy payloads, CUDA device handling through
libcuda) needs none of them. A serving engine brings its own torch, so gpuexec neither
pins nor forces one: torch is the ``gpuexec[torch]`` extra, and a feature that needs it
calls :func:`require_torch`, which raises :class:`~gpuexec.errors.MissingDependencyError`
naming the feature rather than a bare ``ModuleNotFoundError`` from deep inside a worker.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

from .errors import MissingDependencyError


def torch_installed() -> bool:
    """Whether ``import torch`` can succeed here, without importing it (which costs
    seconds and maps libcuda)."""
    if "torch" in sys.modules:
        return sys.modules["torch"] is not None
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def require_torch(feature: str) -> ModuleType:
    """``torch``, imported now; :class:`MissingDependencyError` naming ``feature`` when it
    is not installed (a broken torch install raises its own error unchanged)."""
    try:
        return importlib.import_module("torch")
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        raise MissingDependencyError(feature, "torch", "torch") from None
