"""What only the OpenVINO backend does: IR files, hints, model cache, thread cap, probe, and
background loads (compiled in a child process, imported here)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Literal

import httpx
import numpy as np
import pytest
from structlog.testing import capture_logs

from agent.backends import Artifact, LoadOptions, load_first
from agent.backends import openvino as openvino_backend
from agent.backends.openvino import OpenVinoBackend, _compile_in_child, onnx_header
from agent.config import BackendConfig
from agent.errors import ModelLoadError
from agent.models.slots import load_options_from
from agent.samples import DigitsData

pytestmark = pytest.mark.openvino


@pytest.fixture(scope="module")
def digits_ir(digits_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import openvino as ov

    out = tmp_path_factory.mktemp("ir") / "digits.xml"
    ov.save_model(ov.convert_model(str(digits_path)), str(out), compress_to_fp16=False)
    return out


def test_ir_loads_and_matches_onnx(digits_ir: Path, digits_path: Path, digits: DigitsData) -> None:
    backend = OpenVinoBackend()
    ir = backend.load(Artifact(digits_ir, format="openvino-ir"), LoadOptions())
    onnx = backend.load(Artifact(digits_path), LoadOptions())
    assert [s.name for s in ir.outputs] == ["logits"]
    a = ir.run({"input": digits.x_test})["logits"]
    b = onnx.run({"input": digits.x_test})["logits"]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_ir_without_weights_is_a_load_error(digits_ir: Path, tmp_path: Path) -> None:
    lonely = tmp_path / "lonely.xml"
    lonely.write_bytes(digits_ir.read_bytes())
    with pytest.raises(
        ModelLoadError, match=r"^lonely: OpenVINO IR weights not found: .*lonely.bin"
    ):
        OpenVinoBackend().load(Artifact(lonely, format="openvino-ir", name="lonely"), LoadOptions())


def test_corrupt_ir(tmp_path: Path) -> None:
    xml = tmp_path / "bad.xml"
    xml.write_text("<net>")
    (tmp_path / "bad.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ModelLoadError, match=r"^bad: corrupt or unreadable model file"):
        OpenVinoBackend().load(Artifact(xml, format="openvino-ir", name="bad"), LoadOptions())


def test_model_cache_is_keyed_and_reused(digits_path: Path, tmp_path: Path) -> None:
    backend = OpenVinoBackend()
    options = LoadOptions(cache_dir=tmp_path, openvino_device="CPU")
    backend.load(Artifact(digits_path), options).close()
    keys = list((tmp_path / "openvino").iterdir())
    assert len(keys) == 1
    blobs = list(keys[0].iterdir())
    assert blobs, "openvino wrote no compiled blob"
    backend.load(Artifact(digits_path), options).close()  # a hit: no new key, same blobs
    assert list((tmp_path / "openvino").iterdir()) == keys
    backend.load(Artifact(digits_path, precision="fp16"), options).close()
    assert len(list((tmp_path / "openvino").iterdir())) == 2  # precision is part of the key


def test_hints_threads_and_precision_reach_the_compiled_model(digits_path: Path) -> None:
    backend = OpenVinoBackend()
    fp32 = backend.load(
        Artifact(digits_path),
        LoadOptions(openvino_hint="THROUGHPUT", intra_op_threads=1, openvino_device="CPU"),
    )
    raw = fp32.raw  # type: ignore[attr-defined]
    assert str(raw.get_property("PERFORMANCE_HINT")).endswith("THROUGHPUT")
    assert int(raw.get_property("INFERENCE_NUM_THREADS")) == 1
    assert "float32" in str(raw.get_property("INFERENCE_PRECISION_HINT"))
    assert fp32.device == "CPU"


def _ir_computed_both_ways(
    onnx_path: Path, xml: Path, feeds: dict[str, np.ndarray], *, fp16: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``onnx_path`` saved as IR at ``xml``; its output in f32 and in the CPU plugin's default."""
    import openvino as ov

    ov.save_model(ov.convert_model(str(onnx_path)), str(xml), compress_to_fp16=fp16)
    core = ov.Core()
    f32 = core.compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(feeds)[0]
    return f32, core.compile_model(str(xml), "CPU")(feeds)[0]


