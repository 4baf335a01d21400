"""Every error the control plane raises on purpose, rooted at ``ControlPlaneError``.

    ControlPlaneError                 (status_code 500 unless a branch says otherwise)
    +-- ConfigError                   bad or missing settings
    +-- StorageError                  the artifact store or the database failed
    |   +-- UnavailableError    503   the database does not answer (``/readyz``)
    +-- BuildError                    a variant build failed (recorded on the job row)
    +-- RequestError                  the caller asked for something wrong (4xx)
    |   +-- InvalidInputError   422   an upload or field that cannot be used (carries ``field``)
    |   +-- NotFoundError       404   no such model, version, device, job or artifact
    |   +-- ConflictError       409   it exists already (a model name, a version)
    |   +-- AuthError           401   missing, unknown or forged credential
    |   +-- ForbiddenError      403   the credential may not do this
    |   |   +-- CsrfError       403   a web form that this page did not send
    |   +-- RangeNotSatisfiableError 416
    |   +-- PayloadTooLargeError 413 a body (or one file of it) over its bound (carries ``limit``)
    |   +-- HeadersTooLargeError 431 request headers over their bound
    +-- ClientError                   ``edgectl``: the server answered with an error or not at all

The HTTP layer maps ``status_code`` to the response and ``type(exc).__name__`` to the JSON
``error`` field; third-party errors are translated where they enter (``raise X(...) from exc``).
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "BuildError",
    "ClientError",
    "ConfigError",
    "ConflictError",
    "ControlPlaneError",
    "CsrfError",
    "ForbiddenError",
    "HeadersTooLargeError",
    "InvalidInputError",
    "NotFoundError",
    "PayloadTooLargeError",
    "RangeNotSatisfiableError",
    "RequestError",
    "StorageError",
    "UnavailableError",
]


class ControlPlaneError(Exception):
    """Root of the control plane's errors; ``edgectl`` prints ``Name: message`` and exits 1."""

    status_code: int = 500


class ConfigError(ControlPlaneError):
    """Settings are missing, unreadable or invalid."""


class StorageError(ControlPlaneError):
    """The artifact store or the database failed in a way that is not the caller's fault."""


class UnavailableError(StorageError):
    """A dependency the service needs does not answer."""

    status_code = 503


class BuildError(ControlPlaneError):
    """A variant build failed."""


class RequestError(ControlPlaneError):
    """The caller asked for something that cannot be done; a 4xx."""

    status_code = 400


class InvalidInputError(RequestError):
    """An upload or a field cannot be used; ``field`` names it."""

    status_code = 422

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class NotFoundError(RequestError):
    status_code = 404


class ConflictError(RequestError):
    status_code = 409


class AuthError(RequestError):
    """Missing, unknown or forged credential."""

    status_code = 401


class ForbiddenError(RequestError):
    """A valid credential that may not do this."""

    status_code = 403


class CsrfError(ForbiddenError):
    """A form post to the web page without this page's anti-forgery token, or cross-site."""


class RangeNotSatisfiableError(RequestError):
    status_code = 416

    def __init__(self, message: str, *, size: int) -> None:
        self.size = size
        super().__init__(message)


class PayloadTooLargeError(RequestError):
    """A request body, or one file in it, is over its bound; the rest was not read."""

    status_code = 413

    def __init__(self, message: str, *, limit: int) -> None:
        self.limit = limit
        super().__init__(message)


class HeadersTooLargeError(RequestError):
    """The request's header block is over its bound."""

    status_code = 431


class ClientError(ControlPlaneError):
    """``edgectl``: the server answered with an error (``error`` is its name) or not at all."""

    def __init__(self, message: str, *, error: str = "ClientError", status_code: int = 0) -> None:
        self.error = error
        self.status_code = status_code
        super().__init__(message)
