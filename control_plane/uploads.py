"""The upload gate: an uploaded version is checked with the builds library's own rules.

Owns running those checks synchronously, before anything is stored, so a bad upload is a 422
(``InvalidInputError`` naming the multipart field) and never a failed job later. The rules
themselves (what is ONNX, what loads, how sample sets fit the inputs) belong to
``control_plane.builds``; this module only calls them.
"""

from __future__ import annotations

from pathlib import Path

from control_plane.builds._onnx import read_source
from control_plane.builds._samples import load_samples
from control_plane.errors import InvalidInputError

__all__ = ["check_upload"]


def check_upload(
    onnx: Path,
    *,
    calibration: Path | None = None,
    validation: Path | None = None,
    golden: Path | None = None,
) -> bool:
    """Raise ``InvalidInputError`` if the build would refuse these inputs; return whether the
    model is already quantized (QDQ nodes: it is kept as it is)."""
    source = read_source(onnx)
    if calibration is None and validation is None and golden is None:
        raise InvalidInputError(
            "give at least one sample set (calibration, validation or golden)",
            field="calibration",
        )
    if calibration is not None:
        load_samples(calibration, source.inputs, field="calibration")
    if validation is not None:
        load_samples(validation, source.inputs, field="validation", labelled=True)
    if golden is not None:
        load_samples(golden, source.inputs, field="golden")
    return source.quantized
