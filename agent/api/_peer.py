"""Who is on the other end of an API connection: the uid of a client process on this host.

Owns the identity that shared-memory regions belong to (``agent.api.shm``): a Unix-socket peer's
uid from ``SO_PEERCRED``; a TCP peer's uid from the kernel's record of the client's end of the
connection, which exists only when the client is on this host: asked by its exact address pair
through the sock_diag netlink interface (about 20 us), or found in ``/proc/net/tcp[6]`` where
netlink is not allowed (milliseconds). A peer whose end the kernel does not know is on another
host (or in another network namespace) and has no uid here. Auth (the bearer token) is left to the
transports; this module only says who connected.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

__all__ = ["Peer", "peer_of_address", "peer_of_grpc", "peer_of_socket", "socket_uid"]

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# sock_diag (linux/sock_diag.h, linux/inet_diag.h)
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 1
_NLMSG_HEADER = struct.Struct("=IHHII")
_DIAG_UID_AT = 4 + 48 + 12  # inet_diag_msg: 4 bytes, inet_diag_sockid, expires/rqueue/wqueue


@dataclass(frozen=True, slots=True)
class Peer:
    """A connected client: ``uid`` is None when it is not a process on this host."""

    uid: int | None
    how: str  # "unix", "tcp", or why the uid is unknown

    @property
    def owner(self) -> str | None:
        """The name its shared-memory regions are registered under."""
        return None if self.uid is None else f"uid:{self.uid}"


UNKNOWN = Peer(None, "unknown peer")


def _hex_address(host: str, port: int) -> tuple[str, str]:
    """(``/proc/net/tcp`` form, ``/proc/net/tcp6`` form) of an address: each 32-bit word of
    the address as the kernel prints it (host byte order), then the port."""
    host = host.split("%", 1)[0]
    if ":" in host:
        raw = socket.inet_pton(socket.AF_INET6, host)
        v6 = "".join(f"{w:08X}" for w in struct.unpack("=4I", raw))
        v4 = ""
        if raw[:12] == b"\0" * 10 + b"\xff\xff":  # an IPv4 client on an IPv6 socket
            v4 = f"{struct.unpack('=I', raw[12:])[0]:08X}:{port:04X}"
        return v4, f"{v6}:{port:04X}"
    raw = socket.inet_aton(host)
    word = struct.unpack("=I", raw)[0]
    mapped = struct.unpack("=4I", b"\0" * 10 + b"\xff\xff" + raw)
    return f"{word:08X}:{port:04X}", "".join(f"{w:08X}" for w in mapped) + f":{port:04X}"


def socket_uid(
    table: str, local: str, remote: str | None, *, remote_port: int | None = None
) -> int | None:
    """The uid of the socket whose local end is ``local`` and whose remote end is ``remote``
    (or any address on ``remote_port``) in one ``/proc/net/tcp*`` table's text."""
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8 or fields[1] != local:
            continue
        far = fields[2]
        if remote is not None and far != remote:
            continue
        if remote_port is not None and not far.endswith(f":{remote_port:04X}"):
            continue
        try:
            return int(fields[7])
        except ValueError:
            return None
    return None


def _packed(family: int, host: str) -> bytes:
    return socket.inet_pton(family, host).ljust(16, b"\0")


def diag_uid(client: tuple[str, int], server: tuple[str, int]) -> int | None:
    """The uid of the socket whose local end is ``client`` and remote end ``server``, asked of
    the kernel through sock_diag; None when there is none. ``OSError`` where netlink is denied."""
    host, far = client[0].split("%", 1)[0], server[0].split("%", 1)[0]
    mapped = "::ffff:"
    if host.startswith(mapped) and "." in host:  # an IPv4 client of an IPv6 listener
        host = host[len(mapped) :]
        far = far[len(mapped) :] if far.startswith(mapped) else far
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if (":" in far) != (family == socket.AF_INET6):
        return None
    sockid = struct.pack(
        "!HH16s16s", client[1], server[1], _packed(family, host), _packed(family, far)
    ) + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)  # any interface, no cookie
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    header = _NLMSG_HEADER.pack(
        _NLMSG_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0
    )
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(1.0)
        sock.sendto(header + request, (0, 0))
        reply = sock.recv(8192)
    _length, kind, _flags, _seq, _pid = _NLMSG_HEADER.unpack_from(reply)
    if kind == _NLMSG_ERROR:
        return None
    if kind != _SOCK_DIAG_BY_FAMILY or len(reply) < _NLMSG_HEADER.size + _DIAG_UID_AT + 4:
        return None
    (uid,) = struct.unpack_from("=I", reply, _NLMSG_HEADER.size + _DIAG_UID_AT)
    return int(uid)


