"""Worker side: the process main loop, the Worker base class, device initialisation.

The driver's entry points into this room: :class:`Worker` (and :mod:`.base`),
:func:`extension_clashes` (the rule a ``worker_extension_cls`` must follow, checked by
the driver before any process starts), :func:`gpuexec.worker.process.run_worker` and
:class:`gpuexec.worker.ray_actor.RayWorkerActor` (a worker's main).
"""

from .base import Worker
from .cancel import uncancellable
from .extension import extension_clashes

__all__ = ["Worker", "extension_clashes", "uncancellable"]
