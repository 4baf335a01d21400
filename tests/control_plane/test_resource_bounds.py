"""Resource bounds of the control plane, against the real process (``edgectl serve``): headers and
bodies over their bounds, credentials checked before a large body is read, upload checks that
would unpack or allocate far more than the upload, and device-reported fields over their bounds.

Every case asserts a 4xx (never a 5xx); the process's peak memory (``VmHWM``, reset after a
warm-up that ran a full build) over all cases must stay within 64 MiB of its idle size. Big
bodies go over raw sockets so a test can see whether the server answered before it read them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.control_plane.conftest import (
    ADMIN,
    ADMIN_TOKEN,
    BOOTSTRAP_TOKEN,
    SampleFiles,
    free_port,
    upload_files,
    wait_job,
    x86_profile,
)

MiB = 1024 * 1024
BIG = 64 * MiB
UPLOAD_REQUEST_LIMIT = 128 * MiB
UPLOAD_FILE_LIMIT = 16 * MiB
MEMORY_BUDGET = 64 * MiB  # peak over idle, all cases together


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} for {pid}")


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    statuses: dict[str, list[int]] = field(default_factory=dict)
    peaks: dict[str, int] = field(default_factory=dict)  # the peak after each kind's last case

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def peak(self) -> int:
        return _status_kib(self.proc.pid, "VmHWM")

    def record(self, kind: str, status: int) -> None:
        self.statuses.setdefault(kind, []).append(status)
        self.peaks[kind] = self.peak()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("bounds-cp")
    port = free_port()
    env = {
        **os.environ,
        "EDGEFLEET_CP__DATA_DIR": str(root / "data"),
        "EDGEFLEET_CP__BOOTSTRAP_TOKEN": BOOTSTRAP_TOKEN,
        "EDGEFLEET_CP__ADMIN_TOKEN": ADMIN_TOKEN,
        "EDGEFLEET_CP__MAX_UPLOAD_REQUEST_BYTES": str(UPLOAD_REQUEST_LIMIT),
        "EDGEFLEET_CP__MAX_UPLOAD_BYTES": str(UPLOAD_FILE_LIMIT),
        "EDGEFLEET_CP__MAX_SAMPLE_SET_BYTES": str(64 * MiB),
        "EDGEFLEET_CP__MAX_MODEL_CONSTANT_BYTES": str(64 * MiB),
        "EDGEFLEET_CP__LOG_LEVEL": "warning",
    }
    edgectl = Path(sys.executable).with_name("edgectl")
    proc = subprocess.Popen(
        [str(edgectl), "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    srv = Server(proc, port, root / "data")
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{srv.url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("edgectl serve did not start")
        time.sleep(0.1)
    try:
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- raw HTTP over a socket --------------------------------------------------------------------


def _read_status(sock: socket.socket, timeout: float = 30.0) -> int:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a status line: {data[:200]!r}")
        data += chunk
    return int(data.split(b" ", 2)[1])


def raw_request(
    port: int,
    head: bytes,
    body: Iterator[bytes] | None = None,
) -> tuple[int, int]:
    """Send ``head`` and then ``body`` (from a thread, stopping when the server hangs up); the
    answer's status and how many body bytes the server accepted before answering."""
    sent = [0]
    answered = threading.Event()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head)

        def pump() -> None:
            try:
                for chunk in body or iter(()):
                    if answered.is_set():
                        return
                    sock.sendall(chunk)
                    sent[0] += len(chunk)
            except OSError:
                return

        sender = threading.Thread(target=pump, daemon=True)
        sender.start()
        try:
            status = _read_status(sock)
        finally:
            answered.set()
        sender.join(timeout=30)
    return status, sent[0]


def _chunks(total: int, size: int = MiB, fill: bytes = b"a") -> Iterator[bytes]:
    block = fill * size
    left = total
    while left > 0:
        yield block[: min(size, left)]
        left -= size


def _chunked(inner: Iterator[bytes]) -> Iterator[bytes]:
    for chunk in inner:
        yield b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    yield b"0\r\n\r\n"


