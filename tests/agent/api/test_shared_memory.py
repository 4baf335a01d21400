"""The system shared-memory extension against the unmodified ``tritonclient`` (HTTP and gRPC,
``tritonclient.utils.shared_memory``), served by real ``ModelSlot``s: inputs read from and
outputs written to /dev/shm regions, and every bad region, offset and size a 4xx that leaves the
server live. The region checks themselves are also driven directly, by hypothesis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from agent.api import ApiServer, start_api
from agent.api._peer import Peer, peer_of_address, socket_uid
from agent.api.codec import RequestError
from agent.api.shm import SHM_DIR, SharedMemoryRegistry, TensorRef, check_span, tensor_ref
from agent.config import ApiConfig
from agent.models.slots import SlotRegistry
from agent.samples import DigitsData
from tests.agent.api.conftest import reference, serve

with warnings.catch_warnings():
    # It imports pkg_resources, which warns that it is deprecated.
    warnings.simplefilter("ignore")
    import tritonclient.utils.shared_memory as shm

ME = Peer(os.getuid(), "test")
FLOAT = np.dtype(np.float32).itemsize


@pytest.fixture(scope="module")
def slots(
    tmp_path_factory: pytest.TempPathFactory,
    digits_path: Path,
    ppocr_path: Path,
    digits: DigitsData,
) -> Iterator[SlotRegistry]:
    root = tmp_path_factory.mktemp("shm-store") / "store"
    registry = serve(
        root,
        {
            "digits": (digits_path, {"input": digits.x_test[:2]}, ("1.0.0",)),
            "ppocr-det": (
                ppocr_path,
                {"x": np.zeros((1, 3, 64, 64), np.float32)},
                ("1.0.0",),
            ),
        },
    )
    yield registry
    registry.close()


@pytest.fixture(scope="module")
def api(slots: SlotRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    sock = tmp_path_factory.mktemp("shm-api") / "agent.sock"
    config = ApiConfig(
        http_port=0,
        grpc_port=0,
        unix_socket=sock,
        shm_max_regions=8,
        shm_max_bytes=64 * 1024 * 1024,
    )
    server = start_api(slots, config)
    yield server
    server.stop()


@pytest.fixture
def http(api: ApiServer) -> Iterator[Any]:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{api.http_port}")
    yield client
    client.unregister_system_shared_memory()
    client.close()


@pytest.fixture
def grpc_client(api: ApiServer) -> Iterator[Any]:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{api.grpc_port}")
    yield client
    client.unregister_system_shared_memory()
    client.close()


class Regions:
    """Shared-memory objects made with tritonclient's helpers, destroyed after the test."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def make(self, size: int) -> tuple[str, str, Any]:
        name = f"r{uuid.uuid4().hex[:10]}"
        key = f"/edgefleet-test-{name}"
        handle = shm.create_shared_memory_region(name, key, size)
        self.handles.append(handle)
        return name, key, handle

    def close(self) -> None:
        for handle in self.handles:
            shm.destroy_shared_memory_region(handle)


@pytest.fixture
def regions() -> Iterator[Regions]:
    made = Regions()
    yield made
    made.close()


def _live(api: ApiServer) -> None:
    with httpx.Client() as client:
        assert client.get(f"http://127.0.0.1:{api.http_port}/v2/health/live").status_code == 200


# --- metadata --------------------------------------------------------------------------------


