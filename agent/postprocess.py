"""Postprocessing for the inference loop: a model's raw outputs -> one typed result.

Owns the built-in postprocessors (``raw``: every output as a digest; ``topk``: classification
with softmax and labels; ``db_boxes``: PP-OCR's DB detection head as boxes, decoded by
``agent.contracts.accuracy.db_boxes``) and the plugin entry point: a distribution registers

    [project.entry-points."edgefleet.postprocessors"]
    my-decoder = "my_pkg.decoders:make_decoder"

and ``[loop.postprocess] kind = "plugin", name = "my-decoder", options = {...}`` picks it. The
factory is called once, at start, as ``factory(options, outputs)`` (``options`` a dict,
``outputs`` the model's output ``TensorSpec`` tuple) and returns the postprocessor: a callable
taking the outputs (name -> array) and returning a ``agent.contracts.results`` body
(``Classification``, ``Detection``, ``RawOutputs``, ``Custom``), a pydantic model or a dict
(both sent as ``Custom``). A plugin that is missing, does not import, or rejects its options is
a ``ConfigError`` at start; one that raises per frame is a ``PostprocessError`` for that frame.

Everything is decided in ``build_postprocessor`` before the loop starts (names resolved, label
count checked against the output's static shape); the per-frame call does array work only. The
result types live in ``agent.contracts.results``; sending them is ``agent.sinks``'s job.
"""

from __future__ import annotations

import importlib.metadata
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from agent.config import (
    DbBoxesPostprocessConfig,
    PluginPostprocessConfig,
    PostprocessConfig,
    RawPostprocessConfig,
    TopkPostprocessConfig,
)
from agent.contracts.accuracy import DbDecoding, db_boxes
from agent.contracts.results import (
    Box,
    Classification,
    ClassScore,
    Custom,
    Detection,
    OutputDigest,
    RawOutputs,
)
from agent.contracts.tensors import TensorSpec
from agent.errors import ConfigError, PostprocessError

__all__ = [
    "POSTPROCESSOR_GROUP",
    "DbBoxes",
    "Postprocessor",
    "RawDigest",
    "ResultBody",
    "TopK",
    "build_postprocessor",
    "load_plugin",
    "output_digest",
]

POSTPROCESSOR_GROUP = "edgefleet.postprocessors"

Array = np.ndarray[Any, Any]
ResultBody = RawOutputs | Classification | Detection | Custom
_BODIES = (RawOutputs, Classification, Detection, Custom)
_PROBABILITY_TOLERANCE = 1e-3  # scores summing to 1 within this are taken as probabilities


class Postprocessor(Protocol):
    """Turns one inference's outputs into a result body; ``name`` says which (for errors)."""

    name: str

    def __call__(self, outputs: Mapping[str, Array]) -> ResultBody: ...


def output_digest(arr: Array) -> OutputDigest:
    """Shape, and for numbers the flat argmax and its value (``None`` when not finite)."""
    if arr.size and arr.dtype.kind in "biuf":
        idx = int(arr.argmax())
        top = float(arr.flat[idx])
        return OutputDigest(
            shape=list(arr.shape), argmax=idx, max=top if math.isfinite(top) else None
        )
    return OutputDigest(shape=list(arr.shape))


class RawDigest:
    """Every output as a digest: what the loop's JSON lines held before postprocessing."""

    name = "raw"

    def __call__(self, outputs: Mapping[str, Array]) -> RawOutputs:
        return RawOutputs(outputs={k: output_digest(v) for k, v in outputs.items()})


def _pick_output(wanted: str | None, specs: Sequence[TensorSpec], kind: str) -> str:
    """The output ``wanted`` names (checked against the model), or the model's first; ``""``
    (the first output of each inference) when neither is known."""
    names = [s.name for s in specs]
    if wanted is not None:
        if names and wanted not in names:
            raise ConfigError(f"postprocess {kind}: the model has no output {wanted!r} ({names})")
        return wanted
    return names[0] if names else ""


def _get(outputs: Mapping[str, Array], name: str, pp: str) -> tuple[str, Array]:
    """(name, array) of the output ``name`` (``""``: the first one)."""
    if not name:
        name = next(iter(outputs), "")
    arr = outputs.get(name)
    if arr is None:
        raise PostprocessError(
            f"{pp}: no output {name!r} in the model's outputs {sorted(outputs)}", postprocessor=pp
        )
    return name, arr


