"""Source lines that travel with code pickled by value, so that a worker's traceback
shows them.

A class or function defined in the driver's ``__main__`` (a script, a notebook cell,
code compiled from a string) reaches a worker by value (cloudpickle). Its code keeps the
driver's file name and line numbers, but a worker formats a traceback from *its*
``linecache``, which cannot read a notebook cell or compiled text, nor a script on
another host or one changed since. So :func:`dumps` sends, with the pickle, the lines the
driver's ``linecache`` has for that code (only the lines of the code's own functions), and
unpickling puts them into the worker's ``linecache`` where it has none of its own for that
file: a remote traceback then reads ``File "/path/to/script.py", line 12, in forward``
followed by the source line, as for a class imported from a module.
"""

from __future__ import annotations

import linecache
import types
from typing import Any

import cloudpickle

# file name -> (first line number, the lines from there): what one pickle carries.
Sources = dict[str, tuple[int, list[str]]]


class _Carried:
    """``obj`` whose pickle also carries ``sources``; it unpickles as ``obj`` itself."""

    def __init__(self, obj: object, sources: Sources) -> None:
        self.obj = obj
        self.sources = sources

    def __reduce__(self) -> tuple[Any, tuple[Sources, object]]:
        return (_restore, (self.sources, self.obj))


def dumps(obj: object) -> bytes:
    """``cloudpickle.dumps(obj)``, with the source lines of the code it carries by value."""
    try:
        sources = _sources(obj)
    except Exception:  # a traceback's comfort: never a reason for a call to fail
        sources = {}
    blob: bytes = cloudpickle.dumps(_Carried(obj, sources) if sources else obj)
    return blob


def _restore(sources: Sources, obj: object) -> object:
    for filename, (first, lines) in sources.items():
        entry = linecache.cache.get(filename)
        if entry is None and linecache.getlines(filename):
            continue  # this host reads the file itself
        entry = linecache.cache.get(filename)
        known = list(entry[2]) if entry is not None and len(entry) == 4 else []
        start = first - 1
        if len(known) < start + len(lines):
            known.extend("\n" for _ in range(start + len(lines) - len(known)))
        known[start:start + len(lines)] = lines
        # mtime None: linecache.checkcache keeps the entry (there is no file to compare)
        linecache.cache[filename] = (sum(map(len, known)), None, known, filename)
    return obj


def _sources(obj: object) -> Sources:
    spans: dict[str, tuple[int, int]] = {}
    for code in _codes(obj, set()):
        lines = [n for _, _, n in code.co_lines() if n is not None] + [code.co_firstlineno]
        lo, hi = spans.get(code.co_filename, (min(lines), max(lines)))
        spans[code.co_filename] = (min(lo, *lines), max(hi, *lines))
    out: Sources = {}
    for filename, (lo, hi) in spans.items():
        text = linecache.getlines(filename)
        if len(text) >= hi:
            out[filename] = (lo, text[lo - 1:hi])
    return out


def _codes(obj: object, seen: set[int]) -> list[types.CodeType]:
    """The code objects ``obj`` carries by value: a function's (and those nested in it, and
    of the functions and classes of ``__main__`` it uses), a class's methods', also of its
    bases defined outside an importable module."""
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, (staticmethod, classmethod)):
        return _codes(obj.__func__, seen)
    if isinstance(obj, property):
        return [c for f in (obj.fget, obj.fset, obj.fdel) for c in _codes(f, seen)]
    if isinstance(obj, types.MethodType):
        return _codes(obj.__func__, seen)
    if isinstance(obj, types.FunctionType):
        codes = _nested(obj.__code__)
        # what it calls by a global name that is pickled by value along with it
        names = {n for c in codes for n in c.co_names}
        used = [obj.__globals__.get(n) for n in sorted(names)]
        return codes + [c for g in used if _by_value(g) for c in _codes(g, seen)]
    if isinstance(obj, type):
        found = [c for v in vars(obj).values() for c in _codes(v, seen)]
        for base in obj.__mro__[1:]:
            if _by_value(base):
                found += _codes(base, seen)
        return found
    return []


def _by_value(obj: object) -> bool:
    """Whether cloudpickle carries ``obj`` (a function or class) by value."""
    return isinstance(obj, (type, types.FunctionType)) and (
        obj.__module__ == "__main__" or "<locals>" in obj.__qualname__)


def _nested(code: types.CodeType) -> list[types.CodeType]:
    out = [code]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out += _nested(const)
    return out
