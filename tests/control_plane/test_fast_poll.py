"""The idle poll's fast path: answered in front of the framework, counted, and never too eager."""

from __future__ import annotations

import re

import httpx

from tests.control_plane.conftest import enroll

ROUTE = 'route="/v1/devices/{device_id}/desired-state"'


def metric(client: httpx.Client, pattern: str) -> float:
    """One sample of /metrics (0 when absent); ``pattern`` is the name and labels, regex-escaped."""
    found = re.search(rf"^{pattern} (\S+)$", client.get("/metrics").text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def fast_hits(client: httpx.Client) -> float:
    return metric(
        client,
        r'edgefleet_cp_desired_state_polls_total\{cache="hit",result="not_modified"\}',
    )


def test_idle_poll_answered_from_the_caches_and_counted_like_any_request(
    client: httpx.Client,
) -> None:
    device_id, device = enroll(client)
    url = f"/v1/devices/{device_id}/desired-state"
    first = client.get(url, headers=device)
    assert first.status_code == 200
    etag = first.headers["ETag"]

    for _ in range(3):
        idle = client.get(url, headers={**device, "If-None-Match": etag})
        assert idle.status_code == 304
        assert idle.headers["ETag"] == etag
        assert idle.headers["Cache-Control"] == "no-cache"
        assert idle.content == b""

    assert fast_hits(client) == 3
    requests_304 = metric(
        client,
        rf'edgefleet_cp_http_requests_total\{{method="GET",{re.escape(ROUTE)},status="304"\}}',
    )
    assert requests_304 == 3
    # the first (200) through the framework, the three 304s in front of it: one histogram
    latency_count = metric(
        client, rf"edgefleet_cp_http_request_seconds_count\{{{re.escape(ROUTE)}\}}"
    )
    assert latency_count == 4


def test_polls_the_fast_path_must_not_answer_go_on_to_the_route(client: httpx.Client) -> None:
    device_id, device = enroll(client, "robot-a")
    other_id, other = enroll(client, "robot-b")
    url = f"/v1/devices/{device_id}/desired-state"
    etag = client.get(url, headers=device).headers["ETag"]
    other_url = f"/v1/devices/{other_id}/desired-state"
    other_etag = client.get(other_url, headers=other).headers["ETag"]
    token = device["Authorization"].removeprefix("Bearer ")

    not_for_the_fast_path = [
        ("GET", url, {**device, "If-None-Match": '"stale"'}, 200),
        ("GET", url, device, 200),  # no If-None-Match
        ("GET", other_url, {**device, "If-None-Match": other_etag}, 403),  # another's state
        ("GET", url, {"Authorization": f"Bearer {token}x", "If-None-Match": etag}, 401),
        ("GET", url, {"Authorization": f"Basic {token}", "If-None-Match": etag}, 401),
        (
            "GET",
            f"/v1/devices/{device_id.upper()}/desired-state",
            {**device, "If-None-Match": etag},
            None,
        ),
        ("GET", url + "/", {**device, "If-None-Match": etag}, None),
        ("HEAD", url, {**device, "If-None-Match": etag}, None),
        ("POST", url, {**device, "If-None-Match": etag}, None),
    ]
    for method, path, headers, status in not_for_the_fast_path:
        r = client.request(method, path, headers=headers, follow_redirects=False)
        assert r.status_code != 304, (method, path, headers)
        if status is not None:
            assert r.status_code == status, (method, path, r.status_code, r.text)
    assert fast_hits(client) == 0

    # the control: the same device, its own ETag, now answered by the fast path
    assert client.get(url, headers={**device, "If-None-Match": etag}).status_code == 304
    assert fast_hits(client) == 1
