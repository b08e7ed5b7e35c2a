"""The executor's typed configuration, validated before any process starts.

Every argument of :class:`~gpuexec.Executor` lands here; a bad one raises
:class:`~gpuexec.errors.ConfigError` (a ``ValueError``) and nothing is left to clean up.
Environment variables are read only when an executor is built, and only as documented
overrides: ``CUDA_VISIBLE_DEVICES`` (which GPUs exist for us; here),
``GPUEXEC_START_METHOD`` (for ``start_method="auto"``; :mod:`.start_method`) and
``XDG_RUNTIME_DIR`` (where the private socket directory goes; :mod:`gpuexec.ipc.endpoints`).
Workers read what the driver passes them (their ``env``) and ``GPUEXEC_LIBCUDA``
(:mod:`gpuexec.worker.cuda_driver`).
"""

from __future__ import annotations

import glob
import importlib.util
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from ..errors import ConfigError
from ..ipc import source
from ..ipc.messages import DistributedSpec
from ..worker import extension_clashes
from ..worker.base import Worker
from .rank_env import EnvArg, rank_environments
from .rendezvous import DEFAULT_DISTRIBUTED_TIMEOUT, distributed_spec

DEVICES = ("auto", "cuda", "cpu")
DEFAULT_MAX_INFLIGHT_CALLS = 1024
DEFAULT_MAX_MESSAGE_SIZE = 1 << 32  # 4 GiB per frame
# Seconds a worker has to stop a cancelled call before it is killed: a method that
# returns to the interpreter stops in milliseconds; one stuck in C gets this long.
DEFAULT_CANCEL_GRACE = 5.0
# The most workers one executor runs. Each rank is a process this driver starts, watches
# (a descriptor in every poll) and waits for on every call, and over shared memory it has
# its own 4 MiB reply ring: 1,024 is far more than a node's GPUs or the ranks one driver
# usefully drives, and a mistyped size (10**6) is refused instead of starting processes
# until the machine falls over.
MAX_WORLD_SIZE = 1024


def visible_gpu_count() -> int:
    """GPUs this process may use, counted without loading any CUDA or NVML library.

    The device nodes ``/dev/nvidia<N>`` (what a container was given), else the NVIDIA
    driver's ``/proc/driver/nvidia/gpus`` entries; then narrowed by
    ``CUDA_VISIBLE_DEVICES`` (an empty value or ``-1`` hides every GPU). NVML is not
    used here on purpose: initialising it maps libcuda into the process, which is the
    very signal the start-method policy reads as "CUDA is initialised here".
    """
    total = len([p for p in glob.glob("/dev/nvidia*") if p[len("/dev/nvidia"):].isdigit()])
    if total == 0:
        total = len(glob.glob("/proc/driver/nvidia/gpus/*"))
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return total
    count = 0
    for entry in env.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break  # CUDA stops at the first invalid entry
        count += 1
    return min(count, total)


@dataclass(frozen=True)
class WorkerClassRef:
    """How the worker class reaches the worker: by import path, or by value."""

    path: str            # "module:QualName", or "" when sent by value
    pickled: bytes = b""
    name: str = ""


def _worker_class_ref(worker_cls: type | str, arg: str = "worker_cls",
                      base: type = Worker) -> WorkerClassRef:
    """Validate a class given as an object or a ``"module:Class"`` string (``arg`` names
    the argument in errors); it must subclass ``base`` (``object``: any class)."""
    kind = "a class" if base is object else "a gpuexec.Worker subclass"
    if isinstance(worker_cls, str):
        module, sep, qualname = worker_cls.partition(":")
        if not sep or not module or not qualname:
            raise ConfigError(f"{arg} {worker_cls!r} must look like 'package.module:Class'")
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError) as e:
            raise ConfigError(f"{arg} {worker_cls!r}: cannot import {module!r}: {e}") from e
        if found is None:
            raise ConfigError(f"{arg} {worker_cls!r}: no module named {module!r}")
        loaded = sys.modules.get(module)
        if loaded is not None:  # already imported here: check the class too, for free
            obj: Any = loaded
            for part in qualname.split("."):
                obj = getattr(obj, part, None)
            if not (isinstance(obj, type) and issubclass(obj, base)):
                raise ConfigError(f"{arg} {worker_cls!r} is not {kind}")
        return WorkerClassRef(worker_cls, name=qualname)
    if not (isinstance(worker_cls, type) and issubclass(worker_cls, base)):
        raise ConfigError(
            f"{arg} must be {kind} or a 'module:Class' string, not {worker_cls!r}")
    module = worker_cls.__module__
    if module == "__main__" or "<locals>" in worker_cls.__qualname__:
        try:
            blob = source.dumps(worker_cls)
        except Exception as e:
            raise ConfigError(f"{arg} {worker_cls.__qualname__} cannot be pickled: {e}") \
                from e
        return WorkerClassRef("", blob, worker_cls.__qualname__)
    return WorkerClassRef(f"{module}:{worker_cls.__qualname__}", name=worker_cls.__qualname__)


