"""INT4 weight-only variants on a real transformer (all-MiniLM-L6-v2 built from safetensors).

The gate is the embedding task's: cosine similarity and top-10 retrieval agreement with FP32
over the project's 240-sentence corpus; the worse of the two decides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from structlog.testing import capture_logs

from agent import minilm
from agent.contracts.manifest import BundleManifest
from control_plane.builds import build_variants

INT4 = ("onnx-int4", "openvino-int4")


@pytest.fixture(scope="module")
def minilm_path(samples_dir: Path) -> Path:
    return minilm.minilm_onnx(samples_dir)


@pytest.fixture(scope="module")
def corpus_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "val.npz"
    np.savez(path, **minilm.encode(minilm.corpus()))  # type: ignore[arg-type]
    return path


def _build(
    minilm_path: Path, corpus_npz: Path, out: Path, budget: float, targets: tuple[str, ...]
) -> BundleManifest:
    return build_variants(
        minilm_path,
        out,
        name="minilm",
        version="1.0.0",
        calibration=None,
        validation=corpus_npz,
        golden=None,
        accuracy_budget=budget,
        targets=targets,
        task=None,  # the ONNX file declares "embedding" in its metadata
    )


def test_int4_variants_shrink_weights_and_are_gated_on_embeddings(
    minilm_path: Path, corpus_npz: Path, tmp_path: Path
) -> None:
    manifest = _build(
        minilm_path, corpus_npz, tmp_path / "bundle", budget=10.0, targets=("onnx-fp32", *INT4)
    )
    fp32 = manifest.variant("onnx-fp32")
    assert fp32.build is not None
    for target in INT4:
        variant = manifest.variant(target)
        assert variant.precision == "int4"
        assert variant.status == "accepted", variant.accuracy
        report, build = variant.accuracy, variant.build
        assert report is not None
        assert build is not None
        assert report.metric in ("cosine", "retrieval")
        assert report.metrics["cosine"] > 95.0
        assert report.metrics["retrieval"] > 90.0
        assert build.weight_bytes < 0.3 * fp32.build.weight_bytes
        assert build.precisions.get("int4", 0) >= 30  # 6 layers x 6 projections, most in 4 bits
        assert build.latency_ms is not None
    # ONNX Runtime's file runs with the INT64 token feeds and gives unit vectors
    session = ort.InferenceSession(
        str(tmp_path / "bundle" / "onnx-int4" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    out = session.run(None, minilm.encode(["A short sentence.", "Another one, longer."]))[0]
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-4)


def test_int4_losing_more_than_the_budget_is_rejected_naming_the_metric(
    minilm_path: Path, corpus_npz: Path, tmp_path: Path
) -> None:
    manifest = _build(minilm_path, corpus_npz, tmp_path / "bundle", 0.05, ("onnx-int4",))
    for target in ("onnx-int4",):
        variant = manifest.variant(target)
        assert variant.status == "rejected"
        assert variant.accuracy is not None
        assert variant.accuracy.metric in ("cosine", "retrieval")
        assert variant.accuracy.reason is not None
        assert variant.accuracy.reason.startswith(variant.accuracy.metric)


def test_int4_is_not_planned_for_a_convolutional_model(digits_path: Path, tmp_path: Path) -> None:
    from agent.samples import digits_data

    val = tmp_path / "val.npz"
    data = digits_data()
    np.savez(val, input=data.x_test[:32])
    with capture_logs() as logs:
        manifest = build_variants(
            digits_path,
            tmp_path / "bundle",
            name="digits",
            version="1.0.0",
            calibration=None,
            validation=val,
            golden=None,
            targets=("onnx-fp32", *INT4),
        )
    assert [v.id for v in manifest.variants] == ["onnx-fp32"]
    assert any(e["event"] == "int4_not_planned" for e in logs)
