"""Errors of the variant builder; all of them are ``control_plane.errors.BuildError``.

    BuildError (control_plane.errors)   a build produced no bundle
    +-- BuildInputError          422    the upload cannot be built: not ONNX, does not load,
    |                                   sample sets that do not fit the model, bad target list
    |                                   (also an ``InvalidInputError``; ``field`` names the part)
    +-- VariantBuildError               a tool failed on one target (carries ``target``); the
                                        build leaves that variant out and goes on

Third-party errors are translated where they enter (``raise X(...) from exc``).
"""

from __future__ import annotations

from control_plane.errors import BuildError, InvalidInputError

__all__ = ["BuildError", "BuildInputError", "VariantBuildError"]


class BuildInputError(BuildError, InvalidInputError):
    """The source model or a sample set cannot be used; ``field`` names which upload part."""


class VariantBuildError(BuildError):
    """Building one target's variant failed; the message says which tool and why."""

    def __init__(self, message: str, *, target: str) -> None:
        self.target = target
        super().__init__(f"{target}: {message}")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text, bounded, for messages and log fields."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
