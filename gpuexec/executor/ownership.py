"""An executor belongs to the process that built it.

A driver that forks after building an executor (a web server's worker processes,
``os.fork``, a ``multiprocessing`` fork child, a library that forks) gives the child a
copy of the executor object, of its sockets, of its mappings of the shared-memory rings
and of the zygote's socket. All of them are still the parent's: a call made in the child
would put a request in the parent's ring (and the parent would read the child's reply as
its own), and a shutdown in the child would stop the parent's workers. So in any
process other than its owner:

* every call raises :class:`~gpuexec.errors.ForeignProcessError` before it touches
  anything;
* ``shutdown()``, garbage collection and interpreter exit do nothing at all: no message
  is sent, no socket or ring is touched, no lock is taken (one may have been held by a
  thread of the parent at the moment of the fork), no file is removed;
* module-level state that points at the parent's processes (the registry of live
  executors, the zygotes) is dropped in the child by the ``after_in_child`` hooks of
  those modules, never closed.

The child is marked by an ``os.register_at_fork`` hook (a flag read on every call costs
nothing measurable); the process id is compared as well on the paths that would act on
the parent's resources (shutdown, collection, exit), which also covers a fork made by
native code that runs no Python fork hooks. ZeroMQ is left alone in the child: pyzmq
already makes ``close()`` and ``term()`` of a context or socket inherited through a fork
do nothing.
"""

from __future__ import annotations

import os
import weakref

from ..errors import ForeignProcessError


class Ownership:
    """The process an executor belongs to. ``foreign`` is set in forked children (by the
    fork hook, in the child's only thread) and read by any thread."""

    __slots__ = ("__weakref__", "foreign", "pid")

    def __init__(self) -> None:
        self.pid = os.getpid()   # the owner
        self.foreign = False     # True in a fork of the owner
        _owned.add(self)

    def check(self) -> None:
        """Raise :class:`ForeignProcessError` unless this is the owner's process."""
        if self.foreign:
            raise ForeignProcessError(self.pid, os.getpid())

    def here(self) -> bool:
        """True in the owner's process (the careful check, for shutdown and exit)."""
        return not self.foreign and os.getpid() == self.pid


_owned: weakref.WeakSet[Ownership] = weakref.WeakSet()


def _mark_foreign_in_child() -> None:
    global _owned
    for owner in list(_owned):
        owner.foreign = True
    _owned = weakref.WeakSet()  # a fresh set: the old one's state is the parent's


os.register_at_fork(after_in_child=_mark_foreign_in_child)
