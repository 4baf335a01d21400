"""Request bounds applied before anything is parsed: the header block and each route's body.

Owns how much one request can make the service read and hold, whoever sends it:

- Headers: the server is run with h11 and ``h11_max_incomplete_event_size`` set to
  ``max_header_bytes`` (``server_options``), so an oversized header block is refused while it
  is being received (400, connection closed). The middleware checks the parsed total as well
  (431) for servers started another way.
- Bodies: each route has a bound, picked by method and path before routing. A declared
  ``Content-Length`` over it is answered 413 at once, without reading a byte of the body; a
  body without one (chunked) is counted as it arrives and cut off at the bound.
- Small-bodied routes (everything but uploads, JSON in practice) have their body read here up
  to the bound and handed on whole, so the framework never sees more than the bound.
- Upload routes stream: the route checks the caller's credential (its dependencies run before
  it reads) and only then reads the body (``control_plane.api.multipart``), counted here.

Who may call a route and what its body must hold stay with the routes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from control_plane.errors import (
    HeadersTooLargeError,
    PayloadTooLargeError,
    RequestError,
)
from control_plane.settings import Settings

__all__ = ["RequestLimits", "RequestLimitsMiddleware", "server_options"]

_UPLOAD_ROUTE = re.compile(r"^/v1/models/[^/]+/versions/?$")
_HEADER_OVERHEAD = 4  # ": " and CRLF per header line


@dataclass(frozen=True)
class RequestLimits:
    """Bounds in bytes: the header block, small (JSON) bodies, upload bodies."""

    header_bytes: int
    json_body_bytes: int
    upload_body_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> RequestLimits:
        return cls(
            header_bytes=settings.max_header_bytes,
            json_body_bytes=settings.max_json_body_bytes,
            upload_body_bytes=settings.max_upload_request_bytes,
        )

    def body_limit(self, method: str, path: str) -> tuple[int, bool]:
        """The body bound of a request, and whether its route streams the body itself (after
        checking the caller) rather than taking it whole."""
        if method == "POST" and _UPLOAD_ROUTE.match(path):
            return self.upload_body_bytes, True
        return self.json_body_bytes, False


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn options that bound what the server buffers before the app sees a request."""
    return {"http": "h11", "h11_max_incomplete_event_size": settings.max_header_bytes}


async def _refuse(send: Send, exc: RequestError) -> None:
    """Answer ``exc`` as the API's JSON error and close the connection (the rest of the body,
    if any, is never read)."""
    body = json.dumps(
        {"error": type(exc).__name__, "message": str(exc), "detail": None},
        separators=(",", ":"),
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": exc.status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _declared_length(headers: list[tuple[bytes, bytes]]) -> tuple[int | None, bool]:
    """``Content-Length`` (None if absent) and whether a body is announced at all."""
    length: int | None = None
    chunked = False
    for name, value in headers:
        if name == b"content-length":
            if not value.isdigit() or len(value) > 19:
                raise RequestError("Content-Length is not a byte count")
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = True
    return length, chunked or bool(length)


class RequestLimitsMiddleware:
    """Pure ASGI middleware enforcing ``RequestLimits`` (see the module doc)."""

    def __init__(self, app: ASGIApp, limits: RequestLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        size = sum(len(n) + len(v) + _HEADER_OVERHEAD for n, v in headers)
        if size > self.limits.header_bytes:
            await _refuse(
                send,
                HeadersTooLargeError(
                    f"headers of {size} bytes are over the {self.limits.header_bytes}-byte limit"
                ),
            )
            return
        limit, streamed = self.limits.body_limit(scope["method"], scope["path"])
        try:
            length, has_body = _declared_length(headers)
        except RequestError as exc:
            await _refuse(send, exc)
            return
        if length is not None and length > limit:
            await _refuse(send, _too_large(limit, length))
            return
        if not has_body:
            await self.app(scope, receive, send)
        elif streamed:
            await self._streamed(scope, receive, send, limit)
        else:
            await self._buffered(scope, receive, send, limit)

    async def _buffered(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left; nothing to answer
            body += message.get("body", b"")
            if len(body) > limit:
                await _refuse(send, _too_large(limit))
                return
            if not message.get("more_body", False):
                break
        whole: list[Message] = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replay() -> Message:
            return whole.pop() if whole else await receive()

        await self.app(scope, replay, send)

    async def _streamed(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(limit)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except PayloadTooLargeError as exc:
            if started:
                raise
            await _refuse(send, exc)


def _too_large(limit: int, length: int | None = None) -> PayloadTooLargeError:
    size = f"of {length} bytes " if length is not None else ""
    return PayloadTooLargeError(
        f"request body {size}is over the {limit}-byte limit for this route", limit=limit
    )
