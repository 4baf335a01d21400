"""The update client against the real control plane when the answers turn hostile: a desired
state with entries that break the contract (each refused alone, reported, the valid entry still
applied), and answers past their size bound (dropped with ``ResponseTooLargeError``'s log event,
not read to the end). The tampering is done in the HTTP transport, between the two real sides."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from structlog.testing import capture_logs

from agent.contracts.state import parse_desired_state
from agent.samples import DigitsData

from .fleet import ControlPlane, Device

Tamper = Callable[[httpx.Request, httpx.Response], httpx.Response | None]


class TamperingTransport(httpx.BaseTransport):
    """The real transport, with a hook that may replace an answer."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.tamper: Tamper | None = None
        self.bytes_sent_by_tamper = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if self.tamper is None:
            return response
        response.read()
        response.close()
        replaced = self.tamper(request, response)
        if replaced is None:  # the body was read: hand on a fresh answer holding it
            return httpx.Response(
                response.status_code,
                headers=response.headers,
                stream=httpx.ByteStream(response.content),
            )
        return replaced

    def close(self) -> None:
        self.inner.close()  # its pooled connections, or they leak as unclosed sockets


@pytest.fixture(scope="module")
def cp(
    tmp_path_factory: pytest.TempPathFactory, digits_path: Path, digits: DigitsData
) -> Iterator[ControlPlane]:
    root = tmp_path_factory.mktemp("bounds-fleet")
    cal = root / "cal.npz"
    np.savez(cal, input=digits.x_train[:64])
    plane = ControlPlane(root / "cp").start()
    try:
        plane.push(digits_path, cal, name="digits", version="1.0.0")
        yield plane
    finally:
        plane.stop()


@pytest.fixture
def wire() -> TamperingTransport:
    return TamperingTransport()


@pytest.fixture
def device(cp: ControlPlane, wire: TamperingTransport, tmp_path: Path) -> Iterator[Device]:
    http = httpx.Client(timeout=10, transport=wire)
    d = Device(cp, tmp_path / "state", http=http)
    yield d
    d.close()
    http.close()


def _desired_path(request: httpx.Request) -> bool:
    return request.method == "GET" and request.url.path.endswith("/desired-state")


BAD_ENTRIES: list[tuple[str, dict[str, Any]]] = [
    ("name", {"name": ".."}),
    ("name", {"name": "../../etc"}),
    ("version", {"version": "../1.0.0"}),
    ("version", {"version": "1.0"}),
    ("variant_id", {"variant_id": "../x"}),
    ("artifact_path", {"artifact_path": "../../../../etc/passwd"}),
    ("artifact_path", {"artifact_path": "/etc/passwd"}),
    ("artifact_path", {"artifact_path": "bundles/./digits.tar"}),
    ("artifact_path", {"artifact_path": "bundles//digits.tar"}),
    ("rollout_id", {"rollout_id": "x" * 500}),
    ("size", {"size": -1}),
    ("sha256", {"sha256": "nothex"}),
]


def test_contract_refuses_each_bad_entry_alone() -> None:
    good = {
        "name": "digits",
        "version": "1.0.0",
        "variant_id": "onnx-fp32",
        "artifact_path": "bundles/digits/1.0.0/onnx-fp32.tar",
        "sha256": "0" * 64,
        "size": 10,
    }
    for field, change in BAD_ENTRIES:
        doc = {"device_id": "dev-1", "generation": 1, "models": [{**good, **change}, good]}
        parsed = parse_desired_state(json.dumps(doc))
        assert [m.name for m in parsed.state.models] == ["digits"], field
        assert len(parsed.refused) == 1, field
        assert parsed.refused[0].index == 0, field
        assert field in parsed.refused[0].reason, (field, parsed.refused[0].reason)
    doc = {"device_id": "dev-1", "generation": 1, "models": [good, good, 7]}
    parsed = parse_desired_state(json.dumps(doc))
    assert [r.index for r in parsed.refused] == [1, 2]


def test_bad_entries_fail_alone_and_are_reported(
    cp: ControlPlane, device: Device, wire: TamperingTransport
) -> None:
    device.client.tick()  # enrolls
    cp.deploy("digits", "1.0.0", device.device_id)

    def inject(request: httpx.Request, response: httpx.Response) -> httpx.Response | None:
        if not _desired_path(request) or response.status_code != 200:
            return None
        doc = response.json()
        valid = doc["models"][0]
        doc["models"] = [{**valid, **change} for _, change in BAD_ENTRIES] + [valid]
        return httpx.Response(200, headers={"ETag": '"tampered"'}, json=doc)

    wire.tamper = inject
    with capture_logs() as logs:
        device.client.tick()
        device.client.tick()  # and again: no crash, nothing logged twice
    assert device.serving() == "1.0.0"  # the valid entry after the bad ones was applied
    refused = [e for e in logs if e["event"] == "desired_entry_refused"]
    assert len(refused) == len(BAD_ENTRIES)
    assert not [e for e in logs if e["event"] == "update_cycle_crashed"]
    reported = cp.device(device.device_id)["reported"]
    assert [r["index"] for r in reported["refused"]] == list(range(len(BAD_ENTRIES)))
    assert not list((device.state_dir.parent).rglob("passwd"))
    wire.tamper = None
    device.client.tick()
    assert cp.device(device.device_id)["reported"]["refused"] == []


def _endless(chunk: bytes) -> Iterator[bytes]:
    while True:
        yield chunk


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "endless-chunked"])
def test_oversized_desired_state_is_dropped_unread(
    cp: ControlPlane, device: Device, wire: TamperingTransport, declared: bool
) -> None:
    device.client.tick()
    cp.deploy("digits", "1.0.0", device.device_id)
    pulled = [0]

    def counted() -> Iterator[bytes]:
        for chunk in _endless(b" " * 65536):
            pulled[0] += len(chunk)
            yield chunk

    def pad(request: httpx.Request, response: httpx.Response) -> httpx.Response | None:
        if not _desired_path(request):
            return None
        if declared:
            body = response.content + b" " * (2 * 1024 * 1024)
            return httpx.Response(200, headers={"ETag": '"x"'}, content=body)
        return httpx.Response(200, headers={"ETag": '"x"'}, content=counted())

    wire.tamper = pad
    with capture_logs() as logs:
        device.client.tick()
    too_large = [e for e in logs if e["event"] == "control_plane_answer_too_large"]
    assert len(too_large) == 1, logs
    assert too_large[0]["answer"] == "desired state"
    assert too_large[0]["limit"] == 1024 * 1024
    if not declared:
        assert pulled[0] <= 1024 * 1024 + 2 * 65536  # stopped just past the bound
    assert "digits" not in device.store.names()
    wire.tamper = None
    device.client.tick()
    assert device.serving() == "1.0.0"


def test_oversized_enrollment_answer_is_dropped(
    cp: ControlPlane, device: Device, wire: TamperingTransport
) -> None:
    def pad(request: httpx.Request, response: httpx.Response) -> httpx.Response | None:
        if request.url.path.endswith("/enroll"):
            return httpx.Response(201, content=_endless(b"{" * 65536))
        return None

    wire.tamper = pad
    with capture_logs() as logs:
        device.client.tick()
    assert device.client.credential is None
    assert [e["answer"] for e in logs if e["event"] == "control_plane_answer_too_large"] == [
        "enrollment"
    ]
    wire.tamper = None
    device.client.tick()
    assert device.client.credential is not None
