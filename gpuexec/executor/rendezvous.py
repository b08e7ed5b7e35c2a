"""Validating ``distributed_backend`` and choosing the rendezvous address, in the driver.

Every worker joins the torch.distributed default process group through the ``env://``
rendezvous: rank 0 hosts a TCP store on ``master_addr:master_port`` and the other ranks
connect to it (:mod:`gpuexec.worker.distributed`). This module settles those values
before any process starts, so that a bad one is a ``ConfigError`` with nothing to clean.

The free-port race, and why it is accepted: without ``master_port`` the driver binds
port 0 on ``master_addr``, reads the port the kernel chose and closes the socket; rank 0
binds it again a moment later. Another process may take the port in between. Keeping
the socket open and handing it to rank 0 would close the race, but torch's store binds
its own socket (it cannot adopt one across ``fork``, ``spawn`` and the zygote alike).
The window is a few hundred milliseconds on a fresh ephemeral port, and losing it is
not silent: rank 0 fails with "address already in use", which reaches the caller as
``WorkerStartupError`` naming rank 0 within ``distributed_timeout``, and a retry picks
another port. Callers that cannot accept even that pass an explicit ``master_port``.
"""

from __future__ import annotations

import socket

from ..errors import ConfigError, MissingDependencyError
from ..ipc.messages import DistributedSpec
from ..optional import torch_installed

BACKENDS = ("nccl", "gloo")
DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_DISTRIBUTED_TIMEOUT = 300.0
_RESERVED_ENV = ("MASTER_ADDR", "MASTER_PORT")


def free_port(addr: str) -> int:
    """A port the kernel considers free on ``addr`` now (see the module docstring)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])


def distributed_spec(backend: str | None, device: str, *, master_addr: str | None,
                     master_port: int | None, timeout: float,
                     env: dict[str, str]) -> DistributedSpec | None:
    """The settled rendezvous for ``backend`` on ``device`` ("cuda" or "cpu", resolved),
    or None without a backend; raises ``ConfigError`` for any bad value."""
    if backend is None:
        if master_addr is not None or master_port is not None:
            raise ConfigError("master_addr / master_port need distributed_backend "
                              "('nccl' or 'gloo')")
        return None
    if backend not in BACKENDS:
        raise ConfigError(f"unknown distributed_backend {backend!r}; expected "
                          f"{' or '.join(BACKENDS)} (or None)")
    if not torch_installed():
        raise MissingDependencyError(f"distributed_backend={backend!r}", "torch", "torch")
    if backend == "nccl" and device != "cuda":
        raise ConfigError("distributed_backend='nccl' needs CUDA workers, but the device is "
                          f"{device!r}; use 'gloo' on CPU")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise ConfigError(f"distributed_timeout must be a positive number of seconds, "
                          f"not {timeout!r}")
    clash = [k for k in _RESERVED_ENV if k in env]
    if clash:
        raise ConfigError(f"env sets {', '.join(clash)}, which distributed_backend sets from "
                          "master_addr / master_port: pass those instead")
    addr = DEFAULT_MASTER_ADDR if master_addr is None else master_addr
    if not isinstance(addr, str) or not addr.strip():
        raise ConfigError(f"master_addr must be a host name or address, not {master_addr!r}")
    if master_port is None:
        try:
            port = free_port(addr)
        except (OSError, UnicodeError) as e:
            raise ConfigError(f"cannot pick a free port on master_addr={addr!r} ({e}); it "
                              "must be an address of this host, or pass master_port") from e
    else:
        if not isinstance(master_port, int) or isinstance(master_port, bool) or \
                not 1 <= master_port <= 65535:
            raise ConfigError(f"master_port must be an integer in 1..65535, not "
                              f"{master_port!r}")
        port = master_port
    return DistributedSpec(backend, addr, port, float(timeout))
