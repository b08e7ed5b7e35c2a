"""The driver's shared-memory path to its workers (``transport="shm"``).

Requests: one broadcast ring, written once whatever the world size; every worker reads
every packet and skips those not addressed to it. Replies: one ring per worker (its only
writer) and a doorbell that every worker rings after a reply, on which the driver sleeps
once it has spun ``spin`` seconds in vain. A message too big for a slot goes by ZeroMQ
and a marker takes its place in the ring, which keeps the order. The segments are
anonymous memory files created here (see :class:`gpuexec.ipc.memfile.MemFile`), which
workers open through this process's /proc entry until every worker has mapped them;
nothing is ever named in /dev/shm, so no crash of any process, even during start-up, can
leave one behind.
"""

from __future__ import annotations

import os

from ..ipc.doorbell import Doorbell
from ..ipc.messages import ShmSpec
from ..ipc.shm_ring import RingReader, RingWriter, segment_size

REQUEST_SLOTS = 8
REPLY_SLOTS = 4
SLOT_SIZE = 1 << 20
DRIVER_SPIN_S = 2e-3    # the driver, only while a call is in flight
WORKER_SPIN_S = 100e-6  # a worker, after each request (an idle worker sleeps)


def shm_bytes_needed(world_size: int) -> int:
    return segment_size(REQUEST_SLOTS, SLOT_SIZE, world_size) + \
        world_size * segment_size(REPLY_SLOTS, SLOT_SIZE, 1) + Doorbell.SIZE


def shm_room(world_size: int) -> str:
    """"" when shared memory can hold the rings twice over, else why not."""
    if not hasattr(os, "memfd_create"):
        return "os.memfd_create is not available"
    try:
        os.close(os.memfd_create("gpuexec-probe", os.MFD_CLOEXEC))
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) << 10 for line in f
                             if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError) as e:
        return f"shared memory is not usable ({e})"
    need = 2 * shm_bytes_needed(world_size)
    if available < need:
        return f"{available >> 20} MiB of memory available, the rings need {need >> 20} MiB"
    return ""


class ShmDriverPath:
    """The rings and the doorbell, from the driver's side."""

    def __init__(self, world_size: int, spin: float | None = None) -> None:
        # Spinning pays only with a core for every spinner: on a host with no more cores
        # than the driver and its workers, a spinner would take the core a worker needs.
        roomy = (os.cpu_count() or 1) >= world_size + 1
        if spin is None:
            spin = DRIVER_SPIN_S if roomy else 0.0
        self.worker_spin = WORKER_SPIN_S if roomy else 0.0
        self.request = RingWriter(world_size, n_slots=REQUEST_SLOTS, slot_size=SLOT_SIZE)
        self.doorbell = Doorbell.create()
        self.replies: list[RingReader] = []
        self._reply_writers: list[RingWriter] = []  # detached: the paths workers attach to
        try:
            for _ in range(world_size):
                writer = RingWriter(1, n_slots=REPLY_SLOTS, slot_size=SLOT_SIZE)
                self._reply_writers.append(writer)
                self.replies.append(RingReader(writer.spec, 0, spin=spin))
                writer.detach()  # the worker becomes its writer
        except BaseException:
            self.close()
            raise
        self.spin = spin

    def spec_for(self, rank: int) -> ShmSpec:
        return ShmSpec(self.request.spec, self._reply_writers[rank].spec, self.doorbell.path,
                       self.worker_spin)

    def unlink(self) -> None:
        """Every worker has mapped the segments: give up their paths."""
        self.request.unlink()
        self.doorbell.unlink()
        for writer in self._reply_writers:
            writer.unlink()

    def ready_reply(self) -> bool:
        return any(r.poll() for r in self.replies)

    def close(self) -> None:
        self.unlink()
        for r in self.replies:
            r.close()
        self.request.close()
        self.doorbell.close()
