"""The HTTP/REST binding of the Open Inference Protocol, as a plain ASGI application.

Owns routing, bearer-token auth, body limits and decompression, and the mapping of the agent's
errors to HTTP statuses (``{"error": "..."}`` bodies). The work is done by
``agent.api.service.InferenceService``; bytes <-> tensors by ``agent.api.codec``. No web
framework: the handful of routes are matched directly, which keeps the per-request overhead to
the ASGI server's own (see bench/bench_api.py).

Routes: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{m}[/versions/{v}]``,
``.../ready``; ``POST .../infer``; ``GET /metrics`` (Prometheus); the shared-memory extensions'
``/v2/{system,cuda}sharedmemory[/region/{name}]/{status,register,unregister}`` (regions and their
checks are ``agent.api.shm``'s).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, cast

from agent.api._peer import PEER_SCOPE_KEY, Peer, peer_of_address
from agent.api.codec import RequestError, decode_http_request, encode_http_response
from agent.api.service import InferenceService, ModelNotReadyError
from agent.api.shm import (
    CudaRegisterBody,
    Kind,
    SystemRegisterBody,
    attach_inputs,
    merge_http_response,
    parse_body,
    place_outputs,
    split_http_request,
)
from agent.config import ApiConfig
from agent.errors import InferenceError, InputError, ModelError
from agent.logs import get_logger

__all__ = ["build_app", "status_of"]

log = get_logger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

_MODEL_ROUTE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?/?$")
_SHM_ROUTE = re.compile(
    r"^/v2/(system|cuda)sharedmemory(?:/region/([^/]+))?/(status|register|unregister)/?$"
)
_REGISTER_BODY_LIMIT = 64 * 1024  # bytes: a register request is a few fields
_JSON = (b"content-type", b"application/json")
_METRICS_TYPE = (b"content-type", b"text/plain; version=0.0.4; charset=utf-8")


class _ClientGoneError(Exception):
    """The client disconnected before its request body arrived."""


def status_of(exc: BaseException) -> int:
    """The HTTP status for an error raised while serving a request."""
    if isinstance(exc, RequestError):
        return exc.status_code
    if isinstance(exc, ModelError):
        return 404
    if isinstance(exc, ModelNotReadyError):
        return 503
    if isinstance(exc, InputError):
        return 400
    return 500


def build_app(service: InferenceService, config: ApiConfig) -> App:
    """The ASGI application serving ``service`` with ``config``'s token and body limit."""
    token = f"Bearer {config.token}".encode() if config.token else None
    max_body = config.max_body_bytes

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await _lifespan(receive, send)
            return
        headers = dict(scope["headers"])  # last value wins; names arrive lower-case
        if token is not None and not hmac.compare_digest(headers.get(b"authorization", b""), token):
            await _reply(
                send,
                401,
                _error("missing or wrong bearer token"),
                extra=[(b"www-authenticate", b"Bearer")],
            )
            return
        try:
            status, body, extra = await _route(service, scope, headers, receive, max_body)
        except _ClientGoneError:
            log.info("http_client_disconnected", path=scope["path"])
            return
        except (InputError, InferenceError, ModelError) as exc:
            status = status_of(exc)
            if status >= 500:
                log.error("http_request_failed", path=scope["path"], error=str(exc))
            body, extra = _error(str(exc)), []
        except Exception as exc:  # a bug must not take the server down: answer 500, log it
            log.exception("http_handler_crashed", path=scope["path"])
            status, body, extra = 500, _error(f"internal error: {type(exc).__name__}"), []
        await _reply(send, status, body, extra=extra)

    return app


async def _route(
    service: InferenceService,
    scope: Scope,
    headers: dict[bytes, bytes],
    receive: Receive,
    max_body: int,
) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    path: str = scope["path"]
    method: str = scope["method"]
    match = _MODEL_ROUTE.match(path)
    if match is not None:
        model, version, action = match.group(1), match.group(2), match.group(3)
        if action == "/infer":
            if method != "POST":
                return 405, _error("use POST for infer"), [(b"allow", b"POST")]
            body = await _read_body(headers, receive, max_body)
            return await _infer(service, model, version, headers, body, peer=lambda: _peer(scope))
        if method not in ("GET", "HEAD"):
            return 405, _error(f"use GET for {path}"), [(b"allow", b"GET")]
        if action == "/ready":
            if service.model_ready(model, version):
                return 200, b"", []
            return 400, _error(f"model {model!r} is not ready"), []
        return 200, _json(service.model_metadata(model, version)), []
    shm = _SHM_ROUTE.match(path)
    if shm is not None:
        return await _shared_memory(service, scope, shm, headers, receive)
    if method not in ("GET", "HEAD"):
        known = path in ("/v2", "/v2/health/live", "/v2/health/ready", "/metrics")
        return (405, _error(f"use GET for {path}"), []) if known else _not_found(path)
    if path == "/v2/health/live":
        return (200, b"", []) if service.live() else (400, _error("not live"), [])
    if path == "/v2/health/ready":
        return (200, b"", []) if service.ready() else (400, _error("not ready"), [])
    if path in ("/v2", "/v2/"):
        return 200, _json(service.server_metadata()), []
    if path == "/metrics":
        return 200, service.metrics.exposition(), [_METRICS_TYPE]
    return _not_found(path)


