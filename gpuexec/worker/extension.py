"""Worker extensions: a mixin class composed over the worker class in the worker.

``Executor(worker_cls, worker_extension_cls=Ext)`` runs ``type(name, (Ext, worker_cls),
{})`` in each worker, after both were imported (after the device was selected), so an
engine can add methods (``collective_rpc("ext_method")``) to a worker class it does not
own. The extension must not *replace* anything: a name it defines that the worker class
already has (its own methods, or ``rank``, ``device``, ``init_device``... from
:class:`~gpuexec.Worker`) is a clash, and so is an ``__init__`` (the worker class's
``__init__`` takes ``worker_args``).

The rule lives here, free of any state, because both sides apply it: the driver's
config checks it before any process starts when both classes are given as class
objects (a ``ConfigError``); when either is a ``"module:Class"`` string it is imported
only in the workers, which check it there (a ``WorkerStartupError``).
"""

from __future__ import annotations

_CLASS_MACHINERY = frozenset({
    "__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__annotations__",
    "__firstlineno__", "__static_attributes__", "__orig_bases__", "__parameters__",
})


def extension_clashes(worker_cls: type, extension: type) -> list[str]:
    """Names the extension defines that the worker class already has (sorted)."""
    shared = set(worker_cls.__mro__)
    defined: set[str] = set()
    for klass in extension.__mro__:
        if klass is object or klass in shared:
            continue
        defined.update(n for n in vars(klass) if n not in _CLASS_MACHINERY)
    return sorted(n for n in defined
                  if n == "__init__" or (not n.startswith("__") and hasattr(worker_cls, n)))


def check_extension(worker_cls: type, extension: type) -> None:
    """Raise ``TypeError`` naming every clash between ``extension`` and ``worker_cls``."""
    if not isinstance(extension, type):
        raise TypeError(f"worker_extension_cls must be a class, not {extension!r}")
    clashes = extension_clashes(worker_cls, extension)
    if clashes:
        raise TypeError(
            f"worker_extension_cls {extension.__qualname__} defines {', '.join(clashes)}, "
            f"which {worker_cls.__qualname__} already has: an extension may only add "
            "methods (rename them, or subclass the worker class instead)")


def compose(worker_cls: type, extension: type) -> type:
    """The class the worker hosts: a subclass of ``(extension, worker_cls)``."""
    check_extension(worker_cls, extension)
    return type(worker_cls.__name__, (extension, worker_cls),
                {"__module__": worker_cls.__module__,
                 "__qualname__": worker_cls.__qualname__,
                 "__doc__": worker_cls.__doc__})
