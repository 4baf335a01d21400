"""OpenVINO backend (being written)."""

from __future__ import annotations

from typing import ClassVar

from agent.backends.base import Artifact, LoadOptions, Probe, Session
from agent.contracts.manifest import ArtifactFormat
from agent.errors import BackendUnavailableError


class OpenVinoBackend:
    name: ClassVar[str] = "openvino"
    formats: ClassVar[tuple[ArtifactFormat, ...]] = ("onnx", "openvino-ir")

    def probe(self) -> Probe:
        return Probe(self.name, usable=False, reason="not implemented")

    def load(self, artifact: Artifact, options: LoadOptions) -> Session:
        raise BackendUnavailableError(self.name, "not implemented")
