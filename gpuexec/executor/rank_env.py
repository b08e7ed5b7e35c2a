"""Per-rank environments: what ``Executor(env=...)`` accepts, settled before any start.

``env`` is one of

* a mapping ``{name: value}``: the same variables for every rank;
* a sequence of ``world_size`` mappings: rank ``r`` gets ``env[r]``;
* a callable ``env(rank) -> mapping``: called here, once per rank, in the driver, when
  the executor is built (never in a worker), so what it returns is checked like the
  others and a bad value is a ``ConfigError`` before any process starts.

Per-rank values are what CPU thread binding (``OMP_NUM_THREADS``, ``KMP_AFFINITY``, an
engine's own "bind these cores" variable) and NUMA placement need: every rank must get
different cores. Names and values must be ``str`` (a name non-empty, without ``=`` or
NUL; a value without NUL): ``os.environ`` refuses the rest, and a worker that fails to
start over it would fail far from the mistake.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from ..errors import ConfigError

EnvArg = Mapping[str, str] | Sequence[Mapping[str, str]] | Callable[[int], Mapping[str, str]]


def _checked(entries: object, where: str) -> dict[str, str]:
    """``entries`` as a plain ``dict[str, str]``, or a ``ConfigError`` naming ``where``
    (the rank) and the key. Names and values must be exact ``str`` (a ``numpy.str_`` or
    another subclass is refused rather than converted: its ``str()`` may not be what
    was meant) that encode as UTF-8 (a lone surrogate cannot be put in an environment)."""
    if not isinstance(entries, Mapping):
        raise ConfigError(f"{where} must be a mapping of str -> str, not "
                          f"{type(entries).__name__}")
    out: dict[str, str] = {}
    try:
        items = list(entries.items())
    except Exception as e:
        raise ConfigError(f"{where} ({_rank(where)}): reading its entries raised "
                          f"{type(e).__name__}: {e}") from e
    for k, v in items:
        if type(k) is not str or not k or "=" in k or "\0" in k or not _utf8(k):
            raise ConfigError(f"{where} entries must be str -> str ({_rank(where)}): the "
                              f"name {_show(k)} is not a non-empty str without '=', NUL "
                              "or lone surrogates")
        if type(v) is not str or "\0" in v or not _utf8(v):
            raise ConfigError(f"{where} entries must be str -> str ({_rank(where)}): "
                              f"{k!r} has the value {_show(v)}, not a str without NUL or "
                              "lone surrogates (convert it with str() if that is what "
                              "you mean)")
        out[k] = v
    return out


def _rank(where: str) -> str:
    """Which rank an entry is for: ``env[2]`` and ``env(2)`` name one, ``env`` all."""
    return "every rank" if where == "env" else f"rank {where[4:-1]}"


def _utf8(s: str) -> bool:
    try:
        s.encode()
    except UnicodeEncodeError:
        return False
    return True


def _show(v: object) -> str:
    """``v`` for a message: its repr (ASCII, so a lone surrogate prints) and its type."""
    try:
        text = ascii(v)
    except Exception:
        text = "<unprintable>"
    return f"{text[:60]} ({type(v).__module__}.{type(v).__qualname__})"


def rank_environments(env: EnvArg | None, world_size: int) -> tuple[dict[str, str], ...]:
    """One checked environment per rank (see the module docstring for the forms)."""
    if env is None:
        return tuple({} for _ in range(world_size))
    if isinstance(env, Mapping):
        shared = _checked(env, "env")
        return tuple(dict(shared) for _ in range(world_size))
    if callable(env):
        envs = []
        for rank in range(world_size):
            try:
                entries = env(rank)
            except Exception as e:
                raise ConfigError(f"env({rank}) raised {type(e).__name__}: {e}") from e
            envs.append(_checked(entries, f"env({rank})"))
        return tuple(envs)
    if isinstance(env, (str, bytes)) or not isinstance(env, Sequence):
        raise ConfigError("env must be a mapping, a sequence of one mapping per rank or a "
                          f"callable rank -> mapping, not {type(env).__name__}")
    if len(env) != world_size:
        raise ConfigError(f"env has {len(env)} entries but world_size is {world_size}: "
                          "give one mapping per rank")
    return tuple(_checked(e, f"env[{rank}]") for rank, e in enumerate(env))