@pytest.mark.parametrize("device", ["CPU", "AUTO"])
def test_an_fp16_artifact_computes_in_the_cpus_reduced_type_only_where_a_gate_accepted_it(
    digits_path: Path, digits: DigitsData, tmp_path: Path, device: str
) -> None:
    import openvino as ov

    xml = tmp_path / "fp16.xml"
    feeds = {"input": digits.x_test[:64]}
    f32, default = _ir_computed_both_ways(digits_path, xml, feeds, fp16=True)
    kind = OpenVinoBackend.cpu_inference_type()
    assert kind == str(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name())
    if kind != "f32":
        assert not np.array_equal(f32, default)

    def served(reduced: frozenset[str] | None, config: BackendConfig | None = None) -> np.ndarray:
        artifact = Artifact(xml, format="openvino-ir", precision="fp16", reduced_compute=reduced)
        options = load_options_from(config or BackendConfig(openvino_device=device))
        session = OpenVinoBackend().load(artifact, options)
        try:
            out = session.run(feeds)["logits"]
            if device == "CPU":  # AUTO does not say what its CPU computes in
                assert session.compute == (kind if np.array_equal(out, default) else "f32")
            return out
        finally:
            session.close()

    np.testing.assert_array_equal(served(frozenset()), f32)  # no reduced type gated
    np.testing.assert_array_equal(served(frozenset({"f16"} - {kind})), f32)  # another type
    np.testing.assert_array_equal(served(frozenset({kind})), default)  # this CPU's, accepted
    np.testing.assert_array_equal(served(None), default)  # a bare file: the plugin's choice
    # an operator who takes the device's own type for every variant ([backends] in agent.toml)
    config = BackendConfig(openvino_device=device, openvino_reduced_float="device")
    np.testing.assert_array_equal(served(frozenset(), config), default)


def test_an_int8_artifact_computes_its_float_parts_in_the_reduced_type_only_where_gated(
    digits_path: Path, digits: DigitsData, tmp_path: Path
) -> None:
    """As for fp16 (above), except that an INT8 file no gate measured (a bare artifact)
    computes in f32: what accuracy control returned to float was chosen in f32."""
    xml = tmp_path / "int8.xml"  # the compile hint is all that differs: the file's own
    feeds = {"input": digits.x_test[:64]}
    f32, default = _ir_computed_both_ways(digits_path, xml, feeds, fp16=False)
    kind = OpenVinoBackend.cpu_inference_type()

    def served(
        reduced: frozenset[str] | None, how: Literal["gated", "device"] = "gated"
    ) -> np.ndarray:
        artifact = Artifact(xml, format="openvino-ir", precision="int8", reduced_compute=reduced)
        config = BackendConfig(openvino_device="CPU", openvino_reduced_float=how)
        session = OpenVinoBackend().load(artifact, load_options_from(config))
        try:
            out = session.run(feeds)["logits"]
            assert session.compute == (kind if np.array_equal(out, default) else "f32")
            return out
        finally:
            session.close()

    np.testing.assert_array_equal(served(None), f32)  # a bare file
    np.testing.assert_array_equal(served(frozenset()), f32)  # no reduced type gated
    np.testing.assert_array_equal(served(frozenset({kind})), default)  # this CPU's, accepted
    np.testing.assert_array_equal(served(frozenset(), "device"), default)


def test_unknown_device_is_a_clear_error(digits_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"digits: openvino device FOO is not usable"):
        OpenVinoBackend().load(
            Artifact(digits_path, name="digits"), LoadOptions(openvino_device="FOO")
        )


def test_probe_reports_version_and_devices() -> None:
    probe = OpenVinoBackend().probe()
    assert probe.usable
    assert probe.version
    assert probe.version[0].isdigit()
    assert "CPU" in probe.devices


_PROBE_MAPS = """
import sys
from pathlib import Path
from agent.backends import openvino as backend
folder = sys.argv[1]
backend.DEVICE_NODES = {"GPU": (folder, "renderD"), "NPU": (folder, "accel")}
probe = backend.OpenVinoBackend().probe()
maps = Path("/proc/self/maps").read_text()
print(",".join(probe.devices))
print(",".join(p for p in ("cpu", "gpu", "npu") if f"libopenvino_intel_{p}_plugin" in maps))
if len(sys.argv) > 2:  # then serve a model on AUTO, the default device
    import numpy as np
    from agent.backends import Artifact, LoadOptions
    session = backend.OpenVinoBackend().load(Artifact(Path(sys.argv[2])), LoadOptions())
    session.run({"input": np.zeros((1, 1, 8, 8), np.float32)})
    maps = Path("/proc/self/maps").read_text()
    print(",".join(p for p in ("cpu", "gpu", "npu", "auto") if f"libopenvino_{p}" in maps
                   or f"libopenvino_intel_{p}_plugin" in maps), session.device)
"""


