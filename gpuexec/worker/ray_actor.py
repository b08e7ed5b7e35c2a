"""The class a Ray actor runs a gpuexec worker in (``Executor(..., backend="ray")``).

Ray starts the actor process, places it on a node with the resources of its bundle and
sets ``CUDA_VISIBLE_DEVICES`` to the GPU it was given; this class then runs the same
worker main loop as every other start method (:func:`gpuexec.worker.process.run_worker`):
``init_device``, the user's class, the request loop over ZeroMQ (tcp + CURVE). The spec,
with the CURVE keys, arrives as the argument of :meth:`serve`, through Ray's own
authenticated channel, never through the tcp sockets.

It does not import ray: the driver wraps it with ``ray.remote`` (the worker room never
depends on the executor's backends).
"""

from __future__ import annotations

import os

from .process import run_worker


class RayWorkerActor:
    """One worker rank inside a Ray actor."""

    def where(self) -> tuple[int, str]:
        """The actor's pid and the ``CUDA_VISIBLE_DEVICES`` Ray gave it ("" for none)."""
        return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES", "")

    def serve(self, spec: bytes) -> None:
        """Run the worker until the driver's Shutdown (returns) or a start-up failure
        (the process exits after reporting it; Ray then reports the actor dead)."""
        run_worker(spec, own_process=False)  # Ray's process: no group, no guardian