class TopK:
    """The ``k`` best classes of the first sample of one output, best first.

    The output is ``(classes,)``, or ``(N, ..., classes)`` with size-1 axes between (its first
    sample is used). ``softmax``: ``"auto"`` turns logits into probabilities unless the scores
    are already a distribution (in [0, 1], summing to 1); ``"always"``/``"never"`` force it.
    """

    name = "topk"

    def __init__(
        self,
        *,
        output: str,
        k: int,
        labels: Sequence[str] | None = None,
        softmax: str = "auto",
        classes: int | None = None,
    ) -> None:
        if k < 1:
            raise ConfigError(f"postprocess topk: k must be >= 1, got {k}")
        if labels is not None and classes is not None and len(labels) != classes:
            raise ConfigError(
                f"postprocess topk: {len(labels)} labels for output {output!r} with "
                f"{classes} classes"
            )
        if classes is not None and k > classes:
            raise ConfigError(
                f"postprocess topk: k = {k} but output {output!r} has only {classes} classes"
            )
        self.output = output
        self.k = k
        self.labels = tuple(labels) if labels is not None else None
        self.softmax = softmax

    def __call__(self, outputs: Mapping[str, Array]) -> Classification:
        name, arr = _get(outputs, self.output, self.name)
        scores = _first_sample(arr, name)
        n = scores.shape[0]
        if self.labels is not None and len(self.labels) != n:
            raise PostprocessError(
                f"topk: output {name!r} has {n} classes, {len(self.labels)} labels",
                postprocessor=self.name,
            )
        probs = scores.astype(np.float64)
        if self.softmax == "always" or (self.softmax == "auto" and not _is_distribution(probs)):
            probs = probs - probs.max()
            np.exp(probs, out=probs)
            probs /= probs.sum()
        k = min(self.k, n)
        top = np.argpartition(-probs, k - 1)[:k] if k < n else np.arange(n)
        top = top[np.argsort(-probs[top], kind="stable")]
        labels = self.labels
        return Classification(
            output=name,
            classes=[
                ClassScore(
                    index=int(i),
                    label=labels[i] if labels is not None else None,
                    score=float(probs[i]),
                )
                for i in top
            ],
        )


def _first_sample(arr: Array, name: str) -> Array:
    if arr.ndim == 0 or arr.size == 0 or arr.dtype.kind not in "biuf":
        raise PostprocessError(
            f"topk: output {name!r} is {arr.dtype} {list(arr.shape)}, not class scores",
            postprocessor="topk",
        )
    first = arr.reshape(arr.shape[0], -1)[0] if arr.ndim > 1 else arr
    if arr.ndim > 1 and any(d != 1 for d in arr.shape[1:-1]):
        raise PostprocessError(
            f"topk: output {name!r} of shape {list(arr.shape)} is not one score vector per sample",
            postprocessor="topk",
        )
    if not np.all(np.isfinite(first)):
        raise PostprocessError(f"topk: output {name!r} holds NaN or inf", postprocessor="topk")
    return first


def _is_distribution(scores: Array) -> bool:
    return bool(
        scores.min() >= 0.0
        and scores.max() <= 1.0
        and abs(float(scores.sum()) - 1.0) <= _PROBABILITY_TOLERANCE
    )


def _static_classes(spec: TensorSpec | None) -> int | None:
    """Class count of a classifier output with a static last axis (else ``None``)."""
    if spec is None or not spec.shape:
        return None
    last = spec.shape[-1]
    return last if last > 0 else None


class DbBoxes:
    """DB decoding of a probability map ``(1, 1, H, W)`` / ``(1, H, W)`` / ``(H, W)`` into at
    most ``max_boxes`` boxes (best score first), one class ``label``."""

    name = "db_boxes"

    def __init__(
        self,
        *,
        output: str,
        decoding: DbDecoding,
        max_boxes: int = 100,
        label: str | None = "text",
    ) -> None:
        self.output = output
        self.decoding = decoding
        self.max_boxes = max_boxes
        self.label = label

    def __call__(self, outputs: Mapping[str, Array]) -> Detection:
        name, arr = _get(outputs, self.output, self.name)
        if arr.ndim < 2 or any(d != 1 for d in arr.shape[:-2]) or arr.size == 0:
            raise PostprocessError(
                f"db_boxes: output {name!r} of shape {list(arr.shape)} is not one probability map",
                postprocessor=self.name,
            )
        prob = arr.reshape(arr.shape[-2:])
        found = db_boxes(prob, self.decoding)
        if len(found) > self.max_boxes:
            found = found[np.argsort(-found[:, 4], kind="stable")[: self.max_boxes]]
        height, width = prob.shape
        return Detection(
            output=name,
            width=width,
            height=height,
            boxes=[
                Box(
                    x0=float(b[0]),
                    y0=float(b[1]),
                    x1=float(b[2]),
                    y1=float(b[3]),
                    score=float(b[4]),
                    label=self.label,
                )
                for b in found.tolist()
            ],
        )


