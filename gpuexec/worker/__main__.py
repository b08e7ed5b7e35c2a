"""``python -m gpuexec.worker``: a worker in a fresh interpreter (start_method "subprocess").

The encoded :class:`~gpuexec.ipc.messages.WorkerSpec` arrives on stdin, which is then
pointed at /dev/null. The user's ``__main__`` is never imported: the worker class comes
by import path or by value (cloudpickle).
"""

import os
import sys

from .process import run_worker


def main() -> None:
    spec = sys.stdin.buffer.read()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    run_worker(spec)


if __name__ == "__main__":
    main()
