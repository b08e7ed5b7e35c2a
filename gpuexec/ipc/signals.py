"""Signals the driver sends a worker outside the request channel, one number per role.

A worker busy in a method reads no message until the method returns, so whatever must
reach it *during* a call (take the call back, say where every thread is) arrives as a
signal, sent to the worker's pid (pidfd where the driver holds one). Both numbers are
real-time signals: the kernel and the terminal never send them, torch, NCCL and Ray do
not use them, and an application's own SIGUSR1/SIGUSR2 handlers stay untouched.

===============  ==================  ==============================================
signal           handler (worker)    what it does
===============  ==================  ==============================================
STACKS_SIGNAL    faulthandler (C)    dump every thread's Python stack to the
                                     worker's stacks channel, also with the GIL held
CANCEL_SIGNAL    Python handler      interrupt the running call (if it is the one
                                     the driver named) at the next bytecode
ABORT_SIGNAL     a thread in         abort the torch.distributed group (respawn:
                 sigwait (only with  a collective blocked on a dead peer returns
                 distributed_backend) with an error; the Regroup message follows)
===============  ==================  ==============================================
"""

from __future__ import annotations

import signal

STACKS_SIGNAL: int = signal.SIGRTMIN + 4
CANCEL_SIGNAL: int = signal.SIGRTMIN + 5
ABORT_SIGNAL: int = signal.SIGRTMIN + 6