def peer_of_address(
    client: tuple[str, int],
    server: tuple[str, int] | None,
    *,
    server_port: int | None = None,
    proc: Path = Path("/proc"),
) -> Peer:
    """The peer of a TCP connection from ``client`` to ``server`` (or to ``server_port`` on
    an address of this host: a local client connects from the address it connects to)."""
    try:
        uid = diag_uid(client, server or (client[0], server_port or 0))
    except (OSError, ValueError, struct.error):
        pass  # netlink denied here: read the socket tables instead
    else:
        if uid is not None:
            return Peer(uid, "tcp")
        if server is not None:
            return Peer(None, "the client is not a process on this host")
    try:
        v4, v6 = _hex_address(*client)
        far = _hex_address(*server) if server is not None else None
    except (OSError, ValueError, struct.error):
        return Peer(None, f"unparsable client address {client!r}")
    port = server[1] if server is not None else server_port
    for table_name, local, remote in (
        ("net/tcp", v4, far[0] if far else None),
        ("net/tcp6", v6, far[1] if far else None),
    ):
        if not local:
            continue
        try:
            table = (proc / table_name).read_text(encoding="ascii")
        except OSError:
            continue
        uid = socket_uid(table, local, remote or None, remote_port=port)
        if uid is not None:
            return Peer(uid, "tcp")
    return Peer(None, "the client is not a process on this host")


def peer_of_grpc(peer: str, server_port: int) -> Peer:
    """The peer of a gRPC call from ``context.peer()`` (``ipv4:127.0.0.1:5000``,
    ``ipv6:[::1]:5000``)."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6") or ":" not in rest:
        return Peer(None, f"unsupported gRPC peer {peer!r}")
    host, _, port = rest.rpartition(":")
    try:
        return peer_of_address((host.strip("[]"), int(port)), None, server_port=server_port)
    except ValueError:
        return Peer(None, f"unparsable gRPC peer {peer!r}")


def peer_of_socket(sock: Any) -> Peer:
    """The peer of a connected socket (a ``socket.socket`` or uvloop's pseudo-socket)."""
    try:
        family = sock.family
        if family == socket.AF_UNIX:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            _pid, uid, _gid = _PEERCRED.unpack(raw)
            return Peer(uid, "unix")
        if family in (socket.AF_INET, socket.AF_INET6):
            client = sock.getpeername()
            server = sock.getsockname()
            return peer_of_address((client[0], client[1]), (server[0], server[1]))
    except (OSError, AttributeError, struct.error) as exc:
        return Peer(None, f"cannot read the peer: {exc}")
    return Peer(None, f"unsupported socket family {family!r}")


PEER_SCOPE_KEY = "edgefleet.peer"  # in an HTTP request's ASGI scope: a callable -> Peer


class _ConnectionPeer:
    """The peer of one HTTP connection, read on first use and kept for the connection's life."""

    __slots__ = ("_peer", "_transport")

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._peer: Peer | None = None

    def __call__(self) -> Peer:
        if self._peer is None:
            sock = self._transport.get_extra_info("socket")
            self._peer = UNKNOWN if sock is None else peer_of_socket(sock)
        return self._peer


def http_protocol_with_peer() -> type[Any]:
    """uvicorn's HTTP protocol, with each request's scope carrying its connection's peer under
    ``PEER_SCOPE_KEY`` (uvicorn leaves a Unix-socket client out of ``scope["client"]``)."""
    base: type[Any]
    try:
        from uvicorn.protocols.http import httptools_impl

        base = httptools_impl.HttpToolsProtocol
    except ImportError:  # httptools is optional for uvicorn
        from uvicorn.protocols.http import h11_impl

        base = h11_impl.H11Protocol

    class PeerHttpProtocol(base):  # type: ignore[misc]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            peer = _ConnectionPeer(transport)
            app = cast(Any, self).app

            async def app_with_peer(scope: Any, receive: Any, send: Any) -> None:
                scope[PEER_SCOPE_KEY] = peer
                await app(scope, receive, send)

            self.app = app_with_peer

    return PeerHttpProtocol
