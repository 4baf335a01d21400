"""Resumable verified downloads against a real HTTP server on loopback."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.errors import DownloadError, LocalIOError, TransientError, VerificationError
from agent.updates.download import DownloadConfig, Downloader

from .conftest import FileServer

SIZE = 3 * 1024 * 1024 + 123


@pytest.fixture
def artifact(file_server: FileServer) -> tuple[str, bytes, str]:
    data = random.Random(1).randbytes(SIZE)
    (file_server.root / "model.tar").write_bytes(data)
    return "model.tar", data, hashlib.sha256(data).hexdigest()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client() as c:
        yield c


def _downloader(client: httpx.Client, **kw: object) -> Downloader:
    cfg = DownloadConfig(
        chunk_bytes=64 * 1024,
        free_space_margin_bytes=0,
        **{k: v for k, v in kw.items() if k in DownloadConfig.__annotations__},
    )  # type: ignore[arg-type]
    return Downloader(client, cfg, sleep=lambda _s: None, rng=random.Random(0))


def test_download_verifies_and_renames(
    tmp_path: Path, file_server: FileServer, artifact: tuple[str, bytes, str], client: httpx.Client
) -> None:
    path, data, sha = artifact
    dest = tmp_path / "dl" / "model.tar"
    res = _downloader(client).fetch(f"{file_server.url}/{path}", dest, length=SIZE, sha256=sha)
    assert dest.read_bytes() == data
    assert res.bytes_transferred == SIZE
    assert res.attempts == 1
    assert not dest.with_name("model.tar.part").exists()


def test_interrupted_download_resumes_with_range(
    tmp_path: Path, file_server: FileServer, artifact: tuple[str, bytes, str], client: httpx.Client
) -> None:
    path, data, sha = artifact
    file_server.faults.close_after[path] = 1_000_000
    dest = tmp_path / "model.tar"
    res = _downloader(client).fetch(f"{file_server.url}/{path}", dest, length=SIZE, sha256=sha)
    assert dest.read_bytes() == data
    assert res.attempts == 2
    assert file_server.faults.requests[-1] == (path, "bytes=1000000-")
    assert res.bytes_transferred == SIZE  # nothing fetched twice


def test_resume_survives_a_restart(
    tmp_path: Path, file_server: FileServer, artifact: tuple[str, bytes, str], client: httpx.Client
) -> None:
    """A first process gives up mid-way; a new one (after a reboot) continues from disk."""
    path, data, sha = artifact
    file_server.faults.close_after[path] = 2_000_000
    dest = tmp_path / "model.tar"
    with pytest.raises(DownloadError, match=r"2000000 of \d+ bytes kept for resume"):
        _downloader(client, max_attempts=1).fetch(
            f"{file_server.url}/{path}", dest, length=SIZE, sha256=sha
        )
    assert dest.with_name("model.tar.part").stat().st_size == 2_000_000
    res = _downloader(client).fetch(f"{file_server.url}/{path}", dest, length=SIZE, sha256=sha)
    assert res.resumed_from == 2_000_000
    assert res.bytes_transferred == SIZE - 2_000_000
    assert dest.read_bytes() == data


def test_tampered_artifact_is_refused_and_discarded(
    tmp_path: Path, file_server: FileServer, artifact: tuple[str, bytes, str], client: httpx.Client
) -> None:
    path, data, sha = artifact
    tampered = bytearray(data)
    tampered[12345] ^= 0xFF
    (file_server.root / path).write_bytes(bytes(tampered))
    dest = tmp_path / "model.tar"
    with pytest.raises(VerificationError, match="does not match the signed"):
        _downloader(client).fetch(f"{file_server.url}/{path}", dest, length=SIZE, sha256=sha)
    assert not dest.exists()
    assert not dest.with_name("model.tar.part").exists()


def test_truncated_artifact_gives_up_cleanly(
    tmp_path: Path, file_server: FileServer, artifact: tuple[str, bytes, str], client: httpx.Client
) -> None:
    path, data, sha = artifact
    (file_server.root / path).write_bytes(data[:-1000])
    dest = tmp_path / "model.tar"
    with pytest.raises(TransientError, match="giving up after 3 attempts"):
        _downloader(client, max_attempts=3).fetch(
            f"{file_server.url}/{path}", dest, length=SIZE, sha256=sha
        )
    assert not dest.exists()


def test_endless_server_is_cut_at_the_signed_length(
    tmp_path: Path, file_server: FileServer, client: httpx.Client
) -> None:
    file_server.faults.endless.add("big.tar")
    dest = tmp_path / "big.tar"
    with pytest.raises(VerificationError, match="more than the signed length of 1000000"):
        _downloader(client).fetch(
            f"{file_server.url}/big.tar", dest, length=1_000_000, sha256="0" * 64
        )
    assert not dest.exists()
    assert dest.with_name("big.tar.part").stat().st_size <= 1_000_000


def test_bigger_file_than_signed_is_refused(
    tmp_path: Path, file_server: FileServer, artifact: tuple[str, bytes, str], client: httpx.Client
) -> None:
    path, data, _ = artifact
    signed = data[: SIZE // 2]
    with pytest.raises(VerificationError, match="more than the signed length"):
        _downloader(client).fetch(
            f"{file_server.url}/{path}",
            tmp_path / "m.tar",
            length=len(signed),
            sha256=hashlib.sha256(signed).hexdigest(),
        )


def test_server_errors_are_retried_with_backoff(
    tmp_path: Path, file_server: FileServer, artifact: tuple[str, bytes, str], client: httpx.Client
) -> None:
    path, _data, sha = artifact
    file_server.faults.fail_status[path] = [503, 502, 429]
    delays: list[float] = []
    d = Downloader(
        client,
        DownloadConfig(free_space_margin_bytes=0, backoff_base_s=1, backoff_max_s=3),
        sleep=delays.append,
        rng=random.Random(7),
    )
    d.fetch(f"{file_server.url}/{path}", tmp_path / "m.tar", length=SIZE, sha256=sha)
    assert len(delays) == 3
    assert all(0 <= dl <= cap for dl, cap in zip(delays, [1, 2, 3], strict=True))


def test_control_plane_down_then_back(
    tmp_path: Path,
    artifact: tuple[str, bytes, str],
    file_server: FileServer,
    client: httpx.Client,
) -> None:
    """Connection refused for a while: the client backs off and completes once it is back."""
    path, data, sha = artifact
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    servers: list[FileServer] = []

    def sleep(_s: float) -> None:
        if len(servers) == 0 and len(delays) == 2:
            servers.append(FileServer(file_server.root, port).start())
        delays.append(_s)

    delays: list[float] = []
    d = Downloader(
        client, DownloadConfig(free_space_margin_bytes=0), sleep=sleep, rng=random.Random(0)
    )
    try:
        d.fetch(f"http://127.0.0.1:{port}/{path}", tmp_path / "m.tar", length=SIZE, sha256=sha)
    finally:
        for srv in servers:
            srv.stop()
    assert len(delays) == 3
    assert (tmp_path / "m.tar").read_bytes() == data


def test_server_ignoring_range_restarts_cleanly(
    tmp_path: Path, file_server: FileServer, artifact: tuple[str, bytes, str], client: httpx.Client
) -> None:
    path, data, sha = artifact
    file_server.faults.close_after[path] = 500_000
    file_server.faults.ignore_range.add(path)
    dest = tmp_path / "m.tar"
    _downloader(client).fetch(f"{file_server.url}/{path}", dest, length=SIZE, sha256=sha)
    assert dest.read_bytes() == data


def test_free_space_is_checked_before_starting(
    tmp_path: Path, file_server: FileServer, artifact: tuple[str, bytes, str], client: httpx.Client
) -> None:
    path, _, sha = artifact
    d = Downloader(client, DownloadConfig(free_space_margin_bytes=1024), disk_free=lambda _p: SIZE)
    with pytest.raises(LocalIOError, match="not enough free space") as info:
        d.fetch(f"{file_server.url}/{path}", tmp_path / "m.tar", length=SIZE, sha256=sha)
    assert info.value.out_of_space
    assert file_server.faults.requests == []


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_mid_download_keeps_what_fits(
    tiny_fs: Path, file_server: FileServer, artifact: tuple[str, bytes, str], client: httpx.Client
) -> None:
    path, _, sha = artifact
    d = Downloader(
        client,
        DownloadConfig(chunk_bytes=64 * 1024, free_space_margin_bytes=0),
        disk_free=lambda _p: 1 << 40,
    )  # the filesystem lies about its space
    dest = tiny_fs / "m.tar"
    with pytest.raises(LocalIOError, match="out of space while downloading"):
        d.fetch(f"{file_server.url}/{path}", dest, length=SIZE, sha256=sha)
    part = dest.with_name("m.tar.part")
    assert 0 < part.stat().st_size <= 1024 * 1024  # what fit, nothing beyond
    assert not dest.exists()
    os.sync()


def test_bandwidth_cap_paces_the_transfer(
    tmp_path: Path, file_server: FileServer, artifact: tuple[str, bytes, str], client: httpx.Client
) -> None:
    path, _, sha = artifact
    clock = [0.0]

    def sleep(s: float) -> None:
        clock[0] += s

    d = Downloader(
        client,
        DownloadConfig(
            free_space_margin_bytes=0, chunk_bytes=64 * 1024, bandwidth_limit_bps=1_000_000
        ),
        sleep=sleep,
        monotonic=lambda: clock[0],
    )
    d.fetch(f"{file_server.url}/{path}", tmp_path / "m.tar", length=SIZE, sha256=sha)
    assert clock[0] == pytest.approx(SIZE / 1_000_000, rel=0.05)
