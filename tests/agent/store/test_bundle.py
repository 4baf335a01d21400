"""Bundles: build, verify, golden comparison, archives and their path-traversal checks."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from agent.contracts.manifest import Tolerance
from agent.errors import BundleError
from agent.models.bundle import (
    ArchiveReader,
    build_bundle,
    compare_outputs,
    golden_sets,
    pack,
    read_manifest,
    unpack,
    verify_bundle,
)
from tests.agent.store.conftest import expected_logits


def test_build_bundle_records_fp32_reference(
    bundles: dict[str, Path], model_files: dict[str, Path], golden_x: np.ndarray
) -> None:
    manifest = verify_bundle(bundles["2.0.0"])
    assert (manifest.name, manifest.version) == ("digits", "2.0.0")
    variant = manifest.variants[0]
    assert (variant.id, variant.runtime, variant.precision) == (
        "onnxruntime-fp32",
        "onnxruntime",
        "fp32",
    )
    assert variant.inputs[0].name == "input"
    [case] = golden_sets(bundles["2.0.0"], manifest)
    np.testing.assert_array_equal(case.inputs["input"], golden_x)
    np.testing.assert_allclose(
        case.outputs["logits"], expected_logits(model_files["2.0.0"], golden_x), rtol=1e-6
    )


def test_build_bundle_takes_tuples_and_refuses_a_dirty_dir(
    tmp_path: Path, model_files: dict[str, Path]
) -> None:
    manifest = build_bundle(
        tmp_path / "b", "digits", "1.2.3", [(model_files["1.0.0"], "onnxruntime", "fp32")]
    )
    assert manifest.golden
    assert manifest.variants[0].entrypoint.endswith("v1.0.0.onnx")
    with pytest.raises(BundleError, match="not empty"):
        build_bundle(tmp_path / "b", "digits", "1.2.4", [(model_files["1.0.0"],)])


def test_compare_outputs_uses_relative_l2_per_output() -> None:
    ref = {"y": np.array([1.0, 2.0, 2.0], np.float32)}  # norm 3
    assert (
        compare_outputs({"y": ref["y"] + [0.0, 0.0, 0.0015]}, ref, Tolerance(max_rel_l2=1e-3)) == []
    )
    [problem] = compare_outputs({"y": ref["y"] + [0.0, 0.0, 0.3]}, ref, Tolerance(max_rel_l2=1e-3))
    assert "rel L2 0.1 > 0.001" in problem
    assert "missing" in compare_outputs({}, ref, Tolerance())[0]
    assert (
        "max abs"
        in compare_outputs(
            {"y": ref["y"] + [0.0, 0.0, 0.002]}, ref, Tolerance(max_rel_l2=1e-2, max_abs=1e-3)
        )[0]
    )


def test_pack_unpack_round_trip_is_reproducible(bundles: dict[str, Path], tmp_path: Path) -> None:
    a = pack(bundles["1.0.0"], tmp_path / "a.tar.gz")
    b = pack(bundles["1.0.0"], tmp_path / "b.tar")
    again = pack(bundles["1.0.0"], tmp_path / "c.tar")
    assert b.read_bytes() == again.read_bytes()
    manifest = unpack(a, tmp_path / "out")
    assert verify_bundle(tmp_path / "out") == manifest == read_manifest(bundles["1.0.0"])


def _tar_with(tmp_path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (_file("../escape.txt"), "unsafe path"),
        (_file("/etc/escape.txt"), "unsafe path"),
        (_file("a/../../escape.txt"), "unsafe path"),
    ],
)
def test_archive_paths_cannot_escape(
    tmp_path: Path, member: tuple[tarfile.TarInfo, bytes], reason: str
) -> None:
    archive = _tar_with(tmp_path, _file("manifest.json", b"{}"), member)
    with pytest.raises(BundleError, match=reason):
        unpack(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "out").exists()


def test_archive_links_are_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("variants/m.onnx")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    archive = _tar_with(tmp_path, _file("manifest.json", b"{}"), (link, None))
    with pytest.raises(BundleError, match="not a regular file"):
        ArchiveReader(archive)


def test_archive_under_one_top_directory_is_read(bundles: dict[str, Path], tmp_path: Path) -> None:
    archive = tmp_path / "nested.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(bundles["1.0.0"], arcname="digits-1.0.0")
    with ArchiveReader(archive) as reader:
        manifest = json.loads(reader.read("manifest.json"))
    assert manifest["version"] == "1.0.0"


def test_truncated_archive_is_a_bundle_error(archives: dict[str, Path], tmp_path: Path) -> None:
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archives["1.0.0"].read_bytes()[:2000])
    with pytest.raises(BundleError):
        unpack(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()
