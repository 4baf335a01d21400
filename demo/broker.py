"""A small embedded MQTT broker (3.1.1 and 5) for ``make demo`` on machines without Mosquitto.

Loopback only, no persistence, no authentication: what the demo's agents, the control plane and
the demo's live table need and nothing more. It speaks MQTT 3.1.1 and 5 (the agents use 5):
CONNECT with last will, PUBLISH at QoS 0/1 (QoS 2 is accepted inbound and delivered at QoS 1),
retained messages, SUBSCRIBE/UNSUBSCRIBE with ``+``/``#`` wildcards and MQTT 5's No Local,
keep-alive, and session takeover by client id. MQTT 5 properties of a PUBLISH are forwarded as
they came to MQTT 5 subscribers and dropped for 3.1.1 ones.

It is a stand-in for a development machine, not a production broker: production deployments
use Mosquitto with the ACL and TLS of ``deploy/``. Run as ``python -m demo.broker
--port N``; it serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import signal
import sys
from dataclasses import dataclass, field

__all__ = ["Broker", "main", "topic_matches"]

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14
MAX_PACKET_BYTES = 1024 * 1024  # bytes; the agents' messages are a few KiB
_ASSIGNED_CLIENT_ID = 0x12
_DISCONNECT_WITH_WILL = 0x04
_SESSION_TAKEN_OVER = 0x8E


class ProtocolError(Exception):
    """The peer sent something this broker does not accept; the connection is closed."""


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching; wildcards at the first level never match ``$`` topics."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_parts, t_parts = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(f_parts):
        if part == "#":
            return True
        if i >= len(t_parts):
            return False
        if part not in ("+", t_parts[i]):
            return False
    return len(f_parts) == len(t_parts)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: str) -> bytes:
    raw = s.encode()
    return len(raw).to_bytes(2, "big") + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


class _Reader:
    """Reads fields out of one packet body."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ProtocolError("packet shorter than its fields")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def varint(self) -> int:
        value = 0
        for shift in range(0, 28, 7):
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
        raise ProtocolError("malformed variable byte integer")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def string(self) -> str:
        try:
            return self.binary().decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError("string is not UTF-8") from exc

    def properties(self) -> bytes:
        return self.take(self.varint())

    def rest(self) -> bytes:
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return out

    def more(self) -> bool:
        return self.pos < len(self.data)


@dataclass
class _Message:
    topic: str
    payload: bytes
    qos: int
    properties: bytes = b""


@dataclass
class _Session:
    client_id: str
    v5: bool
    writer: asyncio.StreamWriter
    subscriptions: dict[str, tuple[int, bool]] = field(default_factory=dict)  # qos, no_local
    will: _Message | None = None
    will_retain: bool = False
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def next_id(self) -> int:
        return (next(self.ids) - 1) % 65535 + 1

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    def publish(self, msg: _Message, qos: int, *, retain: bool) -> None:
        first = (PUBLISH << 4) | (qos << 1) | int(retain)
        body = _string(msg.topic)
        if qos:
            body += self.next_id().to_bytes(2, "big")
        if self.v5:
            body += _varint(len(msg.properties)) + msg.properties
        self.send(_packet(first, body + msg.payload))