KEEP_ZYGOTE_ENV = "GPUEXEC_KEEP_ZYGOTE"


def _keep_zygote(keep_zygote: bool | None) -> bool:
    """``keep_zygote``; None: ``$GPUEXEC_KEEP_ZYGOTE`` ("1" keeps it, "0" or unset not)."""
    if keep_zygote is not None:
        if not isinstance(keep_zygote, bool):
            raise ConfigError(f"keep_zygote must be True, False or None, not {keep_zygote!r}")
        return keep_zygote
    value = os.environ.get(KEEP_ZYGOTE_ENV, "")
    if value not in ("", "0", "1"):
        raise ConfigError(f"{KEEP_ZYGOTE_ENV} must be 1 or 0, not {value!r}")
    return value == "1"


def _positive(name: str, value: float | None, allow_none: bool = False) -> float | None:
    """A positive finite number of seconds; with ``allow_none`` (a deadline that may be
    absent), None or ``inf``: None."""
    if allow_none and (value is None or (isinstance(value, float) and value == math.inf)):
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 \
            or not math.isfinite(value):
        raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")
    return float(value)


@dataclass(frozen=True)
class ExecutorConfig:
    """Validated settings; see :class:`~gpuexec.Executor` for their meaning."""

    worker: WorkerClassRef
    world_size: int
    device: str                        # resolved: "cuda" or "cpu"
    start_method: str                  # as requested ("auto" or a method)
    init_args_pickle: bytes
    env: tuple[dict[str, str], ...]    # one environment per rank (see .rank_env)
    isolate_devices: bool
    stale_context_policy: str          # "release", "reset" or "off"
    ready_timeout: float
    rpc_timeout: float | None
    shutdown_timeout: float
    terminate_timeout: float
    gpus: tuple[int, ...] = field(default=())  # per rank (Ray: 0, its one GPU); () on CPU
    extension: WorkerClassRef | None = None    # worker_extension_cls, None: none
    distributed: DistributedSpec | None = None  # the settled rendezvous, None: no group
    max_concurrent_batches: int = 2            # async calls outstanding per event loop
    allow_callables: bool = True       # False: no callables, nothing pickled to workers
    max_inflight_calls: int = DEFAULT_MAX_INFLIGHT_CALLS
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE  # bytes per ZeroMQ frame
    keep_zygote: bool = False          # the zygote outlives this executor's shutdown
    cancel_grace: float | None = DEFAULT_CANCEL_GRACE  # None: never kill for a cancel
    cancel_on_timeout: bool = True     # a timed-out call is interrupted in the workers

    @classmethod
    def build(
        cls,
        worker_cls: type[Worker] | str,
        world_size: int | None,
        *,
        device: str,
        start_method: str,
        worker_args: Sequence[Any],
        worker_kwargs: Mapping[str, Any] | None,
        env: EnvArg | None,
        isolate_devices: bool,
        release_stale_contexts: bool,
        stale_context_policy: str,
        distributed_backend: str | None,
        ready_timeout: float,
        rpc_timeout: float | None,
        shutdown_timeout: float,
        terminate_timeout: float,
        worker_extension_cls: type | str | None = None,
        master_addr: str | None = None,
        master_port: int | None = None,
        distributed_timeout: float = DEFAULT_DISTRIBUTED_TIMEOUT,
        max_concurrent_batches: int = 2,
        allow_callables: bool = True,
        max_inflight_calls: int = DEFAULT_MAX_INFLIGHT_CALLS,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        remote_devices: bool = False,
        keep_zygote: bool | None = None,
        cancel_grace: float | None = DEFAULT_CANCEL_GRACE,
        cancel_on_timeout: bool = True,
    ) -> ExecutorConfig:
        """``remote_devices``: the workers' GPUs are not this host's (``backend="ray"``):
        ``device="cuda"`` needs no local GPU and ``world_size`` must be given."""
        if device not in DEVICES:
            raise ConfigError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
        if stale_context_policy not in ("release", "reset"):
            raise ConfigError(f"stale_context_policy must be 'release' or 'reset', not "
                              f"{stale_context_policy!r}")
        if not isinstance(start_method, str):
            raise ConfigError(f"start_method must be a string, not {start_method!r}")
        if world_size is not None and (
                not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1):
            raise ConfigError(f"world_size must be an integer >= 1, not {world_size!r}")
        if world_size is not None and world_size > MAX_WORLD_SIZE:
            raise ConfigError(f"world_size={world_size} is over the maximum of "
                              f"{MAX_WORLD_SIZE} workers per executor")
        gpus = visible_gpu_count() if device in ("auto", "cuda") else 0
        resolved = "cuda" if device == "cuda" or (device == "auto" and gpus > 0) else "cpu"
        if remote_devices:
            if world_size is None:
                raise ConfigError("give world_size: the workers' devices are not on this host")
            size = world_size
        elif resolved == "cuda":
            if gpus == 0:
                raise ConfigError("device='cuda' but no CUDA device is visible "
                                  "(check nvidia-smi and CUDA_VISIBLE_DEVICES)")
            size = world_size if world_size is not None else gpus
            if size > gpus:
                raise ConfigError(f"world_size={size} needs {size} GPUs but {gpus} are visible")
        else:
            size = world_size if world_size is not None else 1
        if not isinstance(worker_args, (tuple, list)):
            raise ConfigError(f"worker_args must be a tuple or list, not {type(worker_args)}")
        if worker_kwargs is not None and not isinstance(worker_kwargs, Mapping):
            raise ConfigError(f"worker_kwargs must be a mapping, not {type(worker_kwargs)}")
        envs = rank_environments(env, size)
        if not isinstance(cancel_on_timeout, bool):
            raise ConfigError(f"cancel_on_timeout must be True or False, not "
                              f"{cancel_on_timeout!r}")
        if not isinstance(allow_callables, bool):
            raise ConfigError(f"allow_callables must be True or False, not {allow_callables!r}")
        keep = _keep_zygote(keep_zygote)
        for name, limit in (("max_inflight_calls", max_inflight_calls),
                            ("max_message_size", max_message_size)):
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
                raise ConfigError(f"{name} must be an integer >= 1, not {limit!r}")
        ref = _worker_class_ref(worker_cls)
        extension = None
        if worker_extension_cls is not None:
            extension = _worker_class_ref(worker_extension_cls, "worker_extension_cls", object)
            if isinstance(worker_cls, type) and isinstance(worker_extension_cls, type):
                clashes = extension_clashes(worker_cls, worker_extension_cls)
                if clashes:  # strings are imported, and checked, only in the workers
                    raise ConfigError(
                        f"worker_extension_cls {worker_extension_cls.__qualname__} defines "
                        f"{', '.join(clashes)}, which {worker_cls.__qualname__} already has: "
                        "an extension may only add methods")
        if not isinstance(max_concurrent_batches, int) or \
                isinstance(max_concurrent_batches, bool) or max_concurrent_batches < 1:
            raise ConfigError(f"max_concurrent_batches must be an integer >= 1, not "
                              f"{max_concurrent_batches!r}")
        distributed = distributed_spec(
            distributed_backend, resolved, master_addr=master_addr, master_port=master_port,
            timeout=distributed_timeout, env={k: v for e in envs for k, v in e.items()})
        try:
            init_args = cloudpickle.dumps((tuple(worker_args), dict(worker_kwargs or {})))
        except Exception as e:
            raise ConfigError(f"worker_args/worker_kwargs cannot be pickled: {e}") from e
        return cls(
            worker=ref,
            world_size=size,
            device=resolved,
            start_method=start_method,
            init_args_pickle=init_args,
            env=envs,
            isolate_devices=bool(isolate_devices),
            stale_context_policy=stale_context_policy if release_stale_contexts else "off",
            ready_timeout=_positive("ready_timeout", ready_timeout) or 0.0,
            rpc_timeout=_positive("rpc_timeout", rpc_timeout, allow_none=True),
            shutdown_timeout=_positive("shutdown_timeout", shutdown_timeout) or 0.0,
            terminate_timeout=_positive("terminate_timeout", terminate_timeout) or 0.0,
            gpus=() if resolved != "cuda" else (0,) * size if remote_devices else
            tuple(range(size)),
            extension=extension,
            distributed=distributed,
            max_concurrent_batches=max_concurrent_batches,
            allow_callables=allow_callables,
            max_inflight_calls=max_inflight_calls,
            max_message_size=max_message_size,
            keep_zygote=keep,
            cancel_grace=_positive("cancel_grace", cancel_grace, allow_none=True),
            cancel_on_timeout=cancel_on_timeout,
        )
