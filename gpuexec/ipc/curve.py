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
import socket

import msgspec
import zmq
from zmq.utils import z85

from ..errors import ConfigError
from .zap import ZapHandler, guard


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
    """The address to bind for ``host`` if it names one interface; ``ValueError`` else.

    A wildcard would expose the sockets on every network the machine is on, and is no
    address a worker can connect to either: give the address of the one interface the
    workers reach (``127.0.0.1`` for local workers). What counts is the address ``host``
    resolves to, not its spelling: ``0``, ``0x0``, ``000.000.000.000``, ``::0``,
    ``[0::0]`` and ``::ffff:0.0.0.0`` are all the unspecified address and all refused. A
    name is resolved here, once, and the address found is what is bound (the check and
    the bind agree); the name of a local network interface (``lo``, ``eth0``) is left to
    ZeroMQ, which binds that one interface.
    """
    if type(host) is not str:
        raise ValueError(f"host must be a str (an address, a host name or an interface "
                         f"name), not {type(host).__name__}")
    name = host.strip()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name in ("", "*"):
        raise _wildcard(host)
    try:
        literal: ipaddress.IPv4Address | ipaddress.IPv6Address | None = \
            ipaddress.ip_address(name)
    except ValueError:
        literal = None
    if literal is not None:
        found = [literal]
    elif name in _interface_names():
        return name
    else:
        try:
            infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            raise ValueError(f"host={host!r} does not resolve to an address to bind: "
                             f"{e}") from None
        found = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        if not found:
            raise ValueError(f"host={host!r} resolves to no address to bind")
    for address in found:
        mapped = getattr(address, "ipv4_mapped", None)
        if address.is_unspecified or (mapped is not None and mapped.is_unspecified):
            raise _wildcard(host)
    return str(found[0]) if literal is None else name


def _wildcard(host: str) -> ValueError:
    return ValueError(f"host={host!r} would bind every interface; give the address of "
                      "the one interface the workers connect to (default 127.0.0.1)")


def _interface_names() -> set[str]:
    try:
        return {name for _, name in socket.if_nameindex()}
    except OSError:
        return set()


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
    try:
        port = sock.bind_to_random_port(f"tcp://{host}")
    except zmq.ZMQError as e:  # an address of no interface here, an unknown interface
        raise ConfigError(f"host={host!r} cannot be bound: {e}") from None
    return f"tcp://{host}:{port}"
