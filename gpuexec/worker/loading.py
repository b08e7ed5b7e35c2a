"""Building the user's worker inside the worker process: its class (imported by
``module:Class`` or unpickled), the optional extension mixed in, and the instance, whose
context (rank, device, spec) is set before its ``__init__`` runs."""

from __future__ import annotations

import importlib
from typing import Any

import cloudpickle

from ..ipc.messages import WorkerSpec
from .base import Worker, WorkerContext
from .device import torch_device
from .extension import compose


def _load_class(path: str, pickled: bytes) -> Any:
    if pickled:
        return cloudpickle.loads(pickled)
    module_name, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def resolve_class(spec: WorkerSpec) -> type[Worker]:
    cls = _load_class(spec.worker_cls, spec.worker_cls_pickle)
    if not (isinstance(cls, type) and issubclass(cls, Worker)):
        raise TypeError(f"{spec.worker_cls or cls!r} is not a gpuexec.Worker subclass")
    return cls


def extend_class(spec: WorkerSpec, cls: type[Worker]) -> type[Worker]:
    """``cls`` with the worker extension mixed in (``cls`` itself when there is none)."""
    if not spec.worker_extension_cls and not spec.worker_extension_pickle:
        return cls
    extension = _load_class(spec.worker_extension_cls, spec.worker_extension_pickle)
    return compose(cls, extension)


def build_worker(spec: WorkerSpec, cls: type[Worker]) -> Worker:
    args, kwargs = cloudpickle.loads(spec.init_args_pickle) if spec.init_args_pickle else ((), {})
    worker = cls.__new__(cls)
    worker._gpuexec_ctx = WorkerContext(
        spec.rank, spec.local_rank, spec.world_size, spec.local_world_size,
        torch_device(spec), spec)
    cls.__init__(worker, *args, **kwargs)
    return worker
