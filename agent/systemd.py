"""The sd_notify protocol, spoken directly (no libsystemd): READY, STATUS, WATCHDOG, STOPPING.

Owns the notify socket and the watchdog pinger. The pinger sends ``WATCHDOG=1`` only while a
health check passes (the daemon passes "the inference loop made progress recently"), so a stalled
hot loop stops the pings and systemd restarts the service. Outside systemd (no
``NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Mapping

from agent.logs import get_logger

__all__ = ["Notifier", "WatchdogPinger", "watchdog_interval_s"]

log = get_logger(__name__)


class Notifier:
    """Sends sd_notify datagrams to ``$NOTIFY_SOCKET`` (path or abstract ``@name``)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._address = env.get("NOTIFY_SOCKET") or None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def _send(self, message: str) -> bool:
        if self._address is None:
            return False
        addr = self._address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    )
                self._sock.sendto(message.encode(), addr)
            except OSError as exc:
                # A notify failure must never take the agent down; systemd will notice.
                log.warning("sd_notify_failed", message=message.split("=", 1)[0], error=str(exc))
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self._send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, text: str) -> bool:
        return self._send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self._send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self._send("STOPPING=1")

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """Half of ``WatchdogSec=`` (systemd's advice), or ``None`` when the watchdog is off or is
    meant for another process (``WATCHDOG_PID``)."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


class WatchdogPinger:
    """Pings the watchdog every ``interval_s`` while ``healthy()`` is true."""

    def __init__(self, notifier: Notifier, interval_s: float, healthy: Callable[[], bool]) -> None:
        self._notifier = notifier
        self._interval_s = interval_s
        self._healthy = healthy
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._was_healthy = True

    def start(self) -> WatchdogPinger:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                ok = self._healthy()
            except Exception:
                log.exception("watchdog_health_check_failed")
                ok = False
            if ok:
                self._notifier.watchdog()
            elif self._was_healthy:
                log.error("watchdog_withheld", reason="health check failed")
            self._was_healthy = ok

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._interval_s + 1)
