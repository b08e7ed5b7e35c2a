"""Who may connect to the driver's sockets: a minimal ZeroMQ ZAP handler.

ZeroMQ asks the ZAP handler of a socket's context (a REP socket bound to
``inproc://zeromq.zap.01``) about every new connection to a socket that has a
``ZAP_DOMAIN``, before any message of that connection is delivered. A denied peer is
disconnected during the handshake: none of its frames reaches the application.

::

    peer connects ──▶ libzmq handshake ──▶ ZAP request ──▶ ZapHandler thread
                                              (domain, address, mechanism, credentials)
                       ◀── "200" (deliver its messages) or "400" (disconnect) ──┘

Two rules, one per transport:

* ``CURVE`` (tcp): the client's long-term public key must be one of the keys this
  executor generated for its own workers (the CURVE handshake has already proven the
  client holds the matching secret key).
* ``NULL`` on ``ipc://`` (Unix sockets): libzmq reports the peer's credentials from
  ``SO_PEERCRED`` as the address ``"<host>:<uid>:<gid>:<pid>"``; the peer must run as
  this user and be the driver itself or one of its descendants (its workers, the zygote
  or forkserver that forked them). The 0700 directory already keeps other users out;
  this check also keeps out other processes of the same user.

Anything else (another mechanism, a NULL peer on tcp, an unparsable address) is denied.

Why not ``zmq.auth.thread.ThreadAuthenticator``: it checks CURVE keys (through
``configure_curve_callback``) but cannot check the peer credentials of an ipc
connection, and it brings IP allow/deny lists, certificate directories and PLAIN
passwords that gpuexec never uses. This handler is one thread and one REP socket.

Fields: ``_keys``, ``_ipc_peer``: read-only after construction. ``allowed``/``denied``:
written by the handler thread only, read by anyone (ints, best effort).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Collection

import zmq

log = logging.getLogger("gpuexec")

DOMAIN = b"gpuexec"
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_MAX_ANCESTRY = 64  # a process tree deeper than this is not ours


def guard(sock: zmq.Socket[bytes]) -> None:
    """Make every connection to ``sock`` pass the context's ZAP handler (before bind)."""
    sock.setsockopt(zmq.ZAP_DOMAIN, DOMAIN)


def parent_pid(pid: int) -> int:
    """The parent of ``pid`` from ``/proc/<pid>/stat`` (0 when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split after the last ")".
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(fields[1])
    except (IndexError, ValueError):
        return 0


def is_descendant(pid: int, ancestor: int) -> bool:
    """True when ``pid`` is ``ancestor`` or one of its descendants (right now)."""
    for _ in range(_MAX_ANCESTRY):
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
        pid = parent_pid(pid)
    return False


def own_process_tree(uid: int, pid: int) -> bool:
    """The ipc rule: this user, and this process or one it started (at any depth)."""
    return uid == os.getuid() and is_descendant(pid, os.getpid())


class ZapHandler:
    """Answers the ZAP requests of one ZeroMQ context; see the module docstring.

    ``curve_keys``: the raw (32-byte) public keys of the CURVE clients to accept.
    ``ipc_peer``: ``(uid, pid) -> bool`` for NULL peers on ipc; None: deny them.
    """

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], *,
                 curve_keys: Collection[bytes] = (),
                 ipc_peer: Callable[[int, int], bool] | None = None) -> None:
        self._ctx = ctx
        self._keys = frozenset(curve_keys)
        self._ipc_peer = ipc_peer
        self.allowed = 0
        self.denied = 0
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._bound = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gpuexec-zap", daemon=True)

    def start(self) -> None:
        """Bind the handler; returns once it answers (call before binding the guarded
        sockets: without a handler, libzmq lets every peer in)."""
        self._thread.start()
        self._bound.wait()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Stop the thread and close its socket (before the context is terminated)."""
        if self._stop_w < 0:
            return
        if self._thread.is_alive():
            os.write(self._stop_w, b"x")
            self._thread.join()
        os.close(self._stop_w)
        os.close(self._stop_r)
        self._stop_w = self._stop_r = -1

    def _run(self) -> None:
        try:
            sock = self._ctx.socket(zmq.REP)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(_ZAP_ENDPOINT)
        except BaseException as e:
            self._error = e
            self._bound.set()
            return
        self._bound.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._stop_r, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if self._stop_r in ready:
                    return
                if sock in ready:
                    request = sock.recv_multipart()
                    sock.send_multipart(self._answer(request))
        finally:
            sock.close(linger=0)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6:  # libzmq never sends less; answer anyway to keep REP in step
            return [b"1.0", request[1] if len(request) > 1 else b"", b"400", b"bad", b"", b""]
        version, request_id, domain, address, _identity, mechanism = request[:6]
        ok = domain == DOMAIN and self._allows(address, mechanism, request[6:])
        if ok:
            self.allowed += 1
        else:
            self.denied += 1
            if self.denied == 1:
                log.warning("gpuexec: refused a connection (%s from %r); counting further ones",
                            mechanism.decode(errors="replace"),
                            address.decode(errors="replace"))
        return [version, request_id, b"200" if ok else b"400",
                b"OK" if ok else b"not a worker of this executor", b"", b""]

    def _allows(self, address: bytes, mechanism: bytes, credentials: list[bytes]) -> bool:
        if mechanism == b"CURVE":
            return len(credentials) == 1 and credentials[0] in self._keys
        if mechanism == b"NULL" and self._ipc_peer is not None:
            parts = address.rsplit(b":", 3)  # "<host>:uid:gid:pid" (SO_PEERCRED, ipc only)
            if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
                return False
            return self._ipc_peer(int(parts[1]), int(parts[3]))
        return False