def test_server_metadata_advertises_system_shared_memory(http: Any, grpc_client: Any) -> None:
    for meta in (
        http.get_server_metadata(),
        grpc_client.get_server_metadata(as_json=True),
    ):
        assert "system_shared_memory" in meta["extensions"]
        assert "binary_tensor_data" in meta["extensions"]
        # This machine has no usable CUDA device: the CUDA extension is not offered.
        assert "cuda_shared_memory" not in meta["extensions"]


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_digits_inputs_and_outputs_in_shared_memory(
    transport: str,
    http: Any,
    grpc_client: Any,
    regions: Regions,
    digits: DigitsData,
    digits_path: Path,
) -> None:
    x = np.ascontiguousarray(digits.x_test[:5])
    want = reference(digits_path).run({"input": x})["logits"]
    client, mod = (http, httpclient) if transport == "http" else (grpc_client, grpcclient)
    in_name, in_key, in_handle = regions.make(x.nbytes + 128)
    out_name, out_key, out_handle = regions.make(want.nbytes + 64)
    shm.set_shared_memory_region(in_handle, [x], offset=128)
    client.register_system_shared_memory(in_name, in_key, x.nbytes + 128)
    client.register_system_shared_memory(out_name, out_key, want.nbytes + 64)

    inp = mod.InferInput("input", list(x.shape), "FP32")
    inp.set_shared_memory(in_name, x.nbytes, offset=128)
    out = mod.InferRequestedOutput("logits")
    out.set_shared_memory(out_name, want.nbytes, offset=64)
    result = client.infer("digits", [inp], outputs=[out])

    got = shm.get_contents_as_numpy(out_handle, np.float32, list(want.shape), offset=64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    entry = result.get_output("logits")
    params = entry["parameters"] if transport == "http" else entry.parameters
    if transport == "http":
        assert "data" not in entry  # the data is in the region, not the response
        assert params["shared_memory_region"] == out_name
        assert params["shared_memory_byte_size"] == want.nbytes
    else:
        assert not result.get_response().raw_output_contents
        assert params["shared_memory_region"].string_param == out_name
        assert params["shared_memory_byte_size"].int64_param == want.nbytes

    status = client.get_system_shared_memory_status(in_name)
    if transport == "http":
        assert status == [
            {"name": in_name, "key": in_key, "offset": 0, "byte_size": x.nbytes + 128}
        ]
    else:
        assert status.regions[in_name].byte_size == x.nbytes + 128


def test_mixed_shared_memory_and_binary_over_http(
    http: Any, regions: Regions, ppocr_path: Path
) -> None:
    """An input in shared memory beside an output returned as binary data (PP-OCR detector)."""
    rng = np.random.default_rng(4)
    x = rng.random((1, 3, 96, 128), dtype=np.float32)
    want = reference(ppocr_path).run({"x": x})
    name, key, handle = regions.make(x.nbytes)
    shm.set_shared_memory_region(handle, [x])
    http.register_system_shared_memory(name, key, x.nbytes)
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_shared_memory(name, x.nbytes)
    result = http.infer("ppocr-det", [inp])
    (out_name,) = want
    np.testing.assert_allclose(result.as_numpy(out_name), want[out_name], rtol=1e-4, atol=1e-4)


def test_regions_over_the_unix_socket(api: ApiServer, regions: Regions) -> None:
    """A Unix-socket client is known by its SO_PEERCRED uid: it owns what it registers."""
    name, key, _ = regions.make(64)
    assert api.unix_socket is not None
    transport = httpx.HTTPTransport(uds=str(api.unix_socket))
    with httpx.Client(transport=transport, base_url="http://agent") as client:
        reply = client.post(
            f"/v2/systemsharedmemory/region/{name}/register", json={"key": key, "byte_size": 64}
        )
        assert reply.status_code == 200, reply.text
        assert client.get("/v2/systemsharedmemory/status").json() == [
            {"name": name, "key": key, "offset": 0, "byte_size": 64}
        ]
        assert client.post(f"/v2/systemsharedmemory/region/{name}/unregister").status_code == 200
        assert client.get("/v2/systemsharedmemory/status").json() == []


# --- bad regions -----------------------------------------------------------------------------


def _digits_request(
    client: Any, mod: Any, region: str, byte_size: int, offset: int = 0, shape: Any = None
) -> None:
    inp = mod.InferInput("input", shape or [1, 1, 8, 8], "FP32")
    inp.set_shared_memory(region, byte_size, offset=offset)
    client.infer("digits", [inp])


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_bad_input_regions_are_refused(
    transport: str, api: ApiServer, http: Any, grpc_client: Any, regions: Regions
) -> None:
    client, mod = (http, httpclient) if transport == "http" else (grpc_client, grpcclient)
    size = 64 * FLOAT
    name, key, _ = regions.make(size)
    client.register_system_shared_memory(name, key, size)
    cases = {
        "wrong size": (name, size - FLOAT, 0, "needs 256"),
        "offset past the end": (name, size, size + 1, "past the end"),
        "span past the end": (name, size, FLOAT, "run past the end"),
        "unregistered name": ("nobody-registered-this", size, 0, "no shared memory region"),
    }
    for what, (region, byte_size, offset, message) in cases.items():
        with pytest.raises(InferenceServerException, match=message) as info:
            _digits_request(client, mod, region, byte_size, offset)
        status = info.value.status()
        assert status in ("400", "404", "StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND"), what
    _live(api)


def test_bad_registrations_are_refused(api: ApiServer, http: Any, regions: Regions) -> None:
    name, key, _ = regions.make(4096)
    base = f"http://127.0.0.1:{api.http_port}/v2/systemsharedmemory/region"
    link = SHM_DIR / f"edgefleet-test-link-{uuid.uuid4().hex[:8]}"
    link.symlink_to(SHM_DIR / key.lstrip("/"))
    try:
        bad = {
            "missing object": ({"key": "/edgefleet-test-absent", "byte_size": 16}, 400),
            "path traversal": ({"key": "/../etc/passwd", "byte_size": 16}, 400),
            "absolute path": ({"key": "/etc/passwd", "byte_size": 16}, 400),
            "dot-dot": ({"key": "..", "byte_size": 16}, 400),
            "symlink": ({"key": f"/{link.name}", "byte_size": 16}, 400),
            "larger than the object": ({"key": key, "byte_size": 4097}, 400),
            "offset past the object": ({"key": key, "offset": 4097, "byte_size": 1}, 400),
            "zero bytes": ({"key": key, "byte_size": 0}, 400),
            "negative offset": ({"key": key, "offset": -1, "byte_size": 1}, 400),
            "not an integer": ({"key": key, "byte_size": "16"}, 400),
            "over the byte bound": ({"key": key, "byte_size": 2**40}, 400),
        }
        with httpx.Client() as client:
            for what, (body, code) in bad.items():
                reply = client.post(f"{base}/{name}/register", json=body)
                assert reply.status_code == code, (what, reply.text)
                assert "error" in reply.json()
            assert client.post(f"{base}/bad%2Fname/register", json={}).status_code == 404
            assert client.post(f"{base}/{'n' * 200}/register", json={}).status_code == 400
            assert client.post(f"{base}/{name}/unregister").status_code == 404
            ok = client.post(f"{base}/{name}/register", json={"key": key, "byte_size": 16})
            assert ok.status_code == 200
            again = client.post(f"{base}/{name}/register", json={"key": key, "byte_size": 16})
            assert again.status_code == 400
            assert "already registered" in again.json()["error"]
    finally:
        link.unlink()
    _live(api)


def test_region_count_and_size_are_bounded(api: ApiServer, http: Any, regions: Regions) -> None:
    made = [regions.make(4096) for _ in range(9)]
    for name, key, _ in made[:8]:
        http.register_system_shared_memory(name, key, 4096)
    name, key, _ = made[8]
    with pytest.raises(InferenceServerException, match="the limit"):
        http.register_system_shared_memory(name, key, 4096)
    http.unregister_system_shared_memory()
    big_name, big_key, _ = regions.make(64 * 1024 * 1024 + 1)
    with pytest.raises(InferenceServerException, match="byte limit"):
        http.register_system_shared_memory(big_name, big_key, 64 * 1024 * 1024 + 1)
    _live(api)


def test_a_shrunk_object_is_refused_not_a_crash(
    api: ApiServer, http: Any, regions: Regions
) -> None:
    """Touching a page past a shrunk object's end would be SIGBUS: the size is checked first."""
    size = 64 * FLOAT
    name, key, _ = regions.make(size)
    http.register_system_shared_memory(name, key, size)
    os.truncate(SHM_DIR / key.lstrip("/"), 16)
    with pytest.raises(InferenceServerException, match="shrunk"):
        _digits_request(http, httpclient, name, size)
    _live(api)


def test_outputs_that_do_not_fit_are_refused(api: ApiServer, http: Any, regions: Regions) -> None:
    name, key, _ = regions.make(64 * FLOAT)
    http.register_system_shared_memory(name, key, 64 * FLOAT)
    out_name, out_key, _ = regions.make(8)
    http.register_system_shared_memory(out_name, out_key, 8)
    inp = httpclient.InferInput("input", [1, 1, 8, 8], "FP32")
    inp.set_shared_memory(name, 64 * FLOAT)
    out = httpclient.InferRequestedOutput("logits")
    out.set_shared_memory(out_name, 8)
    with pytest.raises(InferenceServerException, match="gives only 8"):
        http.infer("digits", [inp], outputs=[out])
    out.set_shared_memory(out_name, 16)
    with pytest.raises(InferenceServerException, match="run past the end"):
        http.infer("digits", [inp], outputs=[out])
    _live(api)


_OTHER_CLIENT = textwrap.dedent(
    """
    import encodings.idna, http.client, json, os, sys
    port, region = int(sys.argv[1]), sys.argv[2]
    os.setgid(65534)  # everything is imported first: the interpreter may be root's alone
    os.setuid(65534)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
             "parameters": {"shared_memory_region": region, "shared_memory_byte_size": 256}}]}
    def call(method, path, doc=None):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request(method, path, body=None if doc is None else json.dumps(doc))
        reply = conn.getresponse()
        data = reply.read()
        return [reply.status, json.loads(data) if data else None]
    print(json.dumps([
        call("POST", "/v2/models/digits/infer", body),
        call("GET", "/v2/systemsharedmemory/status"),
        call("POST", f"/v2/systemsharedmemory/region/{region}/unregister"),
    ]))
    """
)


@pytest.mark.skipif(os.getuid() != 0, reason="acting as a second user needs root")
def test_another_users_region_does_not_exist_for_it(
    api: ApiServer, http: Any, regions: Regions
) -> None:
    """A region belongs to the uid that registered it: a process of another uid can neither use,
    see nor unregister it."""
    name, key, _ = regions.make(64 * FLOAT)
    http.register_system_shared_memory(name, key, 64 * FLOAT)
    out = subprocess.run(
        [sys.executable, "-c", _OTHER_CLIENT, str(api.http_port), name],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd="/",
    )
    infer, status, drop = json.loads(out.stdout)
    assert infer[0] == 404
    assert "registered by this client" in infer[1]["error"]
    assert status == [200, []]
    assert drop[0] == 404
    assert [r["name"] for r in http.get_system_shared_memory_status()] == [name]
    _live(api)


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root")
def test_an_object_of_another_user_cannot_be_registered(regions: Regions) -> None:
    _, key, _ = regions.make(4096)
    os.chown(SHM_DIR / key.lstrip("/"), 65534, 65534)
    registry = SharedMemoryRegistry()
    with pytest.raises(RequestError, match="belongs to uid 65534"):
        registry.register_system(Peer(1000, "test"), "x", key, 0, 16)
    registry.register_system(Peer(0, "test"), "x", key, 0, 16)  # root may register any
    registry.close()


def test_peers_are_known_by_uid() -> None:
    """The TCP peer lookup finds this process's own end of a loopback connection."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        with client, conn:
            peer = peer_of_address(conn.getpeername(), conn.getsockname())
            assert peer == Peer(os.getuid(), "tcp")
    assert peer_of_address(("203.0.113.9", 5000), ("127.0.0.1", 8000)).uid is None
    table = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
        "   0: 0100007F:1F40 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1001\n"
    )
    assert socket_uid(table, "0100007F:1F40", "0100007F:C350") == 1001
    assert socket_uid(table, "0100007F:1F41", None) is None


# --- the checks themselves, by hypothesis ---------------------------------------------------


@given(
    region=st.integers(0, 2**20),
    offset=st.integers(-(2**70), 2**70),
    size=st.integers(-(2**70), 2**70),
)
def test_spans_inside_the_region_pass_and_nothing_else(region: int, offset: int, size: int) -> None:
    ref = TensorRef("r", offset, size)
    if offset >= 0 and size >= 0 and offset + size <= region:
        check_span("t", ref, region)
    else:
        with pytest.raises(RequestError) as info:
            check_span("t", ref, region)
        assert info.value.status_code == 400


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**65), 2**65),
    st.floats(allow_nan=False),
    st.text(max_size=4),
)


@given(region=_VALUES, size=_VALUES, offset=_VALUES)
def test_tensor_parameters_are_strict(region: Any, size: Any, offset: Any) -> None:
    params = {
        k: v
        for k, v in (
            ("shared_memory_region", region),
            ("shared_memory_byte_size", size),
            ("shared_memory_offset", offset),
        )
        if v is not None
    }

    def non_negative(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64

    valid = (region is None and size is None and offset is None) or (
        isinstance(region, str)
        and region != ""
        and non_negative(size)
        and (offset is None or non_negative(offset))
    )
    if not valid:
        with pytest.raises(RequestError) as info:
            tensor_ref("t", params)
        assert info.value.status_code == 400
        return
    ref = tensor_ref("t", params)
    if not params:
        assert ref is None
    else:
        assert ref == TensorRef(region, offset or 0, size)


@pytest.fixture(scope="module")
def filled_region() -> Iterator[tuple[SharedMemoryRegistry, bytes]]:
    """A real registry over one 1000-byte object holding known bytes, registered at offset 24."""
    key = f"/edgefleet-test-prop-{uuid.uuid4().hex[:8]}"
    path = SHM_DIR / key.lstrip("/")
    data = np.random.default_rng(0).bytes(1024)
    path.write_bytes(data)
    registry = SharedMemoryRegistry()
    registry.register_system(ME, "prop", key, 24, 1000)
    yield registry, data[24:]
    registry.close()
    path.unlink()


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=300)
@given(
    offset=st.integers(-8, 1100),
    size=st.integers(-8, 1100),
    rows=st.integers(0, 300),
    dtype=st.sampled_from(["UINT8", "INT16", "FP32", "FP64"]),
)
def test_reads_stay_inside_the_region(
    filled_region: tuple[SharedMemoryRegistry, bytes],
    offset: int,
    size: int,
    rows: int,
    dtype: str,
) -> None:
    """Whatever offset, size and shape a request names, a read returns exactly the region's
    bytes at that offset, or is refused with a 4xx: never bytes from outside the region."""
    registry, region_bytes = filled_region
    itemsize = {"UINT8": 1, "INT16": 2, "FP32": 4, "FP64": 8}[dtype]
    params = {
        "shared_memory_region": "prop",
        "shared_memory_byte_size": size,
        "shared_memory_offset": offset,
    }

    def read() -> Any:
        ref = tensor_ref("t", params)
        assert ref is not None
        return registry.read_input(ME, "t", dtype, [rows], ref)

    if offset >= 0 and size == rows * itemsize and offset + size <= len(region_bytes):
        assert read().tobytes() == region_bytes[offset : offset + size]
    else:
        with pytest.raises(RequestError) as info:
            read()
        assert 400 <= info.value.status_code < 500


def test_unregister_while_in_use_keeps_arrays_valid(regions: Regions) -> None:
    """Arrays read from a region stay valid after it is unregistered (requests in flight)."""
    name, key, handle = regions.make(64)
    shm.set_shared_memory_region(handle, [np.arange(16, dtype=np.float32)])
    registry = SharedMemoryRegistry()
    registry.register_system(ME, name, key, 0, 64)
    array = registry.read_input(ME, "t", "FP32", [16], TensorRef(name, 0, 64))
    assert registry.unregister(ME, "system") == [name]
    np.testing.assert_array_equal(array, np.arange(16, dtype=np.float32))
    with pytest.raises(RequestError) as info:
        registry.read_input(ME, "t", "FP32", [16], TensorRef(name, 0, 64))
    assert info.value.status_code == 404
    registry.close()


def test_clients_from_another_host_cannot_use_shared_memory() -> None:
    registry = SharedMemoryRegistry()
    with pytest.raises(RequestError, match="on this host"):
        registry.status(Peer(None, "the client is not a process on this host"), "system")
    with pytest.raises(RequestError, match="disabled"):
        SharedMemoryRegistry(enabled=False).status(ME, "system")
    assert SharedMemoryRegistry(enabled=False).extensions() == []
