"""OpenVINO IR files of a build: FP16-compressed IR and NNCF INT8 IR from the normalized ONNX.

Owns the calls into ``openvino`` and ``nncf`` and the translation of their errors. The ONNX
side is ``_onnx``'s; running the IR to measure it is ``_measure``'s.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

from agent.logs import get_logger
from control_plane.builds._samples import SampleSet
from control_plane.builds.errors import VariantBuildError, first_line

__all__ = ["MAX_CALIBRATION_SAMPLES", "convert_ir", "quantize_ir"]

log = get_logger(__name__)

MAX_CALIBRATION_SAMPLES = 300  # NNCF's own default subset size


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


def quantize_ir(
    onnx_path: Path, xml_path: Path, calibration: SampleSet, *, target: str = "openvino-int8"
) -> None:
    """ONNX -> OpenVINO model -> ``nncf.quantize`` (default preset, calibration set) -> IR."""
    import nncf
    import openvino as ov

    samples = calibration.head(MAX_CALIBRATION_SAMPLES)
    feeds = [samples.feed(i) for i in range(len(samples))]
    started = time.monotonic()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = ov.convert_model(str(onnx_path))
            quantized = nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds))
            ov.save_model(quantized, str(xml_path), compress_to_fp16=True)
    except Exception as exc:  # NNCF and OpenVINO raise anything
        raise VariantBuildError(
            f"NNCF quantization failed: {first_line(exc)}", target=target
        ) from exc
    log.info("nncf_quantized", samples=len(feeds), seconds=round(time.monotonic() - started, 2))
