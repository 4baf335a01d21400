"""The CUDA shared-memory extension against the unmodified ``tritonclient`` on a GPU machine.

A CUDA IPC handle cannot be opened by the process that made it, so the client (tritonclient's
``cuda_shared_memory`` utilities, over HTTP and gRPC) runs in a process of its own against an API
served here by a real ``ModelSlot``: inputs are read from device memory, outputs written back to
it, and bad regions are 4xx that leave the server live.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from agent.api import ApiServer, start_api
from agent.api.shm import cuda_unusable
from agent.config import ApiConfig
from agent.models.slots import SlotRegistry
from agent.samples import DigitsData
from tests.agent.api.conftest import reference, serve

pytestmark = pytest.mark.gpu

_CLIENT = textwrap.dedent(
    """
    import base64, ctypes, json, sys, warnings
    import numpy as np
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import tritonclient.utils.cuda_shared_memory as cudashm
    except (ImportError, RuntimeError) as exc:
        print(json.dumps({"skip": f"tritonclient's CUDA utilities do not load: {exc}"}))
        sys.exit(0)
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    http_port, grpc_port, x_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    x = np.load(x_file)

    def raw_handle(region):
        try:
            return cudashm.get_raw_handle(region)
        except AttributeError:  # cuda-bindings 13 has no `reserved`: read the 64 bytes
            return base64.b64encode(ctypes.string_at(region._cuda_shm_handle.getPtr(), 64))

    def refused(fn):
        try:
            fn()
        except InferenceServerException as exc:
            return [str(exc.status()), exc.message()]
        return None

    out = {}
    http = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    out["extensions"] = http.get_server_metadata()["extensions"]
    n_out = x.shape[0] * 10 * 4
    for transport, client, mod in (("http", http, httpclient), ("grpc", grpc, grpcclient)):
        src = cudashm.create_shared_memory_region(f"{transport}-in", x.nbytes + 256, 0)
        dst = cudashm.create_shared_memory_region(f"{transport}-out", n_out, 0)
        cudashm.set_shared_memory_region(src, [np.zeros(64, np.float32), x])
        raw_src, raw_dst = raw_handle(src), raw_handle(dst)
        if transport == "http":
            raw_src, raw_dst = raw_src.decode(), raw_dst.decode()
        client.register_cuda_shared_memory(f"{transport}-in", raw_src, 0, x.nbytes + 256)
        client.register_cuda_shared_memory(f"{transport}-out", raw_dst, 0, n_out)
        inp = mod.InferInput("input", list(x.shape), "FP32")
        inp.set_shared_memory(f"{transport}-in", x.nbytes, offset=256)
        req = mod.InferRequestedOutput("logits")
        req.set_shared_memory(f"{transport}-out", n_out)
        client.infer("digits", [inp], outputs=[req])
        got = cudashm.get_contents_as_numpy(dst, np.float32, [x.shape[0], 10])
        out[f"{transport}-logits"] = got.tolist()
        status = client.get_cuda_shared_memory_status(f"{transport}-in")
        out[f"{transport}-status"] = (
            status if transport == "http"
            else [{"name": k, "device_id": v.device_id, "byte_size": v.byte_size}
                  for k, v in status.regions.items()]
        )
        big = cudashm.create_shared_memory_region(f"{transport}-big", 4096, 0)
        raw_big = raw_handle(big)
        if transport == "http":
            raw_big = raw_big.decode()
        out[f"{transport}-too-large"] = refused(
            lambda: client.register_cuda_shared_memory(f"{transport}-big", raw_big, 0, 1 << 20)
        )
        bad = mod.InferInput("input", list(x.shape), "FP32")
        bad.set_shared_memory(f"{transport}-in", x.nbytes, offset=512)
        out[f"{transport}-past-end"] = refused(lambda: client.infer("digits", [bad]))
        unknown = mod.InferInput("input", list(x.shape), "FP32")
        unknown.set_shared_memory("nobody", x.nbytes)
        out[f"{transport}-unknown"] = refused(lambda: client.infer("digits", [unknown]))
        client.unregister_cuda_shared_memory()
        out[f"{transport}-after"] = client.get_cuda_shared_memory_status()
        out[f"{transport}-after"] = (
            out[f"{transport}-after"] if transport == "http"
            else list(out[f"{transport}-after"].regions)
        )
        for region in (src, dst, big):
            cudashm.destroy_shared_memory_region(region)
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory, digits_path: Path, digits: DigitsData
) -> Iterator[ApiServer]:
    reason = cuda_unusable()
    if reason is not None:
        pytest.skip(f"CUDA shared memory is not usable here: {reason}")
    root = tmp_path_factory.mktemp("cuda-shm") / "store"
    slots: SlotRegistry = serve(
        root, {"digits": (digits_path, {"input": digits.x_test[:2]}, ("1.0.0",))}
    )
    server = start_api(slots, ApiConfig(http_port=0, grpc_port=0))
    yield server
    server.stop()
    slots.close()


def test_cuda_regions_with_an_unmodified_client(
    api: ApiServer, tmp_path: Path, digits: DigitsData, digits_path: Path
) -> None:
    x = np.ascontiguousarray(digits.x_test[:6])
    np.save(tmp_path / "x.npy", x)
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            _CLIENT,
            str(api.http_port),
            str(api.grpc_port),
            str(tmp_path / "x.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(out["skip"])
    assert "cuda_shared_memory" in out["extensions"]
    assert "system_shared_memory" in out["extensions"]
    want = reference(digits_path).run({"input": x})["logits"]
    for transport in ("http", "grpc"):
        np.testing.assert_allclose(out[f"{transport}-logits"], want, rtol=1e-5, atol=1e-5)
        assert out[f"{transport}-status"] == [
            {"name": f"{transport}-in", "device_id": 0, "byte_size": x.nbytes + 256}
        ]
        for case, message in (
            ("too-large", "larger than the CUDA allocation"),
            ("past-end", "past the end"),
            ("unknown", "no shared memory region"),
        ):
            refusal = out[f"{transport}-{case}"]
            assert refusal is not None, case
            assert message in refusal[1]
        assert out[f"{transport}-after"] == []
    with httpx.Client() as client:
        assert client.get(f"http://127.0.0.1:{api.http_port}/v2/health/live").status_code == 200
