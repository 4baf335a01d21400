"""What the local inference API and the inference loop need from the served models.

The model slots (``agent.models.slots``) implement ``ModelRepository``; the Open Inference Protocol
server (``agent.api``) and the loop only use this protocol, so either side can be tested alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from agent.contracts.tensors import TensorSpec

__all__ = ["Computed", "ModelRepository", "ServedModel"]


class Computed(NamedTuple):
    """Which version and variant computed an answer."""

    version: str
    variant_id: str


class ServedModel(Protocol):
    """One loaded version of a model."""

    name: str
    version: str
    variant_id: str
    backend: str  # e.g. "onnxruntime"
    device: str  # where it runs, e.g. "CPUExecutionProvider", "CPU"
    compute: str  # the float type it computes in where the runtime says ("bf16"), else ""
    choice: str  # why this variant serves
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int  # 0: no batch dimension; else the largest batch it takes

    @property
    def ready(self) -> bool: ...

    def infer(self, feeds: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        """Run once; raises ``InputError`` for bad feeds, ``InferenceError`` for failures.
        A request accepted here completes on this version even if a swap happens meanwhile."""
        ...

    def infer_versioned(
        self, feeds: Mapping[str, np.ndarray[Any, Any]]
    ) -> tuple[Computed, dict[str, np.ndarray[Any, Any]]]:
        """``infer``, and the version and variant that computed the outputs: during a swap
        that is not always the one named by ``version`` before or after the call."""
        ...


class ModelRepository(Protocol):
    def names(self) -> Sequence[str]: ...

    def versions(self, name: str) -> Sequence[str]:
        """Loaded versions of ``name``; ``ModelError`` if unknown."""
        ...

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """The active version (``version=None``) or a specific loaded one; ``ModelError``."""
        ...
