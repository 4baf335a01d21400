"""Real servers on loopback for the scale-out tests: moto's S3 server, HAProxy, `edgectl serve`.

Each is a separate process on a free port, started and stopped by a context manager; nothing
is simulated in-process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import httpx

from tests.control_plane.conftest import ADMIN_TOKEN, BOOTSTRAP_TOKEN, free_port

S3_KEY, S3_SECRET, S3_REGION = "testing-key", "testing-secret", "us-east-1"


def wait_http(
    url: str, *, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer in {timeout} s")
        time.sleep(0.1)


def stop(process: subprocess.Popen[bytes], *, timeout: float = 20.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def moto_s3(bucket: str = "edgefleet") -> Iterator[str]:
    """moto's standalone S3 server on a free port with ``bucket`` created; its endpoint URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/moto-api/", process=process)
        boto3.client(
            "s3",
            endpoint_url=url,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name=S3_REGION,
        ).create_bucket(Bucket=bucket)
        yield url
    finally:
        stop(process)


def s3_env(endpoint: str, bucket: str = "edgefleet") -> dict[str, str]:
    return {
        "EDGEFLEET_CP__OBJECT_STORE": "s3",
        "EDGEFLEET_CP__S3_BUCKET": bucket,
        "EDGEFLEET_CP__S3_ENDPOINT_URL": endpoint,
        "EDGEFLEET_CP__S3_REGION": S3_REGION,
        "EDGEFLEET_CP__S3_ACCESS_KEY_ID": S3_KEY,
        "EDGEFLEET_CP__S3_SECRET_ACCESS_KEY": S3_SECRET,
        "EDGEFLEET_CP__S3_ADDRESSING_STYLE": "path",
    }


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    if found is None:
        raise RuntimeError("haproxy is not installed (make services installs it)")
    return found


HAPROXY_CFG = """\
global
    maxconn 4000
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch
    retry-on conn-failure empty-response response-timeout 502 503
frontend api
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 500ms fall 2 rise 1 check
{servers}
"""


@contextmanager
def haproxy(backends: list[int], work: Path) -> Iterator[str]:
    """HAProxy on a free port balancing ``backends`` (ports) with /readyz checks; its URL."""
    port = free_port()
    servers = "\n".join(f"    server r{i} 127.0.0.1:{p}" for i, p in enumerate(backends))
    cfg = work / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(port=port, servers=servers))
    process = subprocess.Popen([haproxy_binary(), "-db", "-f", str(cfg)])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/readyz", process=process)
        yield url
    finally:
        stop(process)


def start_replica(
    data_dir: Path, db_url: str, port: int, *, extra: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """One `edgectl serve` process; not waited for."""
    env = {
        **os.environ,
        "EDGEFLEET_CP__DATA_DIR": str(data_dir),
        "EDGEFLEET_CP__DATABASE_URL": db_url,
        "EDGEFLEET_CP__ADMIN_TOKEN": ADMIN_TOKEN,
        "EDGEFLEET_CP__BOOTSTRAP_TOKEN": BOOTSTRAP_TOKEN,
        "EDGEFLEET_CP__PORT": str(port),
        "EDGEFLEET_CP__LOG_LEVEL": "warning",
        **(extra or {}),
    }
    edgectl = Path(sys.executable).with_name("edgectl")
    return subprocess.Popen([str(edgectl), "serve"], env=env)
