"""TensorRT backend (being written)."""

from __future__ import annotations

from typing import ClassVar

from agent.backends.base import Artifact, LoadOptions, Probe, Session
from agent.contracts.manifest import ArtifactFormat
from agent.errors import BackendUnavailableError


class TensorRTBackend:
    name: ClassVar[str] = "tensorrt"
    formats: ClassVar[tuple[ArtifactFormat, ...]] = ("onnx", "tensorrt-plan")

    def probe(self) -> Probe:
        return Probe(self.name, usable=False, reason="not implemented")

    def load(self, artifact: Artifact, options: LoadOptions) -> Session:
        raise BackendUnavailableError(self.name, "not implemented")
