"""Contracts shared by the agent and the control plane: pure pydantic models, nothing heavy.

Each payload carries ``schema_version``; JSON Schemas are generated from these models
(``python -m agent.contracts.schemas``) and published in docs/protocol.md.
"""

from agent.contracts.manifest import (
    AccuracyReport,
    BundleManifest,
    FileEntry,
    GoldenCase,
    Preprocessing,
    Provenance,
    TargetConstraints,
    Variant,
)
from agent.contracts.profile import BoardInfo, CpuInfo, GpuInfo, HardwareProfile, RuntimeInfo
from agent.contracts.state import DesiredModel, DesiredState, ReportedModel, ReportedState
from agent.contracts.tensors import DTYPES, TensorSpec

__all__ = [
    "DTYPES",
    "AccuracyReport",
    "BoardInfo",
    "BundleManifest",
    "CpuInfo",
    "DesiredModel",
    "DesiredState",
    "FileEntry",
    "GoldenCase",
    "GpuInfo",
    "HardwareProfile",
    "Preprocessing",
    "Provenance",
    "ReportedModel",
    "ReportedState",
    "RuntimeInfo",
    "TargetConstraints",
    "TensorSpec",
    "Variant",
]
