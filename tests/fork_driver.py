"""A driver that forks after building an executor (run by tests/test_fork_safety.py).

``python fork_driver.py <transport> <start_method>`` builds an executor, then, one after
the other: an ``os.fork`` child that tries every call, shuts down, drops the executor and
exits normally (atexit, finalizers); a ``multiprocessing`` fork child that does the same;
an ``os.fork`` child that builds and uses an executor of its own. After each child the
parent checks that its executor still gives the right answers from the same workers and
that its ipc directory is still there. Each process prints one JSON line per step:
``{"who": "child"|"parent", ...}``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import multiprocessing
import os
import sys
from typing import Any

from workers import EchoWorker

from gpuexec import Executor
from gpuexec.errors import ForeignProcessError


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def attempts(ex: Executor) -> dict[str, str]:
    """What each entry point does in a process that does not own ``ex``."""
    async def in_loop() -> Any:
        return await ex.collective_rpc_async("add", args=(100,))

    tries = {
        "collective_rpc": lambda: ex.collective_rpc("add", args=(100,)),
        "non_block": lambda: ex.collective_rpc("add", args=(100,), non_block=True),
        "async": lambda: asyncio.run(in_loop()),
        "check_health": lambda: ex.check_health(),
        "register_failure_callback": lambda: ex.register_failure_callback(lambda: None),
    }
    out = {}
    for name, attempt in tries.items():
        try:
            attempt()
            out[name] = "no error"
        except ForeignProcessError as e:
            ok = e.owner_pid != os.getpid() and e.pid == os.getpid() and "fork" in str(e)
            out[name] = "ForeignProcessError" if ok else f"bad error: {e}"
        except BaseException as e:  # reported to the test
            out[name] = f"{type(e).__name__}: {e}"
    return out


def use_in_child(ex: Executor, report: Any) -> None:
    """The child's part: every call refused; shutdown, collection and exit inert."""
    result = attempts(ex)
    ex.shutdown()
    del ex
    gc.collect()
    report(result)


def check_parent(ex: Executor, step: str, pids: list[int], ipc_dir: str, base: int) -> None:
    values = [ex.collective_rpc("add", args=(base + i,)) for i in range(20)]
    right = all(v == [base + i + r for r in range(ex.world_size)] for i, v in enumerate(values))
    ex.check_health(timeout=30)
    say(who="parent", step=step, right=right, same_workers=[w.pid for w in ex.workers] == pids,
        ipc_dir=os.path.isdir(ipc_dir))


def main() -> None:
    transport, method = sys.argv[1], sys.argv[2]
    options: dict[str, Any] = {"device": "cpu", "transport": transport,
                               "start_method": method}
    if method == "zygote":
        options["preload"] = ()
    ex = Executor(EchoWorker, 2, **options)
    pids = [w.pid for w in ex.workers]
    say(who="parent", step="start", pids=pids)
    ipc_dir = ex.endpoints[1].removeprefix("ipc://").rsplit("/", 1)[0]
    try:
        check_parent(ex, "before", pids, ipc_dir, 0)

        # 1. os.fork: use, shut down, collect, exit normally (SystemExit unwinds through
        # this function's finally: shutdown() runs again in the child).
        pid = os.fork()
        if pid == 0:
            use_in_child(ex, lambda r: say(who="child", kind="os.fork", attempts=r))
            sys.exit(0)
        _, status = os.waitpid(pid, 0)
        say(who="parent", step="os.fork child exited", status=os.waitstatus_to_exitcode(status))
        check_parent(ex, "after os.fork", pids, ipc_dir, 1000)

        # 2. a multiprocessing fork child (a Pool worker, a web server's worker).
        reader, writer = multiprocessing.get_context("fork").Pipe(duplex=False)
        child = multiprocessing.get_context("fork").Process(
            target=use_in_child, args=(ex, writer.send))
        child.start()
        attempts_seen = reader.recv()
        child.join()
        say(who="child", kind="multiprocessing", attempts=attempts_seen)
        say(who="parent", step="multiprocessing child exited", status=child.exitcode)
        check_parent(ex, "after multiprocessing", pids, ipc_dir, 2000)

        # 3. a child that builds its own executor (never the parent's zygote).
        pid = os.fork()
        if pid == 0:
            with Executor(EchoWorker, 1, **options) as own:
                say(who="child", kind="own executor",
                    value=own.collective_rpc("add", args=(7,)),
                    workers_are_new=not {w.pid for w in own.workers} & set(pids))
            sys.exit(0)
        _, status = os.waitpid(pid, 0)
        say(who="parent", step="own-executor child exited",
            status=os.waitstatus_to_exitcode(status))
        check_parent(ex, "after own-executor child", pids, ipc_dir, 3000)

        # The parent's start method still works (its zygote was not touched).
        with Executor(EchoWorker, 1, **options) as again:
            say(who="parent", step="new executor", value=again.collective_rpc("add", args=(5,)))
    finally:
        ex.shutdown()
    say(who="parent", step="shut down", ipc_dir=os.path.isdir(ipc_dir))


if __name__ == "__main__":
    main()