@pytest.mark.parametrize(
    ("nodes", "plugins"), [((), "cpu"), (("renderD128", "accel0"), "cpu,gpu,npu")]
)
def test_probe_loads_the_plugin_of_a_device_kind_only_where_its_device_node_is(
    tmp_path: Path, nodes: tuple[str, ...], plugins: str
) -> None:
    """Asking a plugin for its devices loads it (about 28 MiB for the GPU and NPU plugins): the
    probe asks the GPU and NPU plugins only where /dev shows such a device. A fresh process,
    so no other test has loaded them."""
    for node in nodes:
        (tmp_path / node).touch()
    out = subprocess.run(
        [sys.executable, "-c", _PROBE_MAPS, str(tmp_path)],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout.splitlines()  # fmt: skip
    assert out[0].split(",")[0] == "CPU"
    assert out[1] == plugins


def test_auto_on_a_machine_whose_only_device_is_its_cpu_compiles_for_the_cpu(
    tmp_path: Path, digits_path: Path
) -> None:
    """``AUTO`` (the default device) loads every device plugin and its own to pick a device;
    where the probe found the CPU alone, the model is compiled for ``CPU`` and none of them is
    loaded (43 MB resident with MiniLM INT4)."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE_MAPS, str(tmp_path), str(digits_path)],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout.splitlines()  # fmt: skip
    assert out[1] == "cpu"
    assert out[-1] == "cpu CPU"  # (log lines before it)
    assert OpenVinoBackend.compile_device("AUTO") in ("CPU", "AUTO")
    assert OpenVinoBackend.compile_device("GPU.1") == "GPU.1"


def test_available_devices_matches_openvinos_own_list_where_every_node_is_present(
    tmp_path: Path,
) -> None:
    import openvino as ov

    (tmp_path / "renderD128").touch()
    (tmp_path / "accel0").touch()
    core = ov.Core()
    nodes = {"GPU": (str(tmp_path), "renderD"), "NPU": (str(tmp_path), "accel")}
    assert openvino_backend.available_devices(core, nodes) == list(core.available_devices)
    assert openvino_backend.available_devices(core, {"GPU": (str(tmp_path / "no"), "x")}) == [
        d for d in core.available_devices if not d.startswith("GPU") and not d.startswith("NPU")
    ]


def test_not_installed_is_unusable_with_reason(
    monkeypatch: pytest.MonkeyPatch, digits_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # what an absent package looks like
    probe = OpenVinoBackend().probe()
    assert not probe.usable
    assert "openvino not installed" in (probe.reason or "")
    # the registry skips it and falls through to the next backend
    session = load_first(Artifact(digits_path), LoadOptions(), order=["openvino", "onnxruntime"])
    assert session.backend == "onnxruntime"


def test_onnx_header_reads_opsets_and_outputs(ppocr_path: Path, tmp_path: Path) -> None:
    header = onnx_header(ppocr_path)
    assert header == {"opsets": {"": 12}, "outputs": ("sigmoid_0.tmp_0",)}
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01garbage")
    assert onnx_header(junk) is None
    assert onnx_header(tmp_path / "absent.onnx") is None


def test_read_only_feeds_run(digits_path: Path, digits: DigitsData) -> None:
    """The local API hands over read-only views of the request body (binary tensors)."""
    session = load_first(Artifact(digits_path), LoadOptions(), order=("openvino",))
    try:
        x = digits.x_test[:1].astype(np.float32)
        view = np.frombuffer(x.tobytes(), np.float32).reshape(x.shape)
        assert not view.flags.writeable
        np.testing.assert_allclose(
            session.run({"input": view})["logits"], session.run({"input": x})["logits"]
        )
    finally:
        session.close()


def test_read_only_feeds_of_several_inputs_each_reach_their_own_input(tmp_path: Path) -> None:
    """Each read-only feed is copied for OpenVINO, which shares the copy's memory without
    holding it: every copy must live until the inference has run, or an earlier input reads
    freed memory (a later input's copy, or zeros), as binary tensors did over the local API."""
    import onnx
    from onnx import TensorProto, helper

    shape = [4, 256]
    graph = helper.make_graph(
        [helper.make_node("Sub", ["x", "y"], ["z"])],
        "sub",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "y")],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, shape)],
    )
    path = tmp_path / "sub.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    session = OpenVinoBackend().load(Artifact(path), LoadOptions(openvino_device="CPU"))
    rng = np.random.default_rng(0)
    try:
        for _ in range(20):
            x, y = (rng.random(shape, dtype=np.float32) for _ in range(2))
            views = {
                k: np.frombuffer(v.tobytes(), np.float32).reshape(shape)
                for k, v in (("x", x), ("y", y))
            }
            np.testing.assert_array_equal(session.run(views)["z"], x - y)
    finally:
        session.close()


def _loaded_from_cache(session: object) -> bool:
    return bool(session.raw.get_property("LOADED_FROM_CACHE"))  # type: ignore[attr-defined]


