"""The idle poll's fast path: a 304 straight from the in-memory caches, before routing.

An idle device polls ``GET /v1/devices/{id}/desired-state`` with ``If-None-Match`` and almost
always gets 304. When its credential and its desired state are both cached and the ETag
matches, this ASGI middleware answers at once (no routing, no dependencies, no database).
Anything else (a miss, another ETag, an operator token, a wrong device) goes on to the route,
which applies the same rules and fills the caches.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Receive, Scope, Send

from control_plane.auth import DEVICE_TOKEN_PREFIX, hash_token
from control_plane.context import AppContext
from control_plane.desired import etag_matches

__all__ = ["DESIRED_STATE_ROUTE", "FastPollMiddleware"]

DESIRED_STATE_ROUTE = "/v1/devices/{device_id}/desired-state"
_PATH = re.compile(r"^/v1/devices/([a-z0-9-]{1,40})/desired-state$")
_BEARER = b"bearer " + DEVICE_TOKEN_PREFIX.encode()


class FastPollMiddleware:
    def __init__(self, app: ASGIApp, ctx: AppContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and await self._answered(scope, send)
        ):
            return
        await self.app(scope, receive, send)

    async def _answered(self, scope: Scope, send: Send) -> bool:
        match = _PATH.match(scope["path"])
        if match is None:
            return False
        authorization = if_none_match = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"if-none-match":
                if_none_match = value
        if authorization is None or if_none_match is None:
            return False
        if authorization[: len(_BEARER)].lower() != _BEARER:
            return False
        token = authorization[len(b"bearer ") :].decode("latin-1").strip()
        device_id = match.group(1)
        if self.ctx.credentials.get(hash_token(token)) != device_id:
            return False
        entry = self.ctx.desired.get(device_id)
        if entry is None or not etag_matches(if_none_match.decode("latin-1"), entry.etag):
            return False
        scope["route_template"] = DESIRED_STATE_ROUTE
        self.ctx.metrics.desired_polls.labels("not_modified", "hit").inc()
        await send(
            {
                "type": "http.response.start",
                "status": 304,
                "headers": [
                    (b"etag", entry.etag.encode()),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})
        return True
