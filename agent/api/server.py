"""Starting and stopping the inference API beside the agent's other work.

``start_api(repository, config, metrics_registry)`` binds every listener first (so a taken port
fails at once with ``ApiStartError``), then runs the HTTP server (uvicorn, its own thread and
event loop) and the gRPC server (its own thread pool), and returns an ``ApiServer`` handle whose
``stop()`` closes them and lets queued batches finish. What is served comes from the
``ModelRepository``; the daemon decides when to start and stop.
"""

from __future__ import annotations

import contextlib
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from agent.api._peer import http_protocol_with_peer
from agent.api.grpc_server import GrpcInferenceServer
from agent.api.http_server import build_app
from agent.api.metrics import InferenceMetrics
from agent.api.service import ApiStartError, InferenceService
from agent.config import ApiConfig
from agent.logs import get_logger
from agent.models.serving import ModelRepository

__all__ = ["ApiServer", "start_api"]

log = get_logger(__name__)


class ApiServer:
    """A running API: where it listens, its service and metrics, and ``stop()``."""

    def __init__(
        self,
        *,
        service: InferenceService,
        http_port: int | None,
        grpc_port: int | None,
        unix_socket: Path | None,
        uvicorn_server: Any,
        http_thread: threading.Thread | None,
        grpc_server: GrpcInferenceServer | None,
        sockets: list[socket.socket],
    ) -> None:
        self.service = service
        self.metrics = service.metrics
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.unix_socket = unix_socket
        self._uvicorn = uvicorn_server
        self._http_thread = http_thread
        self._grpc = grpc_server
        self._sockets = sockets
        self._stopped = False

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop listening, finish queued requests, close the listeners; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._grpc is not None:
            self._grpc.stop(grace_s=min(timeout_s, 2.0))
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._http_thread is not None:
            self._http_thread.join(timeout_s)
        self.service.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
        if self.unix_socket is not None:
            with contextlib.suppress(OSError):
                self.unix_socket.unlink()
        log.info("api_stopped")

    def __enter__(self) -> ApiServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def _tcp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ApiStartError(f"cannot listen for HTTP on {host}:{port}: {exc}") from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _unix_socket(path: Path) -> socket.socket:
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ApiStartError(f"{path} exists and is not a socket; refusing to replace it")
        path.unlink()  # a stale socket from a previous run
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        path.chmod(0o660)  # owner and group (e.g. the robot's processes) may connect
    except OSError as exc:
        sock.close()
        raise ApiStartError(f"cannot listen on unix socket {path}: {exc}") from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock


def start_api(
    repository: ModelRepository,
    config: ApiConfig | None = None,
    metrics_registry: CollectorRegistry | None = None,
    *,
    startup_timeout_s: float = 10.0,
) -> ApiServer:
    """Serve ``repository`` over HTTP (TCP and/or Unix socket) and gRPC as ``config`` says.

    ``http_port=0`` / ``grpc_port=0`` pick free ports (read them from the handle);
    ``grpc_port=None`` disables gRPC. Raises ``ApiStartError`` if a listener cannot bind.
    """
    import uvicorn

    config = config or ApiConfig()
    metrics = InferenceMetrics(metrics_registry)
    service = InferenceService(repository, config, metrics)
    sockets: list[socket.socket] = []
    grpc_server: GrpcInferenceServer | None = None
    try:
        tcp = _tcp_socket(config.host, config.http_port)
        sockets.append(tcp)
        http_port = int(tcp.getsockname()[1])
        if config.unix_socket is not None:
            sockets.append(_unix_socket(config.unix_socket))
        if config.grpc_port is not None:
            grpc_server = GrpcInferenceServer(service, config, port=config.grpc_port)
    except BaseException:
        for sock in sockets:
            sock.close()
        service.close()
        raise
    uv_config = uvicorn.Config(
        build_app(service, config),
        http=http_protocol_with_peer(),  # shared-memory regions belong to the client's uid
        lifespan="off",
        proxy_headers=False,
        log_config=None,
        access_log=False,
        server_header=False,
        date_header=False,
        timeout_keep_alive=30,
    )
    uv_server = uvicorn.Server(uv_config)
    thread = threading.Thread(
        target=uv_server.run, kwargs={"sockets": sockets}, name="api-http", daemon=True
    )
    thread.start()
    if grpc_server is not None:
        grpc_server.start()
    handle = ApiServer(
        service=service,
        http_port=http_port,
        grpc_port=grpc_server.port if grpc_server else None,
        unix_socket=config.unix_socket,
        uvicorn_server=uv_server,
        http_thread=thread,
        grpc_server=grpc_server,
        sockets=sockets,
    )
    deadline = time.monotonic() + startup_timeout_s
    while not uv_server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            handle.stop()
            raise ApiStartError("the HTTP server did not start")
        time.sleep(0.005)
    log.info(
        "api_started",
        host=config.host,
        http_port=http_port,
        grpc_port=handle.grpc_port,
        unix_socket=str(config.unix_socket) if config.unix_socket else None,
        auth=config.token is not None,
    )
    return handle
