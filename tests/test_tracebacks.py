"""A worker's traceback shows the driver's file, line and source line for code the driver
defined in ``__main__``: a script's class, a notebook-style cell, a lambda."""

from __future__ import annotations

import linecache
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import subprocess_env

from gpuexec import Executor, RemoteError

SCRIPT = '''
from gpuexec import Executor, Worker


class MyWorker(Worker):
    def forward(self, x):
        y = x * 2
        raise ValueError(f"forward failed on {y}")


if __name__ == "__main__":
    import os, sys
    with Executor(MyWorker, 1, device="cpu", start_method=sys.argv[1]) as ex:
        try:
            ex.collective_rpc("forward", args=(21,))
        except Exception as e:
            print(e.remote_traceback)
        try:
            ex.collective_rpc(lambda w: w.no_such_thing)
        except Exception as e:
            print(e.remote_traceback)
'''


@pytest.mark.parametrize("method", ["zygote", "spawn"])
def test_script_class_traceback_names_script_line_and_source(tmp_path: Path,
                                                             method: str) -> None:
    script = tmp_path / "serve.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, str(script), method], capture_output=True,
                       text=True, timeout=120, env=subprocess_env(), cwd="/")
    assert r.returncode == 0, r.stderr
    assert (f'  File "{script}", line 8, in forward\n'
            '    raise ValueError(f"forward failed on {y}")\n') in r.stdout
    assert "ValueError: forward failed on 42" in r.stdout
    assert (f'  File "{script}", line 19, in <lambda>\n'
            "    ex.collective_rpc(lambda w: w.no_such_thing)\n") in r.stdout


CELL = textwrap.dedent('''
    from gpuexec import Worker

    class CellWorker(Worker):
        def forward(self, x):
            return helper(x)

    def helper(x):
        raise KeyError(x)
''')


def test_notebook_cell_source_reaches_the_worker_traceback() -> None:
    """Code compiled from text whose lines only the driver's linecache holds (as IPython
    and Jupyter register each cell) shows them in the worker's traceback."""
    name = "<notebook-cell-7>"
    linecache.cache[name] = (len(CELL), None, CELL.splitlines(keepends=True), name)
    namespace: dict[str, object] = {"__name__": "__main__"}
    exec(compile(CELL, name, "exec"), namespace)
    with Executor(namespace["CellWorker"], 1, device="cpu") as ex:  # type: ignore[arg-type]
        with pytest.raises(RemoteError) as info:
            ex.collective_rpc("forward", args=("k",))
        tb = info.value.remote_traceback
        assert f'  File "{name}", line 6, in forward\n    return helper(x)\n' in tb
        assert f'  File "{name}", line 9, in helper\n    raise KeyError(x)\n' in tb
        # a callable from another cell: its lines travel with the call
        other = "<notebook-cell-8>"
        text = "probe = lambda w: w.missing\n"
        linecache.cache[other] = (len(text), None, [text], other)
        exec(compile(text, other, "exec"), namespace)
        with pytest.raises(RemoteError) as info:
            ex.collective_rpc(namespace["probe"])  # type: ignore[arg-type]
        assert (f'  File "{other}", line 1, in <lambda>\n    probe = lambda w: w.missing\n'
                in info.value.remote_traceback)
