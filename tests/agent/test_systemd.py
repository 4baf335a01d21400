"""The sd_notify protocol against a real datagram socket, as systemd would listen."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.systemd import Notifier, WatchdogPinger, watchdog_interval_s


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def test_messages_reach_the_socket(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.ready(status="serving digits 1.0.0")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving digits 1.0.0"
    n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    n.close()


def test_abstract_socket_address() -> None:
    name = f"edgefleet-test-{threading.get_ident()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        with Notifier({"NOTIFY_SOCKET": "@" + name}) as n:
            n.status("hello")
        assert sock.recv(100) == b"STATUS=hello"
    finally:
        sock.close()


def test_without_systemd_everything_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled
    assert not n.ready()


def test_unreachable_socket_never_raises(tmp_path: Path) -> None:
    with Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}) as n:
        assert not n.watchdog()


def test_watchdog_interval_is_half_of_watchdog_sec() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "junk"}) is None


def _count_until_quiet(sock: socket.socket, limit: int = 10) -> int:
    count = 0
    try:
        while count < limit:
            sock.recv(100)
            count += 1
    except TimeoutError:
        pass
    return count


def test_pings_stop_while_unhealthy(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    healthy = threading.Event()
    healthy.set()
    notifier = Notifier({"NOTIFY_SOCKET": path})
    pinger = WatchdogPinger(notifier, 0.02, healthy.is_set).start()
    try:
        assert sock.recv(100) == b"WATCHDOG=1"
        healthy.clear()
        # Drain pings already in flight, then none may arrive while unhealthy.
        sock.settimeout(0.2)
        assert _count_until_quiet(sock) < 3, "pings kept coming while the health check failed"
        healthy.set()
        sock.settimeout(5)
        assert sock.recv(100) == b"WATCHDOG=1"
    finally:
        pinger.stop()
        notifier.close()