def test_background_load_compiles_in_a_child_and_imports_here(
    digits_path: Path, digits: DigitsData, tmp_path: Path
) -> None:
    """A swap's load compiles in a child process into the model cache; this process imports."""
    backend = OpenVinoBackend()
    here = backend.load(Artifact(digits_path), LoadOptions(openvino_device="CPU"))
    cached: list[bool] = []  # what the cache held when the load waited for a frame's end
    options = LoadOptions(
        openvino_device="CPU",
        cache_dir=tmp_path,
        background_load=True,
        between_frames=lambda: cached.append(any((tmp_path / "openvino").rglob("compiled-*"))),
    )
    background = backend.load(Artifact(digits_path), options)
    assert cached == [True]  # once: after the child's compile, before this process's import
    assert _loaded_from_cache(background)
    assert not _loaded_from_cache(here)
    (key,) = (tmp_path / "openvino").iterdir()
    assert len(list(key.glob("compiled-*"))) == 1  # the next background load skips the child
    np.testing.assert_array_equal(
        background.run({"input": digits.x_test})["logits"],
        here.run({"input": digits.x_test})["logits"],
    )
    assert _loaded_from_cache(backend.load(Artifact(digits_path), options))


def test_background_load_without_a_cache_dir_leaves_no_files(
    digits_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None  # read TMPDIR again
    try:
        options = LoadOptions(openvino_device="CPU", background_load=True)
        session = OpenVinoBackend().load(Artifact(digits_path), options)
    finally:
        tempfile.tempdir = None
    assert _loaded_from_cache(session)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_child_compile_is_logged_and_the_load_compiles_here(
    digits_path: Path, digits: DigitsData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = OpenVinoBackend().config(Artifact(digits_path), LoadOptions(cache_dir=tmp_path))
    with capture_logs() as logs:
        done = _compile_in_child(digits_path, "CPU", cfg, "digits", timeout_s=0.001)
    assert not done
    assert [e["event"] for e in logs] == ["openvino_child_compile_failed"]
    assert "timed out" in logs[0]["reason"]
    with capture_logs() as logs:
        done = _compile_in_child(tmp_path / "missing.onnx", "CPU", cfg, "digits")
    assert not done
    assert logs[0]["reason"].startswith("exit status 1:")
    monkeypatch.setattr(openvino_backend, "CHILD_COMPILE_TIMEOUT_S", 0.001)
    options = LoadOptions(openvino_device="CPU", background_load=True)
    with capture_logs() as logs:
        session = OpenVinoBackend().load(Artifact(digits_path, name="digits"), options)
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "openvino_child_compile_failed"
    ]
    assert not _loaded_from_cache(session)  # compiled here instead
    assert session.run({"input": digits.x_test})["logits"].shape == (len(digits.x_test), 10)


def _node_present(folder: str, prefix: str) -> bool:
    try:
        return any(n.name.startswith(prefix) for n in Path(folder).iterdir())
    except OSError:
        return False


@pytest.mark.skipif(
    any(_node_present(*node) for node in openvino_backend.DEVICE_NODES.values()),
    reason="this machine has an Intel GPU or NPU device node: the daemon asks that plugin",
)
@pytest.mark.parametrize("serving", ["any", "openvino"])
def test_a_daemon_without_an_intel_gpu_or_npu_maps_neither_plugin(
    tmp_path: Path, digits_path: Path, digits: DigitsData, serving: str
) -> None:
    """The real daemon probes every backend at start: OpenVINO's CPU plugin is in its memory,
    the GPU and NPU plugins (28 MiB) are not; nor are they, nor AUTO's plugin, when it serves
    the model on OpenVINO's default device (``AUTO``: compiled for the CPU, the only device)."""
    from tests.agent.daemon_proc import digits_daemon, running_daemon

    config, port = digits_daemon(
        tmp_path,
        digits_path,
        digits,
        "ov-plugins",
        '[loop]\nrate_hz = 20\n[swap]\nwarmup_runs = 1\n[mqtt]\nhost = "127.0.0.1"\n'
        f'port = 1883\ntopic_prefix = "ov-plugins-{os.getpid()}"\n',
        runtime="openvino" if serving == "openvino" else "onnxruntime",
    )
    with running_daemon(config, port, tmp_path / "daemon.log") as proc:
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        meta = httpx.get(f"http://127.0.0.1:{port}/v2/models/digits", timeout=5).json()
    assert "libopenvino_intel_cpu_plugin" in maps  # it probed OpenVINO ...
    assert "libopenvino_intel_gpu_plugin" not in maps  # ... and asked no plugin for nothing
    assert "libopenvino_intel_npu_plugin" not in maps
    assert "libopenvino_auto_plugin" not in maps
    if serving == "openvino":
        assert meta["platform"] == "openvino"
