"""Every error the agent raises on purpose, rooted at ``AgentError``.

    AgentError
    +-- ConfigError              bad or missing configuration
    +-- ModelError               a model or bundle that cannot be used (carries ``model``)
    |   +-- ModelLoadError       missing/corrupt file, unsupported opset, runtime refused it
    |   +-- BundleError          manifest does not parse, file missing, digest mismatch
    |   +-- ValidationError      golden outputs outside tolerance
    |   +-- ShadowRefusedError   a shadow version refused here (memory, nothing serving)
    +-- InferenceError           a run failed
    |   +-- InputError           wrong tensor name, shape or dtype
    +-- BackendError             a runtime problem
    |   +-- BackendUnavailableError   runtime not installed or not usable here (carries ``reason``)
    +-- StoreError               the on-disk model store (install, activate, disk full)
    +-- UpdateError              the update client (download, verification, control plane)
    |   +-- DownloadError        the server's answer for this artifact is wrong (HTTP 404, ...)
    |   |   +-- TransientError   network or control plane away: retried, not the version's fault
    |   +-- LocalIOError         this device's disk failed (out of space, I/O error): retried
    |   +-- EnrollmentError      not enrolled and cannot enroll (corrupt credential, no token)
    |   +-- VerificationError
    |   +-- ResponseTooLargeError  an answer of the control plane past its size bound
    +-- TelemetryError           MQTT and the spool
    +-- PostprocessError         outputs a loop's postprocessor cannot decode
    +-- SinkError                a loop's result sink cannot take a result

Third-party errors are translated where they enter agent code (``raise X(...) from exc``).
"""

from __future__ import annotations

__all__ = [
    "AgentError",
    "BackendError",
    "BackendUnavailableError",
    "BundleError",
    "ConfigError",
    "DownloadError",
    "EnrollmentError",
    "InferenceError",
    "InputError",
    "LocalIOError",
    "ModelError",
    "ModelLoadError",
    "PostprocessError",
    "ResponseTooLargeError",
    "ShadowRefusedError",
    "SinkError",
    "StoreError",
    "TelemetryError",
    "TransientError",
    "UpdateError",
    "ValidationError",
    "VerificationError",
]


class AgentError(Exception):
    """Root of the agent's errors; the CLI prints ``Name: message`` and exits non-zero."""


class ConfigError(AgentError):
    """Configuration is missing, unreadable or invalid."""


class ModelError(AgentError):
    """A model or bundle cannot be used."""

    def __init__(self, message: str, *, model: str | None = None) -> None:
        self.model = model
        super().__init__(f"{model}: {message}" if model else message)


class ModelLoadError(ModelError):
    """A model file is missing, corrupt, uses an unsupported opset, or a runtime refused it."""


class ShadowRefusedError(ModelError):
    """A shadow version cannot run beside the serving one here (not enough memory, nothing
    serving): the device says why and keeps serving as it was."""


class BundleError(ModelError):
    """A bundle's manifest does not parse, a file is missing, or a digest does not match."""


class ValidationError(ModelError):
    """A model's outputs on its golden inputs are outside tolerance."""


class InferenceError(AgentError):
    """An inference call failed."""


class InputError(InferenceError):
    """A feed has a wrong tensor name, shape or dtype."""


class BackendError(AgentError):
    """A runtime failed in a way that is not the model's fault."""


class BackendUnavailableError(BackendError):
    """A runtime is not installed or cannot be used on this device."""

    def __init__(self, backend: str, reason: str) -> None:
        self.backend = backend
        self.reason = reason
        super().__init__(f"{backend} unavailable: {reason}")


class StoreError(AgentError):
    """The on-disk model store refused or failed an operation."""


class UpdateError(AgentError):
    """The update client failed."""


class DownloadError(UpdateError):
    """An artifact download failed."""


class TransientError(DownloadError):
    """The network or the control plane failed for a while (connection refused or reset, a
    timeout, HTTP 5xx): retried later, and never counted as a failure of the version."""


class LocalIOError(UpdateError):
    """This device's own disk failed while the update client wrote (TUF metadata, a partial
    download): out of space (``out_of_space``), a read-only file system, an I/O error. What was
    already downloaded stays for resume; not a failure of the version."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    @property
    def out_of_space(self) -> bool:
        import errno as _errno

        return self.errno in (_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG)


class EnrollmentError(UpdateError):
    """The device holds no usable credential and cannot enroll (its ``enrollment.json`` is
    corrupt and no bootstrap token is configured, or none was ever): it keeps serving what is
    installed and says so until an operator fixes it."""


class VerificationError(UpdateError):
    """Downloaded metadata or an artifact failed verification."""


class ResponseTooLargeError(UpdateError):
    """The control plane answered more bytes than the bound for that answer; the rest was not
    read. ``limit`` is the bound in bytes, ``what`` names the answer."""

    def __init__(self, message: str, *, what: str, limit: int) -> None:
        self.what = what
        self.limit = limit
        super().__init__(message)


class TelemetryError(AgentError):
    """MQTT publishing or the on-disk spool failed."""


class PostprocessError(AgentError):
    """A model's outputs that the loop's postprocessor cannot turn into a result (missing
    output, wrong shape, a plugin that raised or returned something that is not a result)."""

    def __init__(self, message: str, *, postprocessor: str) -> None:
        self.postprocessor = postprocessor
        super().__init__(message)


class SinkError(AgentError):
    """A result sink that cannot take a result (file not writable, message over its size)."""

    def __init__(self, message: str, *, sink: str) -> None:
        self.sink = sink
        super().__init__(message)