def _not_found(path: str) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    return 404, _error(f"no route {path}"), []


def _peer(scope: Scope) -> Peer:
    """The client process behind this request (``agent.api._peer``)."""
    lookup = scope.get(PEER_SCOPE_KEY)
    if lookup is not None:
        peer: Peer = lookup()
        return peer
    client, server = scope.get("client"), scope.get("server")
    if client:
        return peer_of_address((client[0], client[1]), (server[0], server[1]) if server else None)
    return Peer(None, "unknown peer")


async def _shared_memory(
    service: InferenceService,
    scope: Scope,
    match: re.Match[str],
    headers: dict[bytes, bytes],
    receive: Receive,
) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    kind, name, action = cast(Kind, match.group(1)), match.group(2), match.group(3)
    registry = service.shared_memory
    if action == "status":
        if scope["method"] not in ("GET", "HEAD"):
            return 405, _error("use GET for status"), [(b"allow", b"GET")]
        return 200, _json(registry.status(_peer(scope), kind, name)), []
    if scope["method"] != "POST":
        return 405, _error(f"use POST for {action}"), [(b"allow", b"POST")]
    if action == "unregister":
        registry.unregister(_peer(scope), kind, name)
        return 200, b"", []
    if name is None:
        return _not_found(scope["path"])
    body = await _read_body(headers, receive, _REGISTER_BODY_LIMIT)
    if kind == "system":
        sys_req: SystemRegisterBody = parse_body(SystemRegisterBody, body)
        registry.register_system(_peer(scope), name, sys_req.key, sys_req.offset, sys_req.byte_size)
    else:
        cuda_req: CudaRegisterBody = parse_body(CudaRegisterBody, body)
        registry.register_cuda(
            _peer(scope), name, cuda_req.handle(), cuda_req.device_id, cuda_req.byte_size
        )
    return 200, b"", []


async def _infer(
    service: InferenceService,
    model: str,
    version: str | None,
    headers: dict[bytes, bytes],
    body: bytes,
    *,
    peer: Callable[[], Peer],
) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    raw_len = headers.get(b"inference-header-content-length")
    header = raw_len.decode("latin-1") if raw_len is not None else None
    split = split_http_request(body, header)
    if split is None:
        request = decode_http_request(model, version, body, header)
        response = await asyncio.wrap_future(service.submit(request))
        payload, json_len = encode_http_response(response)
    else:
        rest, rest_header, plan = split
        client = peer()
        request = decode_http_request(model, version, rest, rest_header)
        attach_inputs(service.shared_memory, client, request, plan)
        response = await asyncio.wrap_future(service.submit(request))
        placed = place_outputs(service.shared_memory, client, response, plan)
        payload, json_len = merge_http_response(*encode_http_response(response), placed)
    if json_len is None:
        return 200, payload, []
    return (
        200,
        payload,
        [
            (b"content-type", b"application/octet-stream"),
            (b"inference-header-content-length", str(json_len).encode()),
        ],
    )


async def _read_body(headers: dict[bytes, bytes], receive: Receive, max_body: int) -> bytes:
    declared = headers.get(b"content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise RequestError("Content-Length is not an integer") from None
        if length > max_body:
            raise RequestError(
                f"body of {length} bytes is over the {max_body}-byte limit", status_code=413
            )
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGoneError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_body:
            raise RequestError(f"body is over the {max_body}-byte limit", status_code=413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    encoding = headers.get(b"content-encoding", b"identity").lower()
    if encoding in (b"gzip", b"deflate"):
        body = _decompress(body, encoding, max_body)
    elif encoding != b"identity":
        raise RequestError(
            f"Content-Encoding {encoding.decode('latin-1')!r} is not supported", status_code=415
        )
    return body


def _decompress(body: bytes, encoding: bytes, max_body: int) -> bytes:
    wbits = 16 + zlib.MAX_WBITS if encoding == b"gzip" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, max_body + 1)
    except zlib.error as exc:
        raise RequestError(f"body is not valid {encoding.decode()}: {exc}") from None
    if len(out) > max_body:
        raise RequestError(f"decompressed body is over the {max_body}-byte limit", status_code=413)
    if not inflater.eof:
        raise RequestError(f"{encoding.decode()} body is truncated")
    return out


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _reply(send: Send, status: int, body: bytes, *, extra: list[tuple[bytes, bytes]]) -> None:
    headers = extra if any(k == b"content-type" for k, _ in extra) else [_JSON, *extra]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def _error(message: str) -> bytes:
    return _json({"error": message})
