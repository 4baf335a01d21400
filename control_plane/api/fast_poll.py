"""The idle poll's fast path: a 304 straight from the in-memory caches, before the framework.

An idle device polls ``GET /v1/devices/{id}/desired-state`` with ``If-None-Match`` and almost
always gets 304. When its credential and its desired state are both cached and the ETag
matches, ``ControlPlaneAPI`` answers at once, in front of FastAPI itself: no framework
middleware, no routing, no dependencies, no database. Anything else (a miss, another ETag, an
operator token, a wrong device, any other request) goes on to FastAPI and the route, which
applies the same rules and fills the caches.

A device's answered poll refreshes its ``last_seen_at`` through ``control_plane.presence``
(noted in memory here, written coalesced by its thread).

The answered polls are counted in the same metrics the request middleware keeps for every
other request (``edgefleet_cp_http_requests_total``, ``..._request_seconds``) and in
``edgefleet_cp_desired_state_polls_total{result="not_modified",cache="hit"}``; the label sets
are bound once, so a hit costs no label lookup. The caches and their invalidation belong to
``control_plane.desired``; the credential rules to ``control_plane.api.deps``.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from control_plane.api.links import add_links
from control_plane.auth import DEVICE_TOKEN_PREFIX, hash_token
from control_plane.context import AppContext
from control_plane.desired import etag_matches

__all__ = ["DESIRED_STATE_ROUTE", "ControlPlaneAPI", "FastPoll"]

DESIRED_STATE_ROUTE = "/v1/devices/{device_id}/desired-state"
_PREFIX, _SUFFIX = "/v1/devices/", "/desired-state"
_MAX_DEVICE_ID = 40
_DEVICE_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_BEARER = b"bearer "
_DEVICE_BEARER = _BEARER + DEVICE_TOKEN_PREFIX.encode()


class FastPoll:
    """Answers a cached, unchanged desired-state poll with 304; says whether it did."""

    def __init__(self, ctx: AppContext) -> None:
        self._credentials = ctx.credentials
        self._desired = ctx.desired
        self._presence = ctx.presence
        metrics = ctx.metrics
        self._hits = metrics.desired_polls.labels("not_modified", "hit")
        self._requests = metrics.requests.labels(DESIRED_STATE_ROUTE, "GET", "304")
        self._latency = metrics.latency.labels(DESIRED_STATE_ROUTE)

    async def answered(self, scope: Scope, send: Send) -> bool:
        start = time.perf_counter()
        path: str = scope["path"]
        if scope["method"] != "GET" or not path.startswith(_PREFIX) or not path.endswith(_SUFFIX):
            return False
        device_id = path[len(_PREFIX) : -len(_SUFFIX)]
        if not 0 < len(device_id) <= _MAX_DEVICE_ID or not _DEVICE_ID_CHARS.issuperset(device_id):
            return False
        authorization = if_none_match = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"if-none-match":
                if_none_match = value
        if authorization is None or if_none_match is None:
            return False
        if authorization[: len(_DEVICE_BEARER)].lower() != _DEVICE_BEARER:
            return False
        # keyed by the credential's SHA-256, as in the database: a lookup by digest leaks
        # nothing usable about the credential through timing
        token = authorization[len(_BEARER) :].decode("latin-1").strip()
        if self._credentials.get(hash_token(token)) != device_id:
            return False
        entry = self._desired.get(device_id)
        if entry is None or not etag_matches(if_none_match.decode("latin-1"), entry.etag):
            return False
        await send(
            {
                "type": "http.response.start",
                "status": 304,
                "headers": [(b"etag", entry.etag.encode()), (b"cache-control", b"no-cache")],
            }
        )
        await send({"type": "http.response.body", "body": b""})
        if self._presence is not None:
            self._presence.seen(device_id)
        self._hits.inc()
        self._requests.inc()
        self._latency.observe(time.perf_counter() - start)
        return True


class ControlPlaneAPI(FastAPI):
    """FastAPI with the idle poll answered in front of the framework (see the module doc)."""

    fast_poll: FastPoll | None = None

    def openapi(self) -> dict[str, Any]:
        """The generated spec with the links between operations (``control_plane.api.links``)."""
        if self.openapi_schema is None:
            self.openapi_schema = add_links(super().openapi())
        return self.openapi_schema

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fast_poll = self.fast_poll
        if (
            fast_poll is not None
            and scope["type"] == "http"
            and await fast_poll.answered(scope, send)
        ):
            return
        await super().__call__(scope, receive, send)
