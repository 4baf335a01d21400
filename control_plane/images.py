"""Agent container images through the Docker SDK: build both agent images for linux/arm64, push
them, and smoke-test a built image against a running control plane.

Owns talking to a Docker engine (``docker.from_env()``); the Dockerfiles themselves live at the
repository root. Cross-building for arm64 on an x86 host needs an engine with BuildKit and
QEMU binfmt handlers (``docker run --privileged --rm tonistiigi/binfmt --install arm64``).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control_plane.errors import ControlPlaneError

__all__ = [
    "IMAGES",
    "ImageError",
    "ImageSpec",
    "build_image",
    "docker_client",
    "push_image",
    "smoke_test",
]


class ImageError(ControlPlaneError):
    """A Docker engine is missing, or a build, push or smoke test failed."""


@dataclass(frozen=True)
class ImageSpec:
    name: str
    dockerfile: str
    repository: str
    platform: str = "linux/arm64"


IMAGES: dict[str, ImageSpec] = {
    "jetson": ImageSpec("jetson", "Dockerfile.jetson", "edgefleet/agent-jetson"),
    "rpi": ImageSpec("rpi", "Dockerfile.rpi", "edgefleet/agent-rpi"),
}


def docker_client() -> Any:
    """A client for the local engine; ``ImageError`` saying why when there is none."""
    try:
        import docker
    except ImportError as exc:
        raise ImageError("the docker SDK is not installed (pip install docker)") from exc
    _probe_engine_socket()
    try:
        client = docker.from_env()
    except Exception as exc:  # the SDK raises DockerException, requests and socket errors
        raise ImageError(f"no Docker engine reachable: {exc}") from exc
    try:
        client.ping()
    except Exception as exc:
        client.close()
        raise ImageError(f"no Docker engine reachable: {exc}") from exc
    return client


def _probe_engine_socket() -> None:
    """Refuse early when the local engine socket does not answer (the SDK's own failure path
    leaves its connection open)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        return  # remote engines are checked by the SDK's ping
    path = host.removeprefix("unix://")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(path)
        except OSError as exc:
            raise ImageError(f"no Docker engine reachable at {host}: {exc}") from exc


def build_image(
    client: Any,
    spec: ImageSpec,
    context: Path,
    tag: str,
    on_line: Callable[[str], None] | None = None,
) -> str:
    """Build ``spec`` from ``context``; returns the image id. Build output goes to ``on_line``."""
    ref = f"{spec.repository}:{tag}"
    try:
        stream: Iterator[dict[str, Any]] = client.api.build(
            path=str(context),
            dockerfile=spec.dockerfile,
            tag=ref,
            platform=spec.platform,
            rm=True,
            decode=True,
            pull=True,
        )
        for chunk in stream:
            if "error" in chunk:
                raise ImageError(f"{ref}: {chunk['error'].strip()}")
            if on_line and chunk.get("stream", "").strip():
                on_line(chunk["stream"].rstrip())
        image = client.images.get(ref)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"building {ref} failed: {exc}") from exc
    image_id: str = image.id
    return image_id


def push_image(client: Any, spec: ImageSpec, tag: str) -> None:
    ref = f"{spec.repository}:{tag}"
    try:
        for chunk in client.images.push(spec.repository, tag=tag, stream=True, decode=True):
            if "error" in chunk:
                raise ImageError(f"pushing {ref}: {chunk['error']}")
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"pushing {ref} failed: {exc}") from exc


def smoke_test(
    client: Any,
    image: str,
    *,
    control_plane_url: str,
    bootstrap_token: str,
    timeout_s: float = 180.0,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Run ``image`` against a control plane and wait for Docker to report it healthy."""
    container = client.containers.run(
        image,
        detach=True,
        network_mode="host",
        environment={
            "EDGE_AGENT__CONTROL_PLANE__URL": control_plane_url,
            "EDGE_AGENT__CONTROL_PLANE__BOOTSTRAP_TOKEN": bootstrap_token,
            "EDGE_AGENT__DEVICE_ID": "image-smoke-test",
        },
        command=["daemon"],
    )
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            container.reload()
            health = container.attrs.get("State", {}).get("Health", {}).get("Status")
            if health == "healthy":
                return
            if container.status == "exited":
                logs = container.logs(tail=20).decode(errors="replace")
                raise ImageError(f"{image} exited during the smoke test:\n{logs}")
            sleep(2)
        raise ImageError(f"{image} did not become healthy within {timeout_s:.0f} s")
    finally:
        container.remove(force=True)
