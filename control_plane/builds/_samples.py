"""Sample sets (calibration, validation, golden) read from ``.npz`` and fitted to a model's inputs.

Owns the ``.npz`` conventions: one array per model input, N samples stacked on axis 0, plus
``labels`` (integer class ids) in a validation set. An array of the input's rank holds samples
along the batch axis (sample ``i`` is ``array[i:i+1]``); an array of rank + 1 holds whole feeds
(sample ``i`` is ``array[i]``). Every sample is checked against the input's dtype and shape.
Before anything is decompressed, each member's ``.npy`` header is read and the arrays' shapes,
dtypes and total bytes are checked against a bound, so a small file cannot unpack into a large
allocation. Running models over the samples is ``_measure``'s work.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.contracts.tensors import TensorSpec
from control_plane.builds.errors import BuildInputError, first_line

__all__ = ["LABELS_KEY", "MAX_SAMPLE_BYTES", "Feeds", "SampleSet", "batchable", "load_samples"]

LABELS_KEY = "labels"
MAX_SAMPLE_BYTES = 1024**3  # bytes: what one sample set may unpack to, all arrays together
_MAX_MEMBERS = 64  # arrays in one .npz (a model's inputs plus labels)

Feeds = dict[str, np.ndarray[Any, Any]]


@dataclass(frozen=True)
class SampleSet:
    """N samples; ``feeds[name][i]`` is sample ``i`` of input ``name`` shaped as one feed."""

    feeds: dict[str, np.ndarray[Any, Any]]
    labels: np.ndarray[Any, Any] | None = None

    def __len__(self) -> int:
        return len(next(iter(self.feeds.values())))

    def feed(self, index: int) -> Feeds:
        return {name: array[index] for name, array in self.feeds.items()}

    def chunks(self, size: int) -> Iterator[Feeds]:
        """Feeds of up to ``size`` samples joined on the batch axis (``size=1``: one each)."""
        if size == 1:
            yield from (self.feed(i) for i in range(len(self)))
            return
        for start in range(0, len(self), size):
            yield {
                name: array[start : start + size].reshape(-1, *array.shape[2:])
                for name, array in self.feeds.items()
            }

    def head(self, count: int) -> SampleSet:
        labels = None if self.labels is None else self.labels[:count]
        return SampleSet({n: a[:count] for n, a in self.feeds.items()}, labels)


def batchable(inputs: tuple[TensorSpec, ...]) -> bool:
    """Whether samples may be joined on axis 0: every input has a dynamic batch axis."""
    return all(len(spec.shape) > 0 and spec.shape[0] < 0 for spec in inputs)


def _unpacked_bytes(path: Path, *, field: str, max_bytes: int) -> int:
    """The bytes the arrays of an ``.npz`` take once loaded, read from their ``.npy`` headers
    (nothing is decompressed beyond them); ``BuildInputError`` past ``max_bytes``."""
    total = 0
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
        if len(members) > _MAX_MEMBERS:
            raise BuildInputError(
                f"{len(members)} arrays in the file; at most {_MAX_MEMBERS}", field=field
            )
        for member in members:
            with archive.open(member) as fp:
                version = np.lib.format.read_magic(fp)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
                else:
                    raise BuildInputError(
                        f"{member.filename!r}: unsupported .npy format {version}", field=field
                    )
            if dtype.hasobject:
                raise BuildInputError(
                    f"{member.filename!r}: object arrays are refused", field=field
                )
            count = 1
            for dim in shape:
                count *= int(dim)  # Python ints: no overflow
            total += count * dtype.itemsize
            if total > max_bytes:
                raise BuildInputError(
                    f"the arrays unpack to more than the limit of {max_bytes} bytes", field=field
                )
    return total


def load_samples(
    path: Path,
    inputs: tuple[TensorSpec, ...],
    *,
    field: str,
    labelled: bool = False,
    max_bytes: int = MAX_SAMPLE_BYTES,
) -> SampleSet:
    """Read ``path`` and fit it to ``inputs``; ``BuildInputError`` naming the input at fault.
    The arrays' headers are checked against ``max_bytes`` before any array is read."""
    try:
        _unpacked_bytes(path, field=field, max_bytes=max_bytes)
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise BuildInputError(f"not an .npz file: {first_line(exc)}", field=field) from exc
    labels = arrays.pop(LABELS_KEY, None) if labelled else None
    names = [spec.name for spec in inputs]
    unknown = sorted(set(arrays) - set(names))
    if unknown:
        raise BuildInputError(
            f"arrays {unknown} are not model inputs (inputs: {names})", field=field
        )
    missing = [n for n in names if n not in arrays]
    if missing:
        raise BuildInputError(f"no array for model input(s) {missing}", field=field)
    feeds = {spec.name: _as_feeds(spec, arrays[spec.name], field) for spec in inputs}
    counts = {name: len(array) for name, array in feeds.items()}
    if len(set(counts.values())) != 1:
        raise BuildInputError(f"inputs hold different sample counts: {counts}", field=field)
    count = next(iter(counts.values()))
    if count == 0:
        raise BuildInputError("the set holds no samples", field=field)
    if labels is not None:
        if labels.ndim != 1 or len(labels) != count or labels.dtype.kind not in "iu":
            raise BuildInputError(
                f"{LABELS_KEY!r} must be {count} integer class ids, got {labels.dtype}"
                f" array of shape {labels.shape}",
                field=field,
            )
        labels = labels.astype(np.int64)
    return SampleSet(feeds, labels)


def _as_feeds(spec: TensorSpec, array: np.ndarray[Any, Any], field: str) -> np.ndarray[Any, Any]:
    """Samples of one input as ``(N, *feed_shape)``, checked against the spec."""
    want = "x".join("?" if d < 0 else str(d) for d in spec.shape)
    if array.dtype != spec.dtype:
        raise BuildInputError(
            f"input {spec.name!r}: dtype {array.dtype} where {spec.datatype} ({spec.dtype})"
            " is expected",
            field=field,
        )
    if array.ndim == len(spec.shape) and array.ndim > 0:
        feeds = array[:, None]  # samples along the batch axis: each becomes a batch of one
    elif array.ndim == len(spec.shape) + 1:
        feeds = array
    else:
        raise BuildInputError(
            f"input {spec.name!r}: array of shape {'x'.join(map(str, array.shape))} does not"
            f" hold samples of shape {want}",
            field=field,
        )
    feed_shape = tuple(feeds.shape[1:])
    if not spec.accepts_shape(feed_shape):
        got = "x".join(map(str, feed_shape))
        raise BuildInputError(
            f"input {spec.name!r}: samples of shape {got} where {want} is expected", field=field
        )
    return feeds