class Broker:
    def __init__(self) -> None:
        self.sessions: dict[str, _Session] = {}
        self.retained: dict[str, _Message] = {}
        self._anonymous = itertools.count(1)

    async def serve(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._connection, host, port)

    # -- routing ----------------------------------------------------------------------------

    def route(self, msg: _Message, *, retain: bool, sender: str | None) -> None:
        if retain:
            if msg.payload:
                self.retained[msg.topic] = msg
            else:
                self.retained.pop(msg.topic, None)
        for session in list(self.sessions.values()):
            granted: int | None = None
            for topic_filter, (qos, no_local) in session.subscriptions.items():
                if no_local and session.client_id == sender:
                    continue
                if topic_matches(topic_filter, msg.topic):
                    granted = max(granted or 0, qos)
            if granted is not None:
                session.publish(msg, min(granted, msg.qos), retain=False)

    # -- one connection ---------------------------------------------------------------------

    async def _read_packet(
        self, reader: asyncio.StreamReader, timeout: float | None
    ) -> tuple[int, bytes]:
        first = (await asyncio.wait_for(reader.readexactly(1), timeout))[0]
        length = 0
        for shift in range(0, 28, 7):
            byte = (await reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
        else:
            raise ProtocolError("malformed remaining length")
        if length > MAX_PACKET_BYTES:
            raise ProtocolError(f"packet of {length} bytes")
        return first, await reader.readexactly(length)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session: _Session | None = None
        clean = False
        try:
            first, body = await self._read_packet(reader, 10.0)
            if first >> 4 != CONNECT:
                raise ProtocolError("first packet is not CONNECT")
            session, keepalive = self._connect(body, writer)
            timeout = keepalive * 1.5 if keepalive else None
            while True:
                first, body = await self._read_packet(reader, timeout)
                if first >> 4 == DISCONNECT:
                    r = _Reader(body)
                    reason = r.u8() if session.v5 and r.more() else 0
                    clean = reason != _DISCONNECT_WITH_WILL
                    break
                self._handle(session, first, body)
                await writer.drain()
        except (
            asyncio.IncompleteReadError,
            asyncio.TimeoutError,
            ConnectionError,
            ProtocolError,
        ):
            pass
        finally:
            if session is not None and self.sessions.get(session.client_id) is session:
                del self.sessions[session.client_id]
                if session.will is not None and not clean:
                    self.route(session.will, retain=session.will_retain, sender=None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _connect(self, body: bytes, writer: asyncio.StreamWriter) -> tuple[_Session, int]:
        r = _Reader(body)
        r.string()  # "MQTT" (or "MQIsdp" from very old clients)
        level = r.u8()
        if level not in (3, 4, 5):
            raise ProtocolError(f"protocol level {level}")
        v5 = level == 5
        flags, keepalive = r.u8(), r.u16()
        if v5:
            r.properties()
        client_id = r.string()
        assigned = not client_id
        if assigned:
            client_id = f"demo-broker-{next(self._anonymous)}"
        session = _Session(client_id, v5, writer)
        if flags & 0x04:
            will_props = r.properties() if v5 else b""
            will_topic, will_payload = r.string(), r.binary()
            session.will = _Message(will_topic, will_payload, min((flags >> 3) & 3, 1), will_props)
            session.will_retain = bool(flags & 0x20)
        old = self.sessions.get(client_id)
        if old is not None:  # session takeover: the newest connection wins
            if old.v5:
                old.send(_packet(DISCONNECT << 4, bytes([_SESSION_TAKEN_OVER, 0])))
            old.writer.close()
        self.sessions[client_id] = session
        if v5:
            props = bytes([_ASSIGNED_CLIENT_ID]) + _string(client_id) if assigned else b""
            session.send(_packet(CONNACK << 4, b"\x00\x00" + _varint(len(props)) + props))
        else:
            session.send(_packet(CONNACK << 4, b"\x00\x00"))
        return session, keepalive

    def _handle(self, session: _Session, first: int, body: bytes) -> None:
        kind = first >> 4
        r = _Reader(body)
        if kind == PUBLISH:
            qos, retain = (first >> 1) & 3, bool(first & 1)
            topic = r.string()
            message_id = r.take(2) if qos else b""
            props = r.properties() if session.v5 else b""
            if not topic or "+" in topic or "#" in topic:
                raise ProtocolError(f"cannot publish to {topic!r}")
            message = _Message(topic, r.rest(), min(qos, 1), props)
            self.route(message, retain=retain, sender=session.client_id)
            if qos == 1:
                session.send(_packet(PUBACK << 4, message_id))
            elif qos == 2:
                session.send(_packet(PUBREC << 4, message_id))
        elif kind == PUBREL:
            session.send(_packet(PUBCOMP << 4, r.take(2)))
        elif kind in (PUBACK, PUBREC, PUBCOMP):
            if kind == PUBREC:
                session.send(_packet((PUBREL << 4) | 2, r.take(2)))
        elif kind == SUBSCRIBE:
            packet_id = r.take(2)
            if session.v5:
                r.properties()
            codes, matched = bytearray(), []
            while r.more():
                topic_filter, options = r.string(), r.u8()
                qos = min(options & 3, 1)
                session.subscriptions[topic_filter] = (qos, bool(options & 4) and session.v5)
                codes.append(qos)
                matched.append((topic_filter, qos))
            props = b"\x00" if session.v5 else b""
            session.send(_packet((SUBACK << 4), packet_id + props + bytes(codes)))
            for topic_filter, qos in matched:
                for msg in list(self.retained.values()):
                    if topic_matches(topic_filter, msg.topic):
                        session.publish(msg, min(qos, msg.qos), retain=True)
        elif kind == UNSUBSCRIBE:
            packet_id = r.take(2)
            if session.v5:
                r.properties()
            count = 0
            while r.more():
                session.subscriptions.pop(r.string(), None)
                count += 1
            tail = b"\x00" + bytes(count) if session.v5 else b""
            session.send(_packet(UNSUBACK << 4, packet_id + tail))
        elif kind == PINGREQ:
            session.send(_packet(PINGRESP << 4, b""))
        else:
            raise ProtocolError(f"unexpected packet type {kind}")


async def _serve(host: str, port: int) -> None:
    broker = Broker()
    server = await broker.serve(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"embedded MQTT broker listening on {host}:{port}", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="embedded MQTT broker for the demo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    args = parser.parse_args(argv)
    from demo.procs import exit_with_parent

    exit_with_parent()
    asyncio.run(_serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