def _head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _multipart_stream(total: int, boundary: str = "b0undary") -> tuple[Iterator[bytes], int]:
    """A multipart upload with one ``onnx`` file of ``total`` bytes; the stream and its length."""
    start = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="version"\r\n\r\n2.0.0\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="onnx"; filename="m.onnx"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    end = f"\r\n--{boundary}--\r\n".encode()

    def stream() -> Iterator[bytes]:
        yield start
        yield from _chunks(total)
        yield end

    return stream(), len(start) + total + len(end)


# --- fixtures on the server ------------------------------------------------------------------


@pytest.fixture(scope="module")
def warm(server: Server, digits_path: Path, digits_sets: SampleFiles) -> dict[str, Any]:
    """A model with one version (which loads the upload checks' libraries) and an enrolled
    device; then the idle peak is taken."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.post("/v1/models", json={"name": "digits"}, headers=ADMIN).status_code == 201
        r = c.post(
            "/v1/models/digits/versions",
            data={"version": "1.0.0"},
            files=upload_files(digits_path, digits_sets),
            headers=ADMIN,
        )
        assert r.status_code == 202, r.text
        job = wait_job(c, r.json()["job"]["id"], timeout=300)  # the full build, in the process
        assert job["status"] == "succeeded", job
        body = {
            "bootstrap_token": BOOTSTRAP_TOKEN,
            "name": "robot-1",
            "profile": x86_profile().model_dump(mode="json"),
            "labels": {},
        }
        r = c.post("/v1/devices/enroll", json=body)
        assert r.status_code == 201, r.text
        enrolled = r.json()
        for _ in range(20):
            c.get("/v1/devices", headers=ADMIN)
    # Reset the high-water mark to the present resident size (Linux: clear_refs "5"), so the
    # peak measured afterwards is the cases', not the warm-up build's.
    Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")
    return {
        "idle_peak": server.peak(),
        "device_id": enrolled["device_id"],
        "device_auth": f"Bearer {enrolled['credential']}",
    }


# --- body and header bounds ------------------------------------------------------------------


def test_unauthenticated_upload_is_refused_before_its_body(
    server: Server, warm: dict[str, Any]
) -> None:
    for auth in ({}, {"Authorization": "Bearer wrong-token-0123456789"}):
        stream, length = _multipart_stream(BIG)
        head = _head(
            "POST",
            "/v1/models/digits/versions",
            {
                **auth,
                "Content-Type": "multipart/form-data; boundary=b0undary",
                "Content-Length": str(length),
            },
        )
        # no body at all: the 401 must come without it
        status, _ = raw_request(server.port, head)
        server.record("body", status)
        assert status == 401
        # the whole 64 MiB offered: still a 401, and the server stops taking it early
        status, sent = raw_request(server.port, head, stream)
        server.record("body", status)
        assert status == 401
        assert sent < length


def test_big_enrollment_body_is_refused_unread(server: Server, warm: dict[str, Any]) -> None:
    head = _head(
        "POST",
        "/v1/devices/enroll",
        {"Content-Type": "application/json", "Content-Length": str(BIG)},
    )
    status, _ = raw_request(server.port, head)  # declared: refused without a byte read
    server.record("body", status)
    assert status == 413
    prefix = json.dumps({"bootstrap_token": "wrong-token-0123456789", "name": "x" * 16})
    body = iter([prefix[:-1].encode() + b', "pad": "', *_chunks(BIG, fill=b"x"), b'"}'])
    head = _head(
        "POST",
        "/v1/devices/enroll",
        {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
    )
    status, sent = raw_request(server.port, head, _chunked(body))
    server.record("body", status)
    assert status == 413
    assert sent < BIG


def test_oversized_headers_are_refused(server: Server, warm: dict[str, Any]) -> None:
    for size in (20 * 1024, 8 * MiB):
        head = _head(
            "GET", "/v1/models", {"Authorization": ADMIN["Authorization"], "X-Pad": "p" * size}
        )
        try:
            status, _ = raw_request(server.port, head)
        except ConnectionError:
            status = 0  # hung up on: refused as well
        server.record("headers", status)
        assert status in (0, 400, 431), status


def test_authenticated_uploads_over_the_bounds(server: Server, warm: dict[str, Any]) -> None:
    auth = {"Authorization": ADMIN["Authorization"]}
    stream, length = _multipart_stream(3 * BIG)
    head = _head(
        "POST",
        "/v1/models/digits/versions",
        {
            **auth,
            "Content-Type": "multipart/form-data; boundary=b0undary",
            "Content-Length": str(length),
        },
    )
    status, _ = raw_request(server.port, head)  # declared over the request bound
    server.record("body", status)
    assert status == 413
    # chunked, 64 MiB: cut off at the file bound (16 MiB)
    stream, _ = _multipart_stream(BIG)
    head = _head(
        "POST",
        "/v1/models/digits/versions",
        {
            **auth,
            "Content-Type": "multipart/form-data; boundary=b0undary",
            "Transfer-Encoding": "chunked",
        },
    )
    status, sent = raw_request(server.port, head, _chunked(stream))
    server.record("body", status)
    assert status == 413
    assert sent < BIG
    assert not list((server.data_dir / "tmp").iterdir())  # scratch cleaned up


# --- upload checks ---------------------------------------------------------------------------


def _npz_bomb(path: Path, unpacked: int) -> Path:
    """An .npz whose one float32 array unpacks to ``unpacked`` bytes of zeros (~1000x)."""
    with (
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive,
        archive.open("input.npy", "w", force_zip64=True) as out,
    ):
        np.lib.format.write_array_header_1_0(
            out,
            {"descr": "<f4", "fortran_order": False, "shape": (unpacked // 256, 1, 8, 8)},
        )
        for chunk in _chunks(unpacked, 4 * MiB, b"\0"):
            out.write(chunk)
    return path


def _constant_bomb(path: Path, kind: str) -> Path:
    elements = 2**28  # 1 GiB of float32
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    if kind == "ConstantOfShape":
        nodes += [
            helper.make_node(
                "Constant",
                [],
                ["shape"],
                value=helper.make_tensor("s", TensorProto.INT64, [1], [elements]),
            ),
            helper.make_node("ConstantOfShape", ["shape"], ["big"]),
        ]
    elif kind == "Expand":
        nodes += [
            helper.make_node(
                "Constant",
                [],
                ["one"],
                value=helper.make_tensor("o", TensorProto.FLOAT, [1], [1.0]),
            ),
            helper.make_node(
                "Constant",
                [],
                ["shape"],
                value=helper.make_tensor("s", TensorProto.INT64, [2], [2**14, 2**14]),
            ),
            helper.make_node("Expand", ["one", "shape"], ["big"]),
        ]
    else:
        nodes += [
            helper.make_node(
                "Constant", [], [n], value=helper.make_tensor(n, TensorProto.FLOAT, [], [v])
            )
            for n, v in (("start", 0.0), ("limit", float(elements)), ("delta", 1.0))
        ]
        nodes.append(helper.make_node("Range", ["start", "limit", "delta"], ["big"]))
    graph = helper.make_graph(
        nodes,
        "bomb",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8]),
            helper.make_tensor_value_info("big", TensorProto.FLOAT, None),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def _lying_initializer(path: Path) -> Path:
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2**14, 2**14])  # holds nothing
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "liar",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2**14, 2**14])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2**14, 2**14])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path.write_bytes(model.SerializeToString())
    return path


def test_upload_checks_stay_bounded(
    server: Server,
    warm: dict[str, Any],
    digits_path: Path,
    digits_sets: SampleFiles,
    tmp_path: Path,
) -> None:
    cases: list[tuple[str, dict[str, Any], str]] = []
    bomb = _npz_bomb(tmp_path / "bomb.npz", 512 * MiB)
    assert bomb.stat().st_size < MiB
    files = upload_files(digits_path, digits_sets)
    files["calibration"] = ("cal.npz", bomb.read_bytes(), "application/octet-stream")
    cases.append(("npz 0.5 MB -> 512 MiB", files, "unpack"))
    obj = tmp_path / "obj.npz"
    np.savez(obj, input=np.array([1, "a"], dtype=object))
    files = upload_files(digits_path, digits_sets)
    files["calibration"] = ("cal.npz", obj.read_bytes(), "application/octet-stream")
    cases.append(("npz object array", files, "object"))
    for kind in ("ConstantOfShape", "Expand", "Range"):
        model = _constant_bomb(tmp_path / f"{kind}.onnx", kind)
        files = upload_files(model, digits_sets)
        cases.append((f"onnx {kind} -> 1 GiB ({model.stat().st_size} bytes)", files, "limit"))
    files = upload_files(_lying_initializer(tmp_path / "liar.onnx"), digits_sets)
    cases.append(("onnx initializer declaring 1 GiB", files, "onnx"))
    with httpx.Client(base_url=server.url, timeout=120) as c:
        for what, files, word in cases:
            r = c.post(
                "/v1/models/digits/versions", data={"version": "3.0.0"}, files=files, headers=ADMIN
            )
            server.record("upload", r.status_code)
            assert r.status_code == 422, (what, r.text)
            assert word in r.json()["message"], (what, r.text)


# --- device-reported fields ------------------------------------------------------------------


def test_device_reported_fields_are_bounded(server: Server, warm: dict[str, Any]) -> None:
    device_id, auth = warm["device_id"], {"Authorization": warm["device_auth"]}
    base = {
        "device_id": device_id,
        "agent_version": "0.1.0",
        "updated_at": "2026-01-01T00:00:00Z",
        "models": [{"name": "digits", "phase": "failed", "last_error": "e"}],
    }
    path = f"/v1/devices/{device_id}/reported-state"
    profile = x86_profile().model_dump(mode="json")
    with httpx.Client(base_url=server.url, timeout=60) as c:
        cases: list[tuple[str, str, str, Any, int]] = [
            (
                "8 MiB last_error",
                "PUT",
                path,
                {**base, "models": [{"name": "digits", "last_error": "e" * (8 * MiB)}]},
                413,
            ),
            (
                "3000-char last_error",
                "PUT",
                path,
                {**base, "models": [{"name": "digits", "last_error": "e" * 3000}]},
                422,
            ),
            (
                "control char in last_error",
                "PUT",
                path,
                {**base, "models": [{"name": "digits", "last_error": "a\x00b"}]},
                422,
            ),
            ("bad model name", "PUT", path, {**base, "models": [{"name": "../x"}]}, 422),
            (
                "bad version",
                "PUT",
                path,
                {**base, "models": [{"name": "digits", "active_version": "x" * 100}]},
                422,
            ),
            (
                "65 models",
                "PUT",
                path,
                {**base, "models": [{"name": f"m{i}"} for i in range(65)]},
                422,
            ),
            ("long agent_version", "PUT", path, {**base, "agent_version": "v" * 65}, 422),
            (
                "many flags",
                "PUT",
                f"/v1/devices/{device_id}/profile",
                {**profile, "cpu": {"cores": 2, "flags": ["f"] * 257}},
                422,
            ),
            (
                "long arch",
                "PUT",
                f"/v1/devices/{device_id}/profile",
                {**profile, "arch": "a" * 65},
                422,
            ),
            (
                "long runtime reason",
                "PUT",
                f"/v1/devices/{device_id}/profile",
                {**profile, "runtimes": [{"name": "x", "version": "1", "reason": "r" * 1001}]},
                422,
            ),
            (
                "long enrollment name",
                "POST",
                "/v1/devices/enroll",
                {"bootstrap_token": BOOTSTRAP_TOKEN, "name": "n" * 65, "profile": profile},
                422,
            ),
        ]
        for what, method, url, body, want in cases:
            r = c.request(method, url, json=body, headers=auth)
            server.record("fields", r.status_code)
            assert r.status_code == want, (what, r.status_code, r.text[:300])
        r = c.put(path, json=base, headers=auth)
        assert r.status_code == 200, r.text
        listing = c.get("/v1/devices", headers=ADMIN)
        assert listing.status_code == 200
        assert len(listing.content) < 64 * 1024


def test_peak_memory_and_no_server_errors(server: Server, warm: dict[str, Any]) -> None:
    """Runs last in this module: the figures over every case above."""
    peak = server.peak()
    grown = peak - warm["idle_peak"]
    counts = {kind: len(s) for kind, s in server.statuses.items()}
    errors = [s for statuses in server.statuses.values() for s in statuses if s >= 500]
    print(  # the figures, for the record (pytest -s)
        f"\nidle peak {warm['idle_peak'] / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB, "
        f"grown {grown / MiB:.1f} MiB; cases {counts}; 5xx {len(errors)}; peaks after "
        f"{ {k: round(v / MiB, 1) for k, v in server.peaks.items()} }"
    )
    assert errors == []
    assert grown <= MEMORY_BUDGET, f"peak grew {grown / MiB:.1f} MiB over idle"
    assert server.proc.poll() is None  # still serving
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
