"""Variant builds on real models: the digits CNN (labelled) and the PP-OCR text detector."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from structlog.testing import capture_logs

from agent.contracts.manifest import MANIFEST_FILE, BundleManifest, Variant
from agent.samples import DigitsData
from control_plane.builds import (
    DEFAULT_TARGETS,
    BuildError,
    BuildInputError,
    Int8Search,
    build_variants,
)
from control_plane.errors import BuildError as ControlPlaneBuildError
from control_plane.errors import InvalidInputError

QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


def _save(path: Path, **arrays: np.ndarray[Any, Any]) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _run_variant(bundle: Path, variant: Variant, feeds: dict[str, Any]) -> list[Any]:
    entry = bundle / variant.entrypoint
    names = [o.name for o in variant.outputs]
    if variant.runtime == "onnxruntime":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(entry), providers=["CPUExecutionProvider"])
        return list(sess.run(names, feeds))
    import openvino as ov

    compiled = ov.Core().compile_model(str(entry), "CPU")
    result = compiled(feeds)
    ports = {n: p for p in compiled.outputs for n in p.get_names()}
    return [result[ports[n]] for n in names]


def _rel_l2(a: Any, b: Any) -> float:
    return float(np.linalg.norm((a - b).ravel()) / np.linalg.norm(b.ravel()))


def _op_types(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


class _Progress:
    def __init__(self) -> None:
        self.calls: list[tuple[float, str]] = []

    def __call__(self, fraction: float, message: str) -> None:
        self.calls.append((fraction, message))


@pytest.fixture(scope="module")
def digits_sets(tmp_path_factory: pytest.TempPathFactory, digits: DigitsData) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("digits-sets")
    return {
        "calibration": _save(root / "calibration.npz", input=digits.x_train[:200]),
        "validation": _save(root / "validation.npz", input=digits.x_test, labels=digits.y_test),
    }


@pytest.fixture(scope="module")
def digits_build(
    tmp_path_factory: pytest.TempPathFactory, digits_path: Path, digits_sets: dict[str, Path]
) -> tuple[Path, BundleManifest, _Progress]:
    out = tmp_path_factory.mktemp("digits-build") / "bundle"
    progress = _Progress()
    manifest = build_variants(
        digits_path,
        out,
        name="digits",
        version="1.2.0",
        calibration=digits_sets["calibration"],
        validation=digits_sets["validation"],
        golden=None,
        progress=progress,
    )
    return out, manifest, progress


def test_digits_every_variant_built_and_int8_within_a_point(
    digits_build: tuple[Path, BundleManifest, _Progress], digits: DigitsData
) -> None:
    _, manifest, _ = digits_build
    # a CNN holds no large matrix weights: no INT4 weight-only variant is planned for it
    planned = [t for t in DEFAULT_TARGETS if "-int4" not in t]
    assert [v.id for v in manifest.variants] == planned
    assert all(v.status == "accepted" for v in manifest.variants)
    for variant in manifest.variants:
        if variant.precision == "fp32":
            assert variant.accuracy is None
            continue
        report = variant.accuracy
        assert report is not None
        assert report.metric == "top1"
        assert report.samples == len(digits.y_test)
        assert report.reference > 90.0
        assert report.delta == pytest.approx(report.reference - report.value, abs=1e-3)
        assert report.delta <= 1.0, variant.id
    int8 = manifest.variant("onnx-int8")
    assert set(_op_types(digits_build[0] / int8.entrypoint)) >= QDQ_OPS
    assert manifest.variant("onnx-fp16").target.accelerator == "nvidia-gpu"
    assert manifest.variant("openvino-int8").target.arch == ("x86_64", "aarch64")
    assert {"onnx", "onnxruntime", "openvino", "nncf"} <= set(manifest.provenance.tools)


def test_digits_manifest_on_disk_matches_files(
    digits_build: tuple[Path, BundleManifest, _Progress], digits_path: Path
) -> None:
    bundle, manifest, _ = digits_build
    on_disk = BundleManifest.model_validate_json((bundle / MANIFEST_FILE).read_text())
    assert on_disk == manifest
    for entry in manifest.all_files():
        data = (bundle / entry.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry.sha256, entry.path
        assert len(data) == entry.size
    assert manifest.provenance.source_sha256 == hashlib.sha256(digits_path.read_bytes()).hexdigest()
    assert [p.name for p in bundle.parent.iterdir()] == ["bundle"]  # no staging left behind


def test_digits_variants_match_golden_outputs_in_their_runtime(
    digits_build: tuple[Path, BundleManifest, _Progress],
) -> None:
    bundle, manifest, _ = digits_build
    assert manifest.golden
    for case in manifest.golden:
        with np.load(bundle / case.file.path) as npz:
            feeds = {k[3:]: npz[k] for k in npz.files if k.startswith("in:")}
            refs = {k[4:]: npz[k] for k in npz.files if k.startswith("out:")}
        assert set(feeds) == {"input"}
        assert set(refs) == {"logits"}
        for variant in manifest.variants:
            outputs = _run_variant(bundle, variant, feeds)
            for spec, out in zip(variant.outputs, outputs, strict=True):
                err = _rel_l2(out, refs[spec.name])
                assert err <= variant.tolerance.max_rel_l2, (variant.id, err)


def test_digits_progress_reported_in_order(
    digits_build: tuple[Path, BundleManifest, _Progress],
) -> None:
    calls = digits_build[2].calls
    fractions = [f for f, _ in calls]
    assert fractions[0] == 0.0
    assert fractions[-1] == 1.0
    assert fractions == sorted(fractions)
    text = " ".join(m for _, m in calls)
    for target in DEFAULT_TARGETS:
        assert (f"building {target}" in text) != ("-int4" in target)


def test_already_quantized_source_is_kept_as_it_is(
    digits_build: tuple[Path, BundleManifest, _Progress],
    digits_sets: dict[str, Path],
    tmp_path: Path,
) -> None:
    bundle, manifest, _ = digits_build
    qdq_source = bundle / manifest.variant("onnx-int8").entrypoint
    out = tmp_path / "qdq-bundle"
    rebuilt = build_variants(
        qdq_source,
        out,
        name="digits-qat",
        version="1.0.0",
        calibration=digits_sets["calibration"],
        validation=digits_sets["validation"],
        golden=None,
    )
    assert [v.id for v in rebuilt.variants] == ["onnx-int8", "openvino-int8"]
    kept = rebuilt.variant("onnx-int8")
    assert kept.files[0].sha256 == hashlib.sha256(qdq_source.read_bytes()).hexdigest()
    assert _op_types(out / kept.entrypoint) == _op_types(qdq_source)
    assert all(v.accuracy is None and v.status == "accepted" for v in rebuilt.variants)


def test_budget_zero_with_bad_calibration_rejects_int8_with_numbers(
    digits_path: Path, digits: DigitsData, digits_sets: dict[str, Path], tmp_path: Path
) -> None:
    # Calibrating on nearly black images gives activation ranges far too narrow: saturation.
    bad = _save(tmp_path / "bad.npz", input=digits.x_train[:50] * 0.02)
    out = tmp_path / "bundle"
    manifest = build_variants(
        digits_path,
        out,
        name="digits",
        version="1.0.0",
        calibration=bad,
        validation=digits_sets["validation"],
        golden=None,
        accuracy_budget=0.0,
        targets=("onnx-fp32", "onnx-int8"),
        search=Int8Search(calibration_methods=("MinMax",), max_steps=0),  # the gate, no search
    )
    int8 = manifest.variant("onnx-int8")
    assert int8.status == "rejected"
    report = int8.accuracy
    assert report is not None
    assert not report.accepted
    assert report.budget == 0.0
    assert report.delta > 0.0
    assert report.value < report.reference
    assert report.reason is not None
    assert "top-1 dropped" in report.reason
    assert (out / int8.entrypoint).exists()  # kept for inspection, never offered
    assert manifest.variant("onnx-fp32").status == "accepted"


def test_without_labels_accuracy_is_agreement_with_fp32(
    digits_path: Path, digits_sets: dict[str, Path], tmp_path: Path
) -> None:
    manifest = build_variants(
        digits_path,
        tmp_path / "bundle",
        name="digits",
        version="1.0.0",
        calibration=digits_sets["calibration"],
        validation=None,
        golden=None,
        targets=("onnx-fp16",),
    )
    report = manifest.variant("onnx-fp16").accuracy
    assert report is not None
    assert report.metric == "agreement"
    assert report.reference == 100.0
    assert report.samples == 200
    assert report.value >= 99.0


def _text_images(count: int, size: int, seed: int) -> np.ndarray[Any, Any]:
    """White pages with dark printed words, normalized as PP-OCR expects (NCHW float32)."""
    import cv2

    rng = np.random.default_rng(seed)
    words = ["edge", "fleet", "INT8", "robot", "2024", "model"]
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    out = np.empty((count, 3, size, size), np.float32)
    for k in range(count):
        page = np.full((size, size, 3), int(rng.integers(200, 256)), np.uint8)
        for line in range(2):
            y = int(size * (0.35 + 0.4 * line))
            cv2.putText(
                page, str(rng.choice(words)), (2, y), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (20, 20, 20), 1
            )
        out[k] = (page.astype(np.float32).transpose(2, 0, 1) / 255.0 - mean) / std
    return out


def test_ppocr_detector_opset_upgraded_and_variants_built(ppocr_path: Path, tmp_path: Path) -> None:
    assert onnx.load(str(ppocr_path)).opset_import[0].version == 12
    calibration = _save(tmp_path / "cal.npz", x=_text_images(6, 64, seed=0))
    out = tmp_path / "bundle"
    with capture_logs() as logs:
        manifest = build_variants(
            ppocr_path,
            out,
            name="ppocr-det",
            version="4.0.0",
            calibration=calibration,
            validation=None,
            golden=None,
            targets=("onnx-fp32", "onnx-int8", "openvino-fp16"),
        )
    assert [v.id for v in manifest.variants] == ["onnx-fp32", "onnx-int8", "openvino-fp16"]
    upgraded = [e for e in logs if e["event"] == "opset_upgraded"]
    assert upgraded
    assert upgraded[0]["opset_from"] == 12
    fp32 = onnx.load(str(out / manifest.variant("onnx-fp32").entrypoint))
    assert {o.domain: o.version for o in fp32.opset_import}[""] == 13
    assert {n.domain for n in fp32.graph.node} <= {""}  # portable: no ORT-only fused ops
    assert set(_op_types(out / manifest.variant("onnx-int8").entrypoint)) >= QDQ_OPS
    for variant in manifest.variants[1:]:
        report = variant.accuracy
        assert report is not None
        assert report.metric == "rel_l2"
        assert report.samples == 6
        assert report.accepted == (report.delta <= 1.0)
        assert variant.status == ("accepted" if report.accepted else "rejected")
    assert len(manifest.golden) == 4
    with np.load(out / manifest.golden[0].file.path) as npz:
        assert npz["in:x"].shape == (1, 3, 64, 64)
        assert npz["out:sigmoid_0.tmp_0"].shape[-2:] == (64, 64)


# -- bad input: a clear error and nothing written ------------------------------------------


def _unloadable_onnx(path: Path) -> Path:
    node = helper.make_node("Frobnicate", ["input"], ["y"], domain="com.example")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)]
    )
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not_onnx", "not an ONNX model"),
        ("does_not_load", "does not load in ONNX Runtime"),
        ("calibration_shape", "input 'input': samples of shape 1x1x9x9 where ?x1x8x8"),
        ("calibration_dtype", "input 'input': dtype float64 where FP32"),
        ("calibration_names", "not model inputs"),
        ("validation_labels", "'labels' must be 540 integer class ids"),
        ("unknown_target", "unknown targets ['tensorrt-int4']"),
        ("bad_version", "not a semantic version"),
    ],
)
def test_bad_input_raises_and_leaves_no_bundle(
    case: str,
    message: str,
    digits_path: Path,
    digits: DigitsData,
    digits_sets: dict[str, Path],
    tmp_path: Path,
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    source, calibration, validation = digits_path, digits_sets["calibration"], None
    targets: tuple[str, ...] = ("onnx-fp32", "onnx-int8")
    version = "1.0.0"
    if case == "not_onnx":
        source = inputs / "model.onnx"
        source.write_bytes(b"this is a text file, not a model\n")
    elif case == "does_not_load":
        source = _unloadable_onnx(inputs / "model.onnx")
    elif case == "calibration_shape":
        calibration = _save(inputs / "c.npz", input=np.zeros((4, 1, 9, 9), np.float32))
    elif case == "calibration_dtype":
        calibration = _save(inputs / "c.npz", input=digits.x_train[:4].astype(np.float64))
    elif case == "calibration_names":
        calibration = _save(inputs / "c.npz", image=digits.x_train[:4])
    elif case == "validation_labels":
        validation = _save(inputs / "v.npz", input=digits.x_test, labels=digits.y_test[:10])
    elif case == "unknown_target":
        targets = ("onnx-fp32", "tensorrt-int4")
    else:
        version = "1.0"
    out = tmp_path / "out" / "bundle"
    with pytest.raises(BuildInputError) as info:
        build_variants(
            source,
            out,
            name="digits",
            version=version,
            calibration=calibration,
            validation=validation,
            golden=None,
            targets=targets,
        )
    assert message in str(info.value)
    assert isinstance(info.value, ControlPlaneBuildError)
    assert isinstance(info.value, InvalidInputError)
    assert info.value.status_code == 422
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_existing_bundle_is_not_overwritten(
    digits_path: Path, digits_sets: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("earlier build")
    with pytest.raises(BuildError, match="already exists and is not empty"):
        build_variants(
            digits_path,
            out,
            name="digits",
            version="1.0.0",
            calibration=digits_sets["calibration"],
            validation=None,
            golden=None,
            targets=("onnx-fp32",),
        )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_labels_on_a_non_classifier_fail_before_any_bundle(
    ppocr_path: Path, tmp_path: Path
) -> None:
    images = _text_images(2, 64, seed=1)
    validation = _save(tmp_path / "v.npz", x=images, labels=np.array([0, 1]))
    out = tmp_path / "out" / "bundle"
    with pytest.raises(BuildInputError, match="not one score vector per sample"):
        build_variants(
            ppocr_path,
            out,
            name="ppocr-det",
            version="1.0.0",
            calibration=None,
            validation=validation,
            golden=None,
            targets=("onnx-fp32",),
        )
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
