"""Task metrics: how far a model's outputs are from a reference's, in the task's own terms.

Owns the meaning of every accuracy metric the variant gate decides on, and the DB decoding
(threshold, connected components, boxes) that turns a text detector's probability map into
boxes. Pure NumPy, no runtime, no I/O: the control plane gates variants with it at build time
and the agent may compare a shadow version's outputs with the same functions. Running models
is the caller's.

Every metric is a percentage where the reference scores 100 against itself, except ``top1``
(percent of labels hit, reference = FP32's own top-1) and ``rel_l2`` (the error itself, the
reference 0). ``delta`` is always "points lost": ``reference - value``, or ``value`` for
``rel_l2``; a budget is in the same points.

- ``classification``: ``top1`` with labels, else ``agreement`` (arg-max equal to the
  reference's);
- ``detection``: ``box_f1``, boxes after DB decoding matched one-to-one at IoU >= 0.5 (also
  reports ``mask_iou`` of the thresholded maps);
- ``segmentation``: ``mask_iou`` of thresholded (one channel) or arg-max (classes) maps;
- ``embedding``: ``cosine`` and ``retrieval`` (top-k neighbour agreement), the worse decides;
- ``generic``: ``rel_l2``, ``100 * ||out - ref|| / ||ref||`` over the worst output.

Every task also reports ``rel_l2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "METRICS",
    "TASKS",
    "DbDecoding",
    "Metric",
    "Task",
    "TaskScore",
    "box_f1",
    "box_iou",
    "connected_components",
    "cosine_similarity",
    "db_boxes",
    "is_classifier",
    "mask_iou",
    "match_boxes",
    "rel_l2",
    "retrieval_agreement",
    "score_task",
]

Task = Literal["classification", "detection", "segmentation", "embedding", "generic"]
Metric = Literal["top1", "agreement", "box_f1", "mask_iou", "cosine", "retrieval", "rel_l2"]
TASKS: tuple[str, ...] = get_args(Task)
METRICS: tuple[str, ...] = get_args(Metric)

Array = np.ndarray[Any, Any]
_EPS = 1e-12


class DbDecoding(BaseModel):
    """DB post-processing of a text detector's probability map (PP-OCR's defaults).

    ``threshold`` binarizes the map; each 8-connected region becomes an axis-aligned box whose
    mean probability must reach ``box_threshold``; boxes grow by ``area * unclip_ratio /
    perimeter`` on every side (DB's unclip, for a rectangle); boxes with a side under
    ``min_size`` pixels are dropped, before and (``min_size + 2``) after growing.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    threshold: float = Field(default=0.3, gt=0.0, lt=1.0)
    box_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    unclip_ratio: float = Field(default=1.6, ge=0.0)
    min_size: int = Field(default=3, ge=0)
    dilate: bool = True  # 2x2 dilation of the binary map, as PP-OCR's ``use_dilation``
    max_candidates: int = Field(default=1000, ge=1)
    iou: float = Field(default=0.5, gt=0.0, le=1.0)  # match threshold for box F1


# -- generic ------------------------------------------------------------------------------------


def rel_l2(value: Array, reference: Array) -> float:
    """``||value - reference|| / ||reference||`` over every element (a fraction, not percent)."""
    ref = reference.astype(np.float64).ravel()
    diff = float(np.linalg.norm(value.astype(np.float64).ravel() - ref))
    return diff / max(float(np.linalg.norm(ref)), _EPS)


def is_classifier(reference: Array) -> bool:
    """A first output holding one score vector per sample: ``(N, classes)``, ``(N, 1, classes)``."""
    per_sample = [d for d in reference.shape[1:] if d != 1]
    return len(per_sample) == 1 and per_sample[0] > 1 and reference.dtype.kind == "f"


def _top1(output: Array) -> Array:
    return np.asarray(output.reshape(output.shape[0], -1).argmax(axis=1))


# -- connected components and DB boxes ---------------------------------------------------------


def _find(parent: list[int], i: int) -> int:
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:  # path compression
        parent[i], i = root, parent[i]
    return root


def connected_components(mask: Array) -> tuple[Array, int]:
    """8-connected regions of a 2-D boolean mask as horizontal runs.

    Returns ``(runs, count)``: ``runs`` is ``(R, 4)`` int64 rows of ``(label, row, start,
    stop)`` (``stop`` exclusive) with labels ``0 .. count-1``. Works on runs, not pixels, so a
    640x640 map costs a few milliseconds.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    height, width = mask.shape
    padded = np.zeros((height, width + 2), np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, stops = np.nonzero(edges == -1)
    count = len(rows)
    if count == 0:
        return np.zeros((0, 4), np.int64), 0
    parent = list(range(count))
    row_first = np.searchsorted(rows, np.arange(height + 1))
    for row in range(1, height):
        a0, a1 = int(row_first[row - 1]), int(row_first[row])
        b0, b1 = a1, int(row_first[row + 1])
        if a0 == a1 or b0 == b1:
            continue
        i = a0
        for j in range(b0, b1):
            # 8-connectivity: runs touch when [s, e) ranges overlap once widened by one pixel
            while i < a1 and stops[i] < starts[j]:
                i += 1
            k = i
            while k < a1 and starts[k] <= stops[j]:
                ri, rj = _find(parent, k), _find(parent, j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
                k += 1
    roots = np.array([_find(parent, i) for i in range(count)], np.int64)
    unique, labels = np.unique(roots, return_inverse=True)
    runs = np.stack([labels.astype(np.int64), rows, starts, stops], axis=1).astype(np.int64)
    return runs, len(unique)


def _dilate2x2(mask: Array) -> Array:
    out: Array = mask.copy()
    out[1:, :] |= mask[:-1, :]
    out[:, 1:] |= mask[:, :-1]
    out[1:, 1:] |= mask[:-1, :-1]
    return out


def db_boxes(prob: Array, decoding: DbDecoding | None = None) -> Array:
    """Boxes of one probability map ``(H, W)`` as ``(K, 5)`` float rows ``x0, y0, x1, y1, score``.

    Coordinates are pixel edges (``x1``/``y1`` exclusive) in the map's own resolution.
    """
    d = decoding or DbDecoding()
    prob = np.asarray(prob, dtype=np.float32)
    prob = prob.reshape(prob.shape[-2:]) if prob.ndim > 2 else prob
    height, width = prob.shape
    mask = prob > d.threshold
    if d.dilate:
        mask = _dilate2x2(mask)
    runs, count = connected_components(mask)
    if count == 0:
        return np.zeros((0, 5), np.float32)
    labels, rows, starts, stops = runs.T
    x0 = np.full(count, width, np.int64)
    y0 = np.full(count, height, np.int64)
    x1 = np.zeros(count, np.int64)
    y1 = np.zeros(count, np.int64)
    np.minimum.at(x0, labels, starts)
    np.maximum.at(x1, labels, stops)
    np.minimum.at(y0, labels, rows)
    np.maximum.at(y1, labels, rows + 1)
    order = np.argsort(-(x1 - x0) * (y1 - y0), kind="stable")[: d.max_candidates]
    x0, y0, x1, y1 = x0[order], y0[order], x1[order], y1[order]
    keep = np.minimum(x1 - x0, y1 - y0) >= d.min_size
    x0, y0, x1, y1 = x0[keep], y0[keep], x1[keep], y1[keep]
    # mean probability inside each box ("fast" score mode), from a summed-area table
    table = np.zeros((height + 1, width + 1), np.float64)
    table[1:, 1:] = prob.astype(np.float64).cumsum(0).cumsum(1)
    total = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    score = total / np.maximum((x1 - x0) * (y1 - y0), 1)
    keep = score >= d.box_threshold
    w = (x1 - x0)[keep].astype(np.float64)
    h = (y1 - y0)[keep].astype(np.float64)
    grow = w * h * d.unclip_ratio / np.maximum(2.0 * (w + h), _EPS)
    bx0 = np.clip(x0[keep] - grow, 0, width)
    by0 = np.clip(y0[keep] - grow, 0, height)
    bx1 = np.clip(x1[keep] + grow, 0, width)
    by1 = np.clip(y1[keep] + grow, 0, height)
    boxes = np.stack([bx0, by0, bx1, by1, score[keep]], axis=1).astype(np.float32)
    big = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= d.min_size + 2
    out: Array = boxes[big]
    return out


def box_iou(a: Array, b: Array) -> Array:
    """IoU matrix ``(len(a), len(b))`` of ``x0, y0, x1, y1`` boxes."""
    a = np.asarray(a, np.float64)[:, :4]
    b = np.asarray(b, np.float64)[:, :4]
    ix = np.clip(
        np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None
    )
    iy = np.clip(
        np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None
    )
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    out: Array = inter / np.maximum(union, _EPS)
    return out


def match_boxes(reference: Array, boxes: Array, *, iou: float = 0.5) -> int:
    """Boxes matched one-to-one to reference boxes at IoU >= ``iou`` (greedy, best IoU first)."""
    if len(reference) == 0 or len(boxes) == 0:
        return 0
    ious = box_iou(reference, boxes)
    pairs = np.argwhere(ious >= iou)
    if len(pairs) == 0:
        return 0
    pairs = pairs[np.argsort(-ious[pairs[:, 0], pairs[:, 1]], kind="stable")]
    used_ref: set[int] = set()
    used_box: set[int] = set()
    for i, j in pairs.tolist():
        if i not in used_ref and j not in used_box:
            used_ref.add(i)
            used_box.add(j)
    return len(used_ref)


def _squeeze_middle(output: Array) -> Array:
    """Drop size-1 axes between the sample axis and the last two (a batch of one per sample)."""
    if output.ndim <= 3:
        return output
    middle = [d for d in output.shape[1:-2] if d != 1]
    out: Array = output.reshape(output.shape[0], *middle, *output.shape[-2:])
    return out


def _maps(output: Array) -> Array:
    """Per-sample 2-D maps ``(N, H, W)`` from ``(N, H, W)`` or ``(N, 1, H, W)``."""
    maps = _squeeze_middle(output)
    if maps.ndim != 3:
        raise ValueError(f"expected probability maps (N, 1, H, W) or (N, H, W), got {output.shape}")
    return maps


def box_f1(
    reference: Array, output: Array, decoding: DbDecoding | None = None
) -> tuple[float, list[float]]:
    """F1 of the output's DB boxes against the reference's, over the set and per sample (0..1).

    A sample where neither side finds a box scores 1.
    """
    d = decoding or DbDecoding()
    matched = found = expected = 0
    per_sample = []
    for ref_map, out_map in zip(_maps(reference), _maps(output), strict=True):
        ref_boxes, out_boxes = db_boxes(ref_map, d), db_boxes(out_map, d)
        m = match_boxes(ref_boxes, out_boxes, iou=d.iou)
        n = len(ref_boxes) + len(out_boxes)
        per_sample.append(1.0 if n == 0 else 2.0 * m / n)
        matched, found, expected = matched + m, found + len(out_boxes), expected + len(ref_boxes)
    total = found + expected
    return (1.0 if total == 0 else 2.0 * matched / total), per_sample


def _labels_map(output: Array, threshold: float) -> Array:
    """Per-pixel labels: arg-max over channels ``(N, C>1, H, W)``, else ``map > threshold``."""
    output = _squeeze_middle(output)
    if output.ndim == 4 and output.shape[1] > 1:
        return np.asarray(output.argmax(axis=1))
    return np.asarray(_maps(output) > threshold).astype(np.int64)


def mask_iou(
    reference: Array, output: Array, *, threshold: float = 0.5
) -> tuple[float, list[float]]:
    """Mean IoU (0..1) of the foreground classes' pixel sets, over the set and per sample.

    One-channel maps are thresholded (foreground = ``> threshold``); multi-channel maps take
    the arg-max per pixel and average the IoU over every class but 0 that either side uses.
    A class absent from both sides scores 1.
    """
    ref, out = _labels_map(reference, threshold), _labels_map(output, threshold)
    classes = sorted((set(np.unique(ref).tolist()) | set(np.unique(out).tolist())) - {0}) or [1]

    def iou(a: Array, b: Array) -> float:
        scores = []
        for c in classes:
            union = int(np.logical_or(a == c, b == c).sum())
            inter = int(np.logical_and(a == c, b == c).sum())
            scores.append(1.0 if union == 0 else inter / union)
        return float(np.mean(scores))

    return iou(ref, out), [iou(r, o) for r, o in zip(ref, out, strict=True)]


def _vectors(output: Array) -> Array:
    """One float64 vector per sample: ``(N, D)``; ``(N, T, D)`` is mean-pooled over ``T``."""
    out = np.asarray(output, np.float64)
    if out.ndim == 3:
        out = out.mean(axis=1)
    return out.reshape(out.shape[0], -1)


def cosine_similarity(reference: Array, output: Array) -> tuple[float, list[float]]:
    """Mean cosine similarity (-1..1) of each sample's vector with the reference's, and each."""
    ref, out = _vectors(reference), _vectors(output)
    dots = (ref * out).sum(axis=1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    per_sample = (dots / np.maximum(norms, _EPS)).tolist()
    return float(np.mean(per_sample)), [float(x) for x in per_sample]


def retrieval_agreement(
    reference: Array, output: Array, *, k: int = 10
) -> tuple[float, list[float]]:
    """Each sample as a query over the rest of the set by cosine similarity: the share (0..1)
    of the reference's top-``k`` neighbours that the output's top-``k`` also holds.

    ``k`` is capped at ``N - 1``; a set of one sample scores 1.
    """
    ref, out = _vectors(reference), _vectors(output)
    n = len(ref)
    k = min(k, n - 1)
    if k <= 0:
        return 1.0, [1.0] * n

    def neighbours(x: Array) -> Array:
        unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)
        sim = unit @ unit.T
        np.fill_diagonal(sim, -np.inf)
        return np.asarray(np.argsort(-sim, axis=1, kind="stable")[:, :k])

    a, b = neighbours(ref), neighbours(out)
    per_sample = [len(set(a[i].tolist()) & set(b[i].tolist())) / k for i in range(n)]
    return float(np.mean(per_sample)), per_sample


# -- the gate's score --------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskScore:
    """A variant's outputs scored against the reference's for one task.

    ``metric`` decided (the worst ``delta`` among the task's deciding metrics); ``metrics``
    holds every metric measured, in percent (``rel_l2`` too); ``per_sample`` is the deciding
    metric per sample in percent (for accuracy-aware quantizers ranking what to keep in float).
    """

    task: Task
    metric: Metric
    reference: float
    value: float
    delta: float
    samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    per_sample: list[float] = field(default_factory=list)


def _percent(values: list[float]) -> list[float]:
    return [100.0 * v for v in values]


def score_task(
    task: Task,
    reference: Sequence[Array],
    output: Sequence[Array],
    *,
    labels: Array | None = None,
    decoding: DbDecoding | None = None,
    threshold: float = 0.5,
    top_k: int = 10,
) -> TaskScore:
    """Score ``output`` (every model output, samples on axis 0) against ``reference``.

    The task's metric reads the first output; ``rel_l2`` is the worst output's. ``labels``
    (integer class ids) turn ``agreement`` into ``top1`` for a classifier. ``decoding``
    configures detection (its ``threshold`` is also the map threshold for ``mask_iou``);
    ``threshold`` is segmentation's map threshold; ``top_k`` is the retrieval depth.
    """
    if len(reference) != len(output) or not reference:
        raise ValueError("reference and output must hold the same, non-zero number of outputs")
    ref, out = reference[0], output[0]
    samples = int(ref.shape[0])
    error = 100.0 * max(rel_l2(o, r) for o, r in zip(output, reference, strict=True))
    metrics: dict[str, float] = {"rel_l2": error}
    # (metric, reference value, value, per-sample values) of each deciding metric
    deciding: list[tuple[Metric, float, float, list[float]]] = []
    if task == "classification":
        if labels is not None:
            hit_ref = _top1(ref) == labels
            hit_out = _top1(out) == labels
            ref_top1 = float(hit_ref.mean() * 100.0)
            value = float(hit_out.mean() * 100.0)
            metrics["top1"] = value
            deciding.append(("top1", ref_top1, value, _percent(hit_out.astype(float).tolist())))
        else:
            same = _top1(out) == _top1(ref)
            value = float(same.mean() * 100.0)
            metrics["agreement"] = value
            deciding.append(("agreement", 100.0, value, _percent(same.astype(float).tolist())))
    elif task == "detection":
        d = decoding or DbDecoding()
        f1, f1_each = box_f1(ref, out, d)
        iou, _ = mask_iou(ref, out, threshold=d.threshold)
        metrics |= {"box_f1": 100.0 * f1, "mask_iou": 100.0 * iou}
        deciding.append(("box_f1", 100.0, 100.0 * f1, _percent(f1_each)))
    elif task == "segmentation":
        iou, iou_each = mask_iou(ref, out, threshold=threshold)
        metrics["mask_iou"] = 100.0 * iou
        deciding.append(("mask_iou", 100.0, 100.0 * iou, _percent(iou_each)))
    elif task == "embedding":
        cos, cos_each = cosine_similarity(ref, out)
        agree, agree_each = retrieval_agreement(ref, out, k=top_k)
        metrics |= {"cosine": 100.0 * cos, "retrieval": 100.0 * agree}
        deciding.append(("cosine", 100.0, 100.0 * cos, _percent(cos_each)))
        deciding.append(("retrieval", 100.0, 100.0 * agree, _percent(agree_each)))
    else:
        each = [100.0 * rel_l2(out[i], ref[i]) for i in range(samples)]
        return TaskScore(
            task=task,
            metric="rel_l2",
            reference=0.0,
            value=error,
            delta=error,
            samples=samples,
            metrics=metrics,
            per_sample=[-e for e in each],  # higher is better, as for every other metric
        )
    metric, ref_value, value, each = max(deciding, key=lambda m: m[1] - m[2])
    return TaskScore(
        task=task,
        metric=metric,
        reference=ref_value,
        value=value,
        delta=ref_value - value,
        samples=samples,
        metrics=metrics,
        per_sample=each,
    )
