"""The upload gate: an uploaded version is checked with the builds library's own rules.

Owns running those checks synchronously, before anything is stored, so a bad upload is a 422
(``InvalidInputError`` naming the multipart field) and never a failed job later; and keeping
their memory bounded: sample sets are sized from their ``.npy`` headers before anything is
decompressed, and a model's constants are sized from the graph before ONNX Runtime loads it.
A ``MemoryError`` in a check is the upload's fault (it needs more than the service gives one
check) and is a 422 too. The rules themselves (what is ONNX, what loads, how sample sets fit
the inputs) belong to ``control_plane.builds``; this module only calls them.
"""

from __future__ import annotations

from pathlib import Path

from control_plane.builds._onnx import MAX_CONSTANT_BYTES, check_classifier_output, read_source
from control_plane.builds._samples import MAX_SAMPLE_BYTES, load_samples
from control_plane.errors import InvalidInputError

__all__ = ["check_upload"]


def check_upload(
    onnx: Path,
    *,
    calibration: Path | None = None,
    validation: Path | None = None,
    golden: Path | None = None,
    task: str | None = None,
    max_sample_bytes: int = MAX_SAMPLE_BYTES,
    max_constant_bytes: int = MAX_CONSTANT_BYTES,
) -> bool:
    """Raise ``InvalidInputError`` if the build would refuse these inputs (``task``: the
    upload's, None: the model's metadata or inferred); return whether the model is already
    quantized (QDQ nodes: it is kept as it is)."""
    field = "onnx"
    has_labels = False
    try:
        source = read_source(onnx, max_constant_bytes=max_constant_bytes)
        if calibration is None and validation is None and golden is None:
            raise InvalidInputError(
                "give at least one sample set (calibration, validation or golden)",
                field="calibration",
            )
        for field, path, labelled in (
            ("calibration", calibration, False),
            ("validation", validation, True),
            ("golden", golden, False),
        ):
            if path is not None:
                samples = load_samples(
                    path,
                    source.inputs,
                    field=field,
                    labelled=labelled,
                    max_bytes=max_sample_bytes,
                )
                has_labels = has_labels or samples.labels is not None
        check_classifier_output(source, task=task, labelled=has_labels)
    except MemoryError:
        raise InvalidInputError(
            "checking it needs more memory than one upload check may use", field=field
        ) from None
    return source.quantized