class _Plugin:
    """A plugin's postprocessor, its results checked and wrapped as bodies."""

    def __init__(self, name: str, fn: Callable[[Mapping[str, Array]], Any]) -> None:
        self.name = f"plugin:{name}"
        self._plugin = name
        self._fn = fn

    def __call__(self, outputs: Mapping[str, Array]) -> ResultBody:
        try:
            value = self._fn(outputs)
        except PostprocessError:
            raise
        except Exception as exc:
            raise PostprocessError(
                f"{self.name} raised {type(exc).__name__}: {exc}", postprocessor=self.name
            ) from exc
        if isinstance(value, _BODIES):
            return value
        try:
            if isinstance(value, BaseModel):
                return Custom(name=self._plugin, data=value.model_dump(mode="json"))
            if isinstance(value, dict):
                return Custom(name=self._plugin, data=value)
        except PydanticValidationError as exc:
            raise PostprocessError(
                f"{self.name} returned a result that is not valid: {exc}", postprocessor=self.name
            ) from exc
        raise PostprocessError(
            f"{self.name} returned {type(value).__name__}, not a result (a result body from "
            "agent.contracts.results, a pydantic model or a dict)",
            postprocessor=self.name,
        )


def load_plugin(name: str) -> Callable[..., Any]:
    """The factory the entry point ``name`` of ``edgefleet.postprocessors`` names; a
    ``ConfigError`` that says why when it is not installed or does not import."""
    found = list(importlib.metadata.entry_points(group=POSTPROCESSOR_GROUP))
    matches = [ep for ep in found if ep.name == name]
    if not matches:
        installed = sorted({ep.name for ep in found}) or "none"
        raise ConfigError(
            f"postprocess plugin {name!r} is not installed: no entry point {name!r} in group "
            f"{POSTPROCESSOR_GROUP!r} (installed: {installed})"
        )
    entry = matches[0]
    try:
        factory = entry.load()
    except Exception as exc:  # ImportError, AttributeError, or anything the module raises
        raise ConfigError(
            f"postprocess plugin {name!r} ({entry.value}) does not load: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not callable(factory):
        raise ConfigError(f"postprocess plugin {name!r} ({entry.value}) is not callable")
    return factory  # type: ignore[no-any-return]


def _build_plugin(config: PluginPostprocessConfig, specs: tuple[TensorSpec, ...]) -> _Plugin:
    factory = load_plugin(config.name)
    try:
        fn = factory(dict(config.options), specs)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"postprocess plugin {config.name!r} refused its options: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(fn):
        raise ConfigError(
            f"postprocess plugin {config.name!r}: its factory returned {type(fn).__name__}, "
            "not a callable postprocessor"
        )
    return _Plugin(config.name, fn)


def build_postprocessor(
    config: PostprocessConfig | None, outputs: Sequence[TensorSpec] = ()
) -> Postprocessor:
    """The postprocessor ``config`` declares for a model with these ``outputs`` (its output
    specs: empty when unknown, then names and sizes are checked per frame only)."""
    specs = tuple(outputs)
    if config is None or isinstance(config, RawPostprocessConfig):
        return RawDigest()
    if isinstance(config, TopkPostprocessConfig):
        name = _pick_output(config.output, specs, "topk")
        spec = next((s for s in specs if s.name == name), None)
        return TopK(
            output=name,
            k=config.k,
            labels=config.labels,
            softmax=config.softmax,
            classes=_static_classes(spec),
        )
    if isinstance(config, DbBoxesPostprocessConfig):
        return DbBoxes(
            output=_pick_output(config.output, specs, "db_boxes"),
            decoding=DbDecoding(
                threshold=config.threshold,
                box_threshold=config.box_threshold,
                unclip_ratio=config.unclip_ratio,
                min_size=config.min_size,
            ),
            max_boxes=config.max_boxes,
            label=config.label,
        )
    return _build_plugin(config, specs)
