"""OpenVINO IR files of a build: the FP16-compressed IR of the normalized ONNX (NNCF's INT8 IR
is ``_int8``'s). Owns the calls into ``openvino`` for it and the translation of their errors;
running the IR to measure it is ``_measure``'s.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from agent.logs import get_logger
from control_plane.builds.errors import VariantBuildError, first_line

__all__ = ["convert_ir"]

log = get_logger(__name__)


def convert_ir(onnx_path: Path, xml_path: Path, *, target: str) -> None:
    """ONNX -> OpenVINO IR with weights compressed to FP16 (``model.xml`` + ``model.bin``).

    An already-quantized (QDQ) ONNX converts to an INT8 IR: OpenVINO reads the QDQ pairs as
    FakeQuantize and keeps them.
    """
    import openvino as ov

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = ov.convert_model(str(onnx_path))
            ov.save_model(model, str(xml_path), compress_to_fp16=True)
    except Exception as exc:  # OpenVINO raises its own untyped errors
        raise VariantBuildError(
            f"OpenVINO conversion failed: {first_line(exc)}", target=target
        ) from exc
