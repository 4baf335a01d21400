"""Resumable, verified artifact downloads with bounded memory.

Owns one file transfer: stream to ``<dest>.part`` in fixed-size chunks, resume with HTTP Range
from wherever an earlier attempt (or an earlier process, before a reboot) stopped, enforce the
expected length and sha256 while streaming, check free space first, retry transient failures with
exponential backoff and full jitter, and cap bandwidth if asked. Failures keep their class: the
network away after every retry is a ``TransientError``, the device's own disk (out of space, an
I/O error) a ``LocalIOError`` with the partial file kept for resume, a wrong answer for this
artifact a ``DownloadError``, a digest or length that breaks the signed metadata a
``VerificationError``. The expected length and digest
come from signed metadata (``agent.updates.signed``); this module trusts only them, never the
server's headers. Deciding *what* to download is the update client's job.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from agent._fs import fsync_dir
from agent.errors import DownloadError, LocalIOError, TransientError, VerificationError
from agent.logs import get_logger

__all__ = ["DownloadConfig", "DownloadResult", "Downloader"]

log = get_logger(__name__)

# One artifact download at a time per device: a flaky cellular link gains nothing from two.
_ONE_AT_A_TIME = threading.Lock()
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class DownloadConfig:
    chunk_bytes: int = 1 << 20  # bytes hashed per step when resuming from a partial file
    max_attempts: int = 8
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    timeout_s: float = 30.0  # connect/read inactivity, not the whole transfer
    free_space_margin_bytes: int = 64 * 1024 * 1024  # left free for the store and the spool
    bandwidth_limit_bps: int | None = None  # bytes per second


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    size: int
    bytes_transferred: int  # over the network in this call (excludes resumed bytes)
    resumed_from: int
    attempts: int


class _RetryableError(Exception):
    """A transient failure: back off and resume."""


class Downloader:
    """Downloads one URL to a file, verified against an expected length and sha256."""

    def __init__(
        self,
        client: httpx.Client,
        config: DownloadConfig | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        disk_free: Callable[[Path], int] = lambda p: shutil.disk_usage(p).free,
    ) -> None:
        self._client = client
        self._config = config or DownloadConfig()
        self._sleep = sleep
        self._monotonic = monotonic
        self._rng = rng or random.Random()
        self._disk_free = disk_free

    def fetch(
        self,
        url: str,
        dest: Path,
        *,
        length: int,
        sha256: str,
        headers: dict[str, str] | None = None,
    ) -> DownloadResult:
        """Download ``url`` to ``dest`` (atomically renamed from ``dest.part`` when verified)."""
        with _ONE_AT_A_TIME:
            try:
                return self._fetch(url, dest, length=length, sha256=sha256, headers=headers or {})
            except OSError as exc:  # the device's own disk: its own failure class
                raise LocalIOError(f"cannot write {dest}: {exc}", errno=exc.errno) from exc

    def _fetch(
        self, url: str, dest: Path, *, length: int, sha256: str, headers: dict[str, str]
    ) -> DownloadResult:
        part = dest.with_name(dest.name + ".part")
        dest.parent.mkdir(parents=True, exist_ok=True)
        progress = self._resume(part, length)
        resumed_from = progress.have
        self._check_space(dest.parent, length - progress.have)
        attempt = 0
        while True:
            attempt += 1
            try:
                self._attempt(url, part, progress, length=length, headers=headers)
                break
            except _RetryableError as exc:
                if attempt >= self._config.max_attempts:
                    raise TransientError(
                        f"{url}: giving up after {attempt} attempts ({exc}); "
                        f"{progress.have} of {length} bytes kept for resume"
                    ) from exc
                delay = self._backoff(attempt)
                log.warning(
                    "download_retry",
                    url=url,
                    attempt=attempt,
                    have=progress.have,
                    reason=str(exc),
                    delay_s=round(delay, 2),
                )
                self._sleep(delay)
        if progress.digest.hexdigest() != sha256:
            part.unlink(missing_ok=True)
            raise VerificationError(
                f"{url}: sha256 {progress.digest.hexdigest()} does not match the signed "
                f"{sha256}; download discarded"
            )
        with part.open("rb") as f:
            os.fsync(f.fileno())
        part.replace(dest)
        fsync_dir(dest.parent)
        log.info(
            "download_complete",
            url=url,
            size=length,
            transferred=progress.received,
            resumed_from=resumed_from,
            attempts=attempt,
        )
        return DownloadResult(dest, length, progress.received, resumed_from, attempt)

    def _resume(self, part: Path, length: int) -> _Progress:
        progress = _Progress()
        if not part.exists():
            return progress
        size = part.stat().st_size
        if size > length:
            log.warning("download_partial_discarded", path=str(part), size=size, length=length)
            part.unlink()
            return progress
        with part.open("rb") as f:
            while block := f.read(self._config.chunk_bytes):
                progress.digest.update(block)
        progress.have = size
        return progress

    def _check_space(self, directory: Path, needed: int) -> None:
        free = self._disk_free(directory)
        want = needed + self._config.free_space_margin_bytes
        if free < want:
            raise LocalIOError(
                f"not enough free space in {directory}: need {want} bytes "
                f"({needed} + {self._config.free_space_margin_bytes} margin), {free} free",
                errno=errno.ENOSPC,
            )

    def _backoff(self, attempt: int) -> float:
        cap = min(self._config.backoff_max_s, self._config.backoff_base_s * 2 ** (attempt - 1))
        return self._rng.uniform(0, cap)  # full jitter

    def _attempt(
        self,
        url: str,
        part: Path,
        progress: _Progress,
        *,
        length: int,
        headers: dict[str, str],
    ) -> None:
        """One HTTP request, appending to ``part`` and updating ``progress``.

        Raises ``_RetryableError`` for what a later attempt may fix."""
        if progress.have == length:
            return
        req_headers = dict(headers)
        if progress.have:
            req_headers["Range"] = f"bytes={progress.have}-"
        try:
            with self._client.stream(
                "GET", url, headers=req_headers, timeout=self._config.timeout_s
            ) as resp:
                if resp.status_code in _RETRY_STATUS:
                    raise _RetryableError(f"HTTP {resp.status_code}")
                if resp.status_code == 416 and progress.have:
                    # Our partial file does not fit the server's: start over.
                    part.unlink(missing_ok=True)
                    progress.restart()
                    raise _RetryableError("HTTP 416 for the resumed range")
                if resp.status_code == 200 and progress.have:
                    log.info("download_range_ignored", url=url, have=progress.have)
                    part.unlink(missing_ok=True)
                    progress.restart()
                elif resp.status_code == 206:
                    _check_content_range(url, resp.headers.get("content-range"), progress.have)
                elif resp.status_code != 200:
                    raise DownloadError(f"{url}: HTTP {resp.status_code}")
                fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
                try:
                    self._stream(resp, fd, progress, length=length, url=url)
                finally:
                    os.close(fd)
        except httpx.TransportError as exc:
            raise _RetryableError(f"{type(exc).__name__}: {exc}") from exc
        if progress.have < length:
            raise _RetryableError(f"connection closed at {progress.have} of {length} bytes")

    def _stream(
        self, resp: httpx.Response, fd: int, progress: _Progress, *, length: int, url: str
    ) -> None:
        limit = self._config.bandwidth_limit_bps
        started = self._monotonic()
        sent_here = 0
        # Transport-sized reads (about 64 KiB): bounded memory, and a dropped connection loses
        # nothing already received.
        for chunk in resp.iter_raw():
            if progress.have + len(chunk) > length:
                # Endless-data defence: never write past the signed length.
                raise VerificationError(
                    f"{url}: server sent more than the signed length of {length} bytes"
                )
            try:
                _write_all(fd, chunk)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, progress.have)  # drop a half-written chunk; keep the rest
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise LocalIOError(
                        f"out of space while downloading {url}: {progress.have} of {length} "
                        "bytes kept for resume",
                        errno=exc.errno,
                    ) from exc
                raise LocalIOError(
                    f"cannot write {url} to disk: {exc}; {progress.have} bytes kept for resume",
                    errno=exc.errno,
                ) from exc
            progress.digest.update(chunk)
            progress.have += len(chunk)
            progress.received += len(chunk)
            sent_here += len(chunk)
            if limit:
                ahead = sent_here / limit - (self._monotonic() - started)
                if ahead > 0:
                    self._sleep(ahead)


class _Progress:
    """Bytes on disk, their running digest, and bytes received over the network."""

    def __init__(self) -> None:
        self.have = 0
        self.received = 0
        self.digest = hashlib.sha256()

    def restart(self) -> None:
        self.have = 0
        self.digest = hashlib.sha256()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _check_content_range(url: str, header: str | None, have: int) -> None:
    # "bytes START-END/TOTAL"
    try:
        unit, rest = (header or "").split(" ", 1)
        start = int(rest.split("-", 1)[0])
    except ValueError as exc:
        raise DownloadError(f"{url}: malformed Content-Range {header!r}") from exc
    if unit != "bytes" or start != have:
        raise DownloadError(f"{url}: server resumed at {header!r}, expected byte {have}")
