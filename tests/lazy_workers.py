"""A module the test process never imports: its classes are checked only in workers."""

from gpuexec import Worker


class LazyWorker(Worker):
    def ping(self) -> str:
        return "lazy"
