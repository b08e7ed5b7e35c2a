"""What workers print reaches the driver's stdout whole, once and prefixed: to a file, a
pipe and a terminal, at a high rate, with partial writes, ``\\r`` and long lines."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

LINES = 500
WORLD = 4
PRINTER = f'''
import sys
from gpuexec import Executor, Worker

def chatter(w):
    for i in range({LINES}):
        if i % 50 == 7:
            print("part a of line", i, "from rank", w.rank, end="", flush=True)
            sys.stdout.write(" and part b\\n")
        elif i % 50 == 9:
            print("progress", i, "from rank", w.rank, "x" * 6000)
        elif i % 50 == 11:
            sys.stdout.write("bar 1 of line %d from rank %d\\rbar 2 of line %d from rank %d\\r\\n"
                             % (i, w.rank, i, w.rank))
        else:
            print("line", i, "from rank", w.rank)
    print("unfinished from rank", w.rank, end="")
    return __import__("os").getpid()

with Executor(Worker, {WORLD}, device="cpu") as ex:
    pids = ex.collective_rpc(chatter)
print("PIDS", *pids, flush=True)
'''


def _expected(rank: int) -> list[str]:
    out = []
    for i in range(LINES):
        if i % 50 == 7:
            out.append(f"part a of line {i} from rank {rank} and part b")
        elif i % 50 == 9:
            out.append(f"progress {i} from rank {rank} " + "x" * 6000)
        elif i % 50 == 11:
            out += [f"bar 1 of line {i} from rank {rank}", f"bar 2 of line {i} from rank {rank}"]
        else:
            out.append(f"line {i} from rank {rank}")
    return [*out, f"unfinished from rank {rank}"]


def _check(raw: bytes) -> None:
    lines = re.split(r"\r\n|\n|\r", raw.decode())
    assert lines[-1] == ""
    pids = lines[-2].split()
    assert pids[0] == "PIDS", lines[-5:]
    got: dict[int, list[str]] = {r: [] for r in range(WORLD)}
    for line in lines[:-2]:
        m = re.fullmatch(r"\(rank (\d) pid (\d+)\) (.*)", line)
        assert m, f"not a whole prefixed line: {line[:200]!r}"
        rank = int(m.group(1))
        assert m.group(2) == pids[1 + rank]
        got[rank].append(m.group(3))
    for rank in range(WORLD):
        assert got[rank] == _expected(rank)


def _run(stdout: int) -> None:
    subprocess.run([sys.executable, "-c", PRINTER], stdout=stdout, timeout=120,
                   check=True, env=subprocess_env())


def test_lines_reach_a_file_whole(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    with out.open("wb") as f:
        _run(f.fileno())
    _check(out.read_bytes())


def test_lines_reach_a_pipe_whole() -> None:
    r = subprocess.run([sys.executable, "-c", PRINTER], stdout=subprocess.PIPE, timeout=120,
                       check=True, env=subprocess_env())
    _check(r.stdout)


def test_lines_reach_a_small_non_blocking_pipe_whole() -> None:
    """Someone made the driver's stdout non-blocking (it is shared with the workers) and
    the pipe holds less than one long line: workers wait for room as they would on a
    blocking pipe; nothing is lost or cut."""
    script = ("import fcntl, os\nfcntl.fcntl(1, fcntl.F_SETPIPE_SZ, 4096)\n"
              "os.set_blocking(1, False)\n"
              + PRINTER.replace('print("PIDS"', 'os.set_blocking(1, True); print("PIDS"'))
    r = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE, timeout=120,
                       check=True, env=subprocess_env())
    _check(r.stdout)


@pytest.mark.skipif(not hasattr(pty, "openpty"), reason="no pseudo-terminals")
def test_lines_reach_a_terminal_whole() -> None:
    leader, follower = pty.openpty()
    attrs = __import__("termios").tcgetattr(follower)
    attrs[1] &= ~__import__("termios").ONLCR  # keep \n as written
    __import__("termios").tcsetattr(follower, __import__("termios").TCSANOW, attrs)
    proc = subprocess.Popen([sys.executable, "-c", PRINTER], stdout=follower,
                            env=subprocess_env())
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: every writer has closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(timeout=120) == 0
    _check(b"".join(chunks))
