"""Worker side: the process main loop, the Worker base class, device initialisation."""

from .base import Worker

__all__ = ["Worker"]
