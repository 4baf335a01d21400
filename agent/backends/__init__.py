"""Inference runtimes behind one interface (``agent.backends.base``), and the registry that
tries them in order, skipping any that is not installed or refuses a model, with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable

from agent.backends.base import Artifact, Backend, LoadOptions, Probe, Session
from agent.errors import BackendUnavailableError, ModelLoadError
from agent.logs import get_logger

__all__ = [
    "Artifact",
    "Backend",
    "LoadOptions",
    "Probe",
    "Session",
    "all_backends",
    "get_backend",
    "load_first",
    "probe_all",
]

log = get_logger(__name__)


def all_backends() -> list[Backend]:
    """Every backend the agent knows, in the default preference order."""
    from agent.backends.onnxruntime import OnnxRuntimeBackend

    found: list[Backend] = []
    try:
        from agent.backends.tensorrt import TensorRTBackend

        found.append(TensorRTBackend())
    except ImportError:
        pass
    found.append(OnnxRuntimeBackend())
    try:
        from agent.backends.openvino import OpenVinoBackend

        found.append(OpenVinoBackend())
    except ImportError:
        pass
    return found


def get_backend(name: str) -> Backend:
    for backend in all_backends():
        if backend.name == name:
            return backend
    raise BackendUnavailableError(name, "unknown backend")


def probe_all() -> list[Probe]:
    return [b.probe() for b in all_backends()]


def load_first(
    artifact: Artifact, options: LoadOptions, order: Iterable[str] | None = None
) -> Session:
    """Load ``artifact`` on the first backend that can; each skip is logged with its reason.

    A ``ModelLoadError`` from a backend that *can* read the format is remembered and re-raised if
    no backend succeeds, since the model (not the runtime) is then the likely cause.
    """
    backends = all_backends()
    if order is not None:
        by_name = {b.name: b for b in backends}
        backends = [by_name[n] for n in order if n in by_name]
    reasons: list[str] = []
    model_error: ModelLoadError | None = None
    for backend in backends:
        if artifact.format not in backend.formats:
            continue
        probe = backend.probe()
        if not probe.usable:
            log.info("backend_skipped", backend=backend.name, reason=probe.reason)
            reasons.append(f"{backend.name}: {probe.reason}")
            continue
        try:
            return backend.load(artifact, options)
        except BackendUnavailableError as exc:
            log.info("backend_skipped", backend=backend.name, reason=exc.reason)
            reasons.append(f"{backend.name}: {exc.reason}")
        except ModelLoadError as exc:
            log.warning(
                "backend_load_failed", backend=backend.name, model=artifact.name, reason=str(exc)
            )
            reasons.append(f"{backend.name}: {exc}")
            model_error = model_error or exc
    if model_error is not None:
        raise model_error
    raise BackendUnavailableError(
        "any",
        f"no backend can run {artifact.format} for {artifact.name}: " + "; ".join(reasons)
        if reasons
        else f"no backend installed reads {artifact.format}",
    )
