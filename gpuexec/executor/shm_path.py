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

A rank replaced in place (``Executor.respawn``), the protocol::

    driver (pump and send locks held, no call in flight: the executor is failed)
      1. request ring: reader ``rank`` is moved to the write position and marked awake
         (:meth:`RingWriter.skip_reader`): the new worker starts with the next packet
         published, never one meant for the dead worker, and a full ring no longer waits
         on the dead reader
      2. reply ring: what the dead worker's ring still holds is taken (late replies,
         dropped and counted; a BY_ZMQ marker with its message, so that no stray message
         is left for another ring's marker), the ring is dropped and a fresh one made,
         whose writer the new worker becomes (:meth:`ShmTransport.forget`)
      3. the new worker opens the request ring and the doorbell through the paths the
         driver kept open, attaches its reply ring, subscribes, runs ``__init__``, sends
         Ready; only then do calls flow again, so the first packet it reads is the first
         call after the respawn (or the Shutdown of a shutdown that interrupted it)

So that step 3 can open them, the request ring's and the doorbell's descriptors stay
open in the driver for the executor's life (reply rings' paths are given up as soon as
their worker has attached). They are anonymous memory files held by the driver alone,
so this costs nothing when the driver dies; only processes of the same user that may
read the driver's ``/proc`` entry could open them meanwhile (SECURITY.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

from ..ipc import ringcore
from ..ipc.codec import none_reply_parts
from ..ipc.doorbell import Doorbell
from ..ipc.messages import ShmSpec
from ..ipc.shm_ring import TAKEN_MAX, RingReader, RingWriter, segment_size

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
        self.replies: tuple[RingReader, ...] = ()  # rank order; see _bind_gather
        self._reply_writers: list[RingWriter] = []  # detached: the paths workers attach to
        try:
            for _ in range(world_size):
                writer = RingWriter(1, n_slots=REPLY_SLOTS, slot_size=SLOT_SIZE)
                self._reply_writers.append(writer)
                self.replies += (RingReader(writer.spec, 0, spin=spin),)
                writer.detach()  # the worker becomes its writer
        except BaseException:
            self.close()
            raise
        self.spin = spin
        # Each rank's None reply, as the bytes before and after its call id (known by
        # them on arrival: collect, and the driver's compiled round trip).
        self.reply_parts = tuple(none_reply_parts(rank) for rank in range(world_size))
        ringcore.announce()  # one line if the pure-Python core runs for want of a build
        self._bind_gather()

    def _bind_gather(self) -> None:
        """Bind :attr:`gather` and :attr:`epoch` to the reply rings and the doorbell (one
        C call per wait, no Python frame around it). The binding holds the rings'
        addresses: whoever replaces a reply ring in :attr:`replies` (a tuple, so that it
        cannot change unnoticed) calls this again before the next wait. (The compiled
        round trip's Lane, ``executor/_calltable.c``, binds the same rings itself and
        knows a new tuple by its identity.)"""
        core, bell = ringcore.current(), self.doorbell
        # gather(epoch, spin_until, sleep_until) -> mask: bit r set when rank r's reply
        # ring holds a reply; spins until ``spin_until``, then sleeps on the doorbell
        # until ``sleep_until``, or returns 0 at once when the doorbell is no longer at
        # ``epoch`` (see Doorbell.poke).
        views = tuple(r.address[0] for r in self.replies)
        bases = tuple(r.address[1] for r in self.replies)
        self.gather: Callable[[int, float, float], int] = partial(
            core.gather, views, bases, bell.view, bell.base)
        self.epoch: Callable[[], int] = partial(core.epoch, bell.view, bell.base)
        # collect(epoch, spin_until, sleep_until, id, want) -> (taken, framed, other,
        # frames): the same wait for the rings in the mask ``want``, taking from each the
        # None reply to the call whose msgpack-encoded id is ``id`` (known by its bytes,
        # see codec.none_reply_parts) as it comes, until each holds that or another
        # message (once its spin is over: until any holds another message, a failure
        # perhaps); then the other messages of one frame up to TAKEN_MAX are copied out
        # (``framed``, ``frames``), and ``other``: rings holding anything else, left in
        # place. None above 64 ranks (the core's limit): the caller gathers instead.
        self.collect: Callable[[int, float, float, bytes, int],
                               tuple[int, int, int, list[bytes] | tuple[()]]] | None = None
        if 0 < len(self.replies) <= 64:
            parts = self.reply_parts
            self.collect = partial(
                core.collect, views, bases, bell.view, bell.base, *self.replies[0].shape,
                TAKEN_MAX, tuple(p[0] for p in parts), tuple(p[1] for p in parts))

    def spec_for(self, rank: int) -> ShmSpec:
        return ShmSpec(self.request.spec, self._reply_writers[rank].spec, self.doorbell.path,
                       self.worker_spin)

    def unlink(self) -> None:
        """Every worker has mapped the segments: give up the reply rings' paths (the
        request ring's and the doorbell's stay open for a replacement worker)."""
        for writer in self._reply_writers:
            writer.unlink()

    def replace_rank(self, rank: int) -> ShmSpec:
        """Steps 1 and 2 of the module docstring's protocol (pump and send locks held);
        the spec the new worker of ``rank`` attaches with."""
        self.request.skip_reader(rank)
        writer = RingWriter(1, n_slots=REPLY_SLOTS, slot_size=SLOT_SIZE)
        try:
            reader = RingReader(writer.spec, 0, spin=self.spin)
        except BaseException:
            writer.close()
            raise
        writer.detach()
        old_reader = self.replies[rank]
        self.replies = (*self.replies[:rank], reader, *self.replies[rank + 1:])
        self._bind_gather()  # before the old ring is unmapped: the gather holds addresses
        old_writer, self._reply_writers[rank] = self._reply_writers[rank], writer
        old_reader.close()
        old_writer.unlink()
        return self.spec_for(rank)

    def close(self) -> None:
        self.unlink()
        self.request.unlink()
        self.doorbell.unlink()
        for r in self.replies:
            r.close()
        self.request.close()
        self.doorbell.close()
