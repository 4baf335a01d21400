"""The gRPC message classes the server uses, built from the committed descriptor set.

They live in a private descriptor pool, not in protobuf's default one, for two reasons: a process
that also imports another copy of the KServe/Triton protocol (``tritonclient.grpc``, ``kserve``)
would otherwise fail with duplicate ``inference.*`` symbols; and the generated ``_pb2`` modules
carry a runtime check that ties them to the protobuf release that generated them, while a
descriptor set loads on any protobuf >= 4.25.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["SERVICE_NAME", "messages"]

SERVICE_NAME = "inference.GRPCInferenceService"
_DESC = Path(__file__).resolve().parent / "_proto" / "grpc_service.desc"
_NAMES = (
    "ServerLiveRequest",
    "ServerLiveResponse",
    "ServerReadyRequest",
    "ServerReadyResponse",
    "ModelReadyRequest",
    "ModelReadyResponse",
    "ServerMetadataRequest",
    "ServerMetadataResponse",
    "ModelMetadataRequest",
    "ModelMetadataResponse",
    "ModelInferRequest",
    "ModelInferResponse",
    "InferParameter",
    "InferTensorContents",
    *(
        f"{kind}SharedMemory{call}{part}"
        for kind in ("System", "Cuda")
        for call in ("Status", "Register", "Unregister")
        for part in ("Request", "Response")
    ),
)
_cache: dict[str, Any] = {}


def messages() -> dict[str, Any]:
    """Message classes by short name (``"ModelInferRequest"`` -> class)."""
    if not _cache:
        files = descriptor_pb2.FileDescriptorSet.FromString(_DESC.read_bytes())
        pool = descriptor_pool.DescriptorPool()
        for proto in files.file:
            pool.Add(proto)
        for name in _NAMES:
            desc = pool.FindMessageTypeByName(f"inference.{name}")
            _cache[name] = message_factory.GetMessageClass(desc)
    return _cache
