"""The worker side of :class:`gpuexec.integrations.vllm.VllmExecutor`.

Each gpuexec worker hosts one vLLM ``WorkerWrapperBase`` -- vLLM's own worker, built
exactly as vLLM's multiprocessing executor builds it (``init_worker`` with the per-rank
keyword arguments, then ``init_device`` and ``load_model``) -- and runs vLLM's calls on it:

    driver: VllmExecutor.collective_rpc(method, args, kwargs)
        └─▶ gpuexec collective_rpc("vllm_call", Packed((method, args, kwargs)))
                └─▶ worker: VllmWorkerHost.vllm_call ─▶ wrapper.<method>(*args, **kwargs)
                        ├─ a plain result ─▶ Packed(result)            (replied at once)
                        └─ AsyncModelRunnerOutput ─▶ Future[Packed]   (deferred reply)

Names never resolve on the gpuexec :class:`~gpuexec.Worker`: vLLM's method names
(``init_device``, ``shutdown``...) travel inside the packed call and are looked up on
vLLM's wrapper only, and a callable runs as ``fn(wrapper, *args)``, as in vLLM.

Why ``Packed``: vLLM's arguments and results are deep graphs of Python objects
(dataclasses, tuples, enums, numpy arrays inside). gpuexec's codec would carry them
faithfully too, but it walks a value to find what needs pickling and then pickles the
non-plain parts one by one; a ``Packed`` is one plain ``pickle`` of the whole call (its C
fast path) over the executor's private channel -- what vLLM's own message queue does --
and arrives as the very same types, for less time per step.

Async scheduling: ``execute_model``/``sample_tokens`` return an
``AsyncModelRunnerOutput`` whose ``get_output()`` waits for the device. It runs in one
thread per worker (in call order, with the worker's device made current there so no
context is created on another GPU), and the reply is deferred to it while the worker
already takes the next step's calls.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import cloudpickle

from gpuexec import Worker


class Packed:
    """A value sent whole, pickled (see the module docstring).

    Plain ``pickle`` (its C fast path: a scheduler output is a deep graph of small
    objects, where cloudpickle's per-object hook costs most of the time), cloudpickle
    for what plain pickle cannot carry, and always when ``by_value`` (a callable of the
    engine's user, which may live in a script the worker cannot import).
    """

    __slots__ = ("by_value", "value")

    def __init__(self, value: Any, by_value: bool = False) -> None:
        self.value = value
        self.by_value = by_value

    def __reduce__(self) -> tuple[Callable[[bytes], Packed], tuple[bytes]]:
        blob = None
        if not self.by_value:
            try:
                blob = pickle.dumps(self.value, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:  # a lambda, a local class...: cloudpickle carries it
                blob = None
        if blob is None:
            blob = cloudpickle.dumps(self.value, protocol=pickle.HIGHEST_PROTOCOL)
        return (_unpack, (blob,))


def _unpack(blob: bytes) -> Packed:
    return Packed(pickle.loads(blob))


class VllmWorkerHost(Worker):
    """One vLLM worker inside a gpuexec worker process (started by ``VllmExecutor``)."""

    def __init__(self, vllm_config: Any, distributed_init_method: str, tp_size: int) -> None:
        from vllm.v1.worker.worker_base import WorkerWrapperBase

        # The per-rank keyword arguments vLLM's multiprocessing executor gives its workers
        # (one node: the local rank is the rank). No shared_worker_lock: it guards the
        # multi-modal receiver cache in shared memory, which needs a multiprocessing lock
        # inherited from the engine process (see the README's limits).
        kwargs: list[dict[str, Any]] = [{} for _ in range(self.world_size)]
        kwargs[self.rank] = {
            "vllm_config": vllm_config,
            "local_rank": self.local_rank,
            "rank": self.rank,
            "distributed_init_method": distributed_init_method,
            "is_driver_worker": self.rank % tp_size == 0,
        }
        wrapper = WorkerWrapperBase(rpc_rank=self.rank, global_rank=self.rank)
        self.wrapper = wrapper   # set before anything can fail: on_shutdown reads it
        wrapper.init_worker(kwargs)
        wrapper.init_device()
        wrapper.load_model()
        from vllm.platforms import current_platform

        update_block_size = getattr(current_platform, "update_block_size_for_backend", None)
        if update_block_size is not None:
            update_block_size(vllm_config)
        # One thread resolves AsyncModelRunnerOutputs, in call order (started on first use).
        self._outputs: ThreadPoolExecutor | None = None   # serving thread only
        try:
            from vllm.envs import enable_envs_cache
        except ImportError:
            pass
        else:
            enable_envs_cache()  # as vLLM's workers: no more env overrides from here on

    def vllm_call(self, call: Packed) -> Packed | Future[Packed]:
        """Run one vLLM call on the wrapper (see the module docstring)."""
        from vllm.v1.outputs import AsyncModelRunnerOutput

        method, args, kwargs = call.value
        if isinstance(method, str):
            fn = getattr(self.wrapper, method)
        else:
            fn = functools.partial(method, self.wrapper)
        out = fn(*args, **kwargs)
        if isinstance(out, AsyncModelRunnerOutput):
            return self._output_thread().submit(lambda: Packed(out.get_output()))
        return Packed(out)

    def _output_thread(self) -> ThreadPoolExecutor:
        if self._outputs is None:
            device = getattr(self.wrapper, "device", None)

            def bind_device() -> None:  # a new thread's current device is device 0
                if device is not None and getattr(device, "type", "cpu") != "cpu":
                    from vllm.platforms import current_platform

                    current_platform.set_device(device)

            self._outputs = ThreadPoolExecutor(1, thread_name_prefix="vllm-output",
                                               initializer=bind_device)
        return self._outputs

    def on_shutdown(self) -> None:
        """What vLLM's own worker process does on its way out: the worker's ``shutdown``,
        then its model-parallel groups and distributed environment."""
        from vllm.distributed import destroy_distributed_environment, destroy_model_parallel

        self.wrapper.shutdown()
        destroy_model_parallel()
        destroy_distributed_environment()
        if self._outputs is not None:
            self._outputs.shutdown(wait=False, cancel_futures=True)
