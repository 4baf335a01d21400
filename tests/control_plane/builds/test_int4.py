"""INT4 weight-only variants on a real transformer (all-MiniLM-L6-v2 built from safetensors).

The gate is the embedding task's: cosine similarity and top-10 retrieval agreement with FP32
over the project's 240-sentence corpus; the worse of the two decides. The accepted case (both
runtimes, weight bytes, census) runs through the service in
``tests/control_plane/test_full_build.py``; serving in ``tests/agent/api/test_minilm.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from agent import minilm
from agent.contracts.manifest import BundleManifest
from control_plane.builds import Int8Search, build_variants

INT4 = ("onnx-int4", "openvino-int4")


@pytest.fixture(scope="module")
def minilm_path(samples_dir: Path) -> Path:
    return minilm.minilm_onnx(samples_dir)


@pytest.fixture(scope="module")
def corpus_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "val.npz"
    np.savez(path, **minilm.encode(minilm.corpus()))  # type: ignore[arg-type]
    return path


@pytest.fixture(scope="module")
def calibration_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Other sentences of the same topics than the validation corpus's."""
    path = tmp_path_factory.mktemp("calibration") / "cal.npz"
    np.savez(path, **minilm.encode(minilm.corpus(48, seed=7)))  # type: ignore[arg-type]
    return path


def _build(
    minilm_path: Path,
    corpus_npz: Path,
    out: Path,
    budget: float,
    targets: tuple[str, ...],
    search: Int8Search | None = None,
    calibration: Path | None = None,
) -> BundleManifest:
    return build_variants(
        minilm_path,
        out,
        name="minilm",
        version="1.0.0",
        calibration=calibration,
        validation=corpus_npz,
        golden=None,
        accuracy_budget=budget,
        targets=targets,
        task=None,  # the ONNX file declares "embedding" in its metadata
        search=search,
    )


def test_int4_losing_more_than_the_budget_is_rejected_naming_the_metric(
    minilm_path: Path, corpus_npz: Path, tmp_path: Path
) -> None:
    manifest = _build(
        minilm_path,
        corpus_npz,
        tmp_path / "bundle",
        0.05,
        ("onnx-int4",),
        Int8Search(max_steps=1),  # one 8-bit step after the sensitivity pass, then judged
    )
    for target in ("onnx-int4",):
        variant = manifest.variant(target)
        assert variant.status == "rejected"
        assert variant.accuracy is not None
        assert variant.accuracy.metric in ("cosine", "retrieval")
        assert variant.accuracy.reason is not None
        assert variant.accuracy.reason.startswith(variant.accuracy.metric)
        assert variant.build is not None
        assert [s.kept_float for s in variant.build.steps] == [0, 1]  # all 4-bit, then 1 in 8


def test_onnx_int4_keeps_the_costliest_matmuls_in_8_bits_until_the_budget_holds(
    minilm_path: Path, corpus_npz: Path, tmp_path: Path
) -> None:
    """All 4-bit loses about 4.3 points of top-10 retrieval agreement here; a budget of 4
    sends the search to 8-bit blocks for the most sensitive MatMul nodes until it holds; the
    build report names them and each step's cost."""
    manifest = _build(minilm_path, corpus_npz, tmp_path / "bundle", 4.0, ("onnx-int4",))
    variant = manifest.variant("onnx-int4")
    assert variant.status == "accepted", variant.accuracy
    assert variant.accuracy is not None
    assert variant.accuracy.delta <= 4.0
    assert variant.build is not None
    steps = variant.build.steps
    assert steps[0].kept_float == 0
    assert steps[0].delta > 4.0
    assert steps[-1].kept_float == len(variant.build.kept_float) > 0
    assert steps[-1].delta <= 4.0
    assert "8-bit blocks" in (variant.build.recipe or "")
    assert variant.build.precisions["int8"] == len(variant.build.kept_float)  # census agrees


def test_onnx_int4_by_gptq_holds_with_every_matmul_in_4_bits(
    minilm_path: Path, corpus_npz: Path, calibration_npz: Path, tmp_path: Path
) -> None:
    """With a calibration set the MatMul weights' 4-bit blocks are GPTQ's (computed against the
    activations the set puts into each MatMul): every MatMul in 4 bits then loses about 3 points
    of top-10 retrieval and under 1 of cosine (round-to-nearest: 4.3 and 2.5), so a budget of 3.5
    holds at the first step, with no MatMul in 8 bits."""
    with capture_logs() as logs:
        manifest = _build(
            minilm_path,
            corpus_npz,
            tmp_path / "bundle",
            3.5,
            ("onnx-int4", "onnx-int4-fp16"),
            calibration=calibration_npz,
        )
    assert [e["event"] for e in logs].count("int4_gptq") == 1  # one GPTQ for both targets
    _check_gpu_variant(manifest, tmp_path / "bundle")
    variant = manifest.variant("onnx-int4")
    assert variant.status == "accepted", variant.accuracy
    assert variant.accuracy is not None
    assert variant.build is not None
    assert [s.kept_float for s in variant.build.steps] == [0]
    assert variant.build.kept_float == ()
    assert "GPTQ over 48 calibration samples" in variant.build.steps[0].action
    assert "GPTQ over 48 calibration samples" in (variant.build.recipe or "")
    assert variant.accuracy.metrics["cosine"] >= 98.8, variant.accuracy.metrics  # 99.13 here
    assert variant.build.precisions.get("int8", 0) == 0
    assert variant.build.precisions["int4"] >= 36  # every MatMul, and the embedding table


def _check_gpu_variant(manifest: BundleManifest, bundle: Path) -> None:
    """``onnx-int4-fp16``: the same GPTQ blocks over the FP16 graph, FP16 scales and
    activations, gated like the rest and offered to NVIDIA GPUs only."""
    import onnx
    from onnx import TensorProto

    variant = manifest.variant("onnx-int4-fp16")
    assert variant.status == "accepted", variant.accuracy
    assert variant.target.accelerator == "nvidia-gpu"
    assert variant.accuracy is not None
    assert variant.accuracy.metrics["cosine"] >= 98.8, variant.accuracy.metrics  # 99.22 here
    assert variant.build is not None
    assert "over the FP16 graph" in (variant.build.recipe or "")
    assert variant.build.precisions["int4"] >= 36
    assert variant.build.precisions.get("fp16", 0) > 0
    fp32_bytes = Path(minilm.minilm_onnx()).stat().st_size
    assert variant.build.weight_bytes < 0.2 * fp32_bytes  # 4-bit blocks, FP16 scales
    graph = onnx.load(str(bundle / variant.entrypoint)).graph
    types = {i.name: i.data_type for i in graph.initializer}
    scales = [n.input[2] for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(scales) == 36
    assert {types[s] for s in scales} == {TensorProto.FLOAT16}
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.INT64  # tokens, as before


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
