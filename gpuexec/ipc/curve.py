"""ZeroMQ CURVE for ``tcp://``: per-executor keys, socket hardening, loopback binding.

On tcp anyone who can reach the port can connect, so every connection is encrypted and
authenticated with CURVE (CurveZMQ: Curve25519 keys, the server's key known to the
client in advance, the client's key checked by the server's ZAP handler)::

    driver (CurveServer)                           worker rank r
    server keypair + one client keypair per rank   (keys arrive in its WorkerSpec, over
    XPUB "req", PULL "rep": CURVE_SERVER,           the private start-up channel)
       bound to tcp://<host>:<random port>         SUB, PUSH: secure_client(), connect
    ZapHandler: accept only the ranks' public keys

Every executor makes fresh keys; nothing is written to disk. The driver is always the
CURVE server and binds; workers only connect, so the same module serves a backend
whose workers run elsewhere (a Ray actor connects over tcp with the keys it was given).
"""

from __future__ import annotations

import ipaddress

import msgspec
import zmq
from zmq.utils import z85

from .zap import ZapHandler, guard

WILDCARD_HOSTS = frozenset({"", "*", "0.0.0.0", "::", "[::]"})  # noqa: S104 - to refuse them


class CurveClient(msgspec.Struct, frozen=True):
    """What a worker needs to connect: the server's public key and its own keypair
    (Z85-encoded, as ``zmq.curve_keypair()`` makes them)."""

    server_public: bytes
    public: bytes
    secret: bytes


class CurveServer:
    """The driver's CURVE keys and authenticator for one executor.

    ``client(rank)`` gives the keys a worker connects with; ``secure(sock)`` makes a
    socket a CURVE server (before ``bind``); ``start()``/``stop()`` run the ZAP handler
    that accepts only the clients made here. ``denied`` counts refused connections.
    """

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], n_clients: int) -> None:
        self._public, self._secret = zmq.curve_keypair()
        self._clients = [zmq.curve_keypair() for _ in range(n_clients)]
        self._handler = ZapHandler(ctx, curve_keys=[z85.decode(pub) for pub, _ in self._clients])

    @property
    def handler(self) -> ZapHandler:
        return self._handler

    @property
    def denied(self) -> int:
        return self._handler.denied

    def client(self, rank: int) -> CurveClient:
        public, secret = self._clients[rank]
        return CurveClient(server_public=self._public, public=public, secret=secret)

    def secure(self, sock: zmq.Socket[bytes]) -> None:
        """CURVE server options and the ZAP domain; call before ``bind``."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self._secret)
        guard(sock)

    def start(self) -> None:
        self._handler.start()

    def stop(self) -> None:
        self._handler.stop()


def secure_client(sock: zmq.Socket[bytes], curve: CurveClient) -> None:
    """CURVE client options for a worker's socket; call before ``connect``. IPv6 is
    enabled too, so that a ``tcp://[v6 address]`` endpoint connects."""
    sock.setsockopt(zmq.IPV6, 1)
    sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret)


def check_host(host: str) -> str:
    """``host`` if it names one interface to bind; ``ValueError`` for wildcards.

    A wildcard (``0.0.0.0``, ``*``, ``::``) would expose the sockets on every network the
    machine is on, and is no address a worker can connect to either: give the address
    of the one interface the workers reach (``127.0.0.1`` for local workers).
    """
    if not isinstance(host, str) or host.strip() in WILDCARD_HOSTS:
        raise ValueError(f"host={host!r} would bind every interface; give the address of "
                         "the one interface the workers connect to (default 127.0.0.1)")
    return host.strip()


def bind_tcp(sock: zmq.Socket[bytes], host: str) -> str:
    """Bind ``sock`` to ``tcp://host:<a free port>`` and return that endpoint."""
    host = check_host(host)
    try:
        is_v6 = ipaddress.ip_address(host.strip("[]")).version == 6
    except ValueError:
        is_v6 = False  # a host or interface name
    if is_v6:
        sock.setsockopt(zmq.IPV6, 1)
        host = f"[{host.strip('[]')}]"
    port = sock.bind_to_random_port(f"tcp://{host}")
    return f"tcp://{host}:{port}"
