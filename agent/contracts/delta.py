"""The model delta format, shared by the control plane (which builds deltas) and the device
(which rebuilds the full archive from one).

A delta is ``EFD1``, a method byte and one zstd frame, by one of two methods, the smaller of the
two chosen when it is built (measured in ``bench/bench_delta.py``):

- ``patch-from``: zstd with the base archive as a raw-content dictionary (``zstd
  --patch-from``). A re-export with some layers changed shares most of its bytes with the
  previous version, so what travels is mostly the changed tensors.
- ``xor-planes`` (archives of the same length: the same architecture): the base XOR the
  target, each 4-byte word's bytes grouped into planes, zstd. A fine-tune moves every weight a
  little: the sign, exponent and high mantissa bytes mostly stay, so their XOR planes are
  zeros; byte-matching (``patch-from``, bsdiff) finds almost nothing to reuse there.

``make_delta`` builds one; ``apply_delta`` rebuilds the full archive, streaming into
``<dest>.part`` with the output bounded by and hashed against the full archive's *signed*
length and sha256, then fsync and rename: a power cut during the rebuild leaves at most a
``.part`` file that the next attempt deletes, never a half archive under the final name.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import zstandard

from agent._fs import fsync_dir

__all__ = [
    "MAX_BASE_BYTES",
    "DeltaUnusableError",
    "Method",
    "apply_delta",
    "delta_method",
    "delta_summary",
    "make_delta",
]

MAX_BASE_BYTES = 1 << 31  # zstd's long window reaches 2 GiB: larger archives travel whole
_CHUNK = 1 << 20  # bytes per write while rebuilding
DEFAULT_LEVEL = 19


class DeltaUnusableError(Exception):
    """The delta cannot give the signed archive here; download the full archive instead."""


def _window_log(base_size: int, target_size: int) -> int:
    need = max(base_size + target_size, 1 << 20)
    return max(20, min(31, (need - 1).bit_length()))


MAGIC = b"EFD1"  # then one method byte, then one zstd frame
PATCH_FROM = b"P"  # zstd with the base as a raw-content dictionary (``zstd --patch-from``)
XOR_PLANES = b"X"  # same-length archives: base XOR target, float bytes split into planes, zstd
Method = Literal["patch-from", "xor-planes"]
_METHODS: dict[bytes, Method] = {PATCH_FROM: "patch-from", XOR_PLANES: "xor-planes"}
_BLOCK = 1 << 20  # bytes of the archive per XOR block (a multiple of 4)


def make_delta(
    base: Path,
    target: Path,
    dest: Path,
    *,
    level: int = DEFAULT_LEVEL,
    methods: Sequence[Method] = ("patch-from", "xor-planes"),
) -> int:
    """Write the delta that turns ``base`` into ``target`` to ``dest``: the smallest of
    ``methods`` (``xor-planes`` only applies when both have the same length); returns its
    size."""
    base_size, target_size = base.stat().st_size, target.stat().st_size
    if base_size > MAX_BASE_BYTES or target_size > MAX_BASE_BYTES:
        raise ValueError(f"archives over {MAX_BASE_BYTES} bytes are not delta-encoded")
    built: list[Path] = []
    try:
        if "patch-from" in methods:
            built.append(
                _encode(dest, ".p", PATCH_FROM, lambda out: _patch_from(base, target, out, level))
            )
        if "xor-planes" in methods and base_size == target_size:
            built.append(
                _encode(dest, ".x", XOR_PLANES, lambda out: _xor_planes(base, target, out, level))
            )
        if not built:
            raise ValueError(f"none of {list(methods)} applies to these archives")
        best = min(built, key=lambda p: p.stat().st_size)
        best.replace(dest)
    finally:
        for path in built:
            path.unlink(missing_ok=True)
    return dest.stat().st_size


def delta_method(delta: Path | IO[bytes]) -> Method:
    """Which encoding ``delta`` uses (a stream is left after the header);
    ``DeltaUnusableError`` for a file that is no delta."""
    if isinstance(delta, Path):
        with delta.open("rb") as f:
            return delta_method(f)
    head = delta.read(len(MAGIC) + 1)
    method = _METHODS.get(head[len(MAGIC) :]) if head[: len(MAGIC)] == MAGIC else None
    if method is None:
        raise DeltaUnusableError("not a model delta (unknown header)")
    return method


def _encode(dest: Path, suffix: str, tag: bytes, body: Callable[[IO[bytes]], None]) -> Path:
    tmp = dest.with_name(dest.name + suffix + ".tmp")
    with tmp.open("wb") as out:
        out.write(MAGIC + tag)
        body(out)
        out.flush()
        os.fsync(out.fileno())
    return tmp


def _patch_from(base: Path, target: Path, out: IO[bytes], level: int) -> None:
    base_size, target_size = base.stat().st_size, target.stat().st_size
    dictionary = zstandard.ZstdCompressionDict(
        base.read_bytes(), dict_type=zstandard.DICT_TYPE_RAWCONTENT
    )
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        source_size=target_size,
        window_log=_window_log(base_size, target_size),
        enable_ldm=True,
        write_content_size=True,
    )
    cctx = zstandard.ZstdCompressor(dict_data=dictionary, compression_params=params)
    with target.open("rb") as src:
        cctx.copy_stream(src, out, size=target_size)


def _xor_planes(base: Path, target: Path, out: IO[bytes], level: int) -> None:
    """A fine-tuned tensor keeps most sign, exponent and high mantissa bits: XOR with the
    base zeroes them, and grouping each 4-byte word's bytes into planes puts those zeros
    together, which zstd then folds away; the low mantissa bytes stay as they are."""
    cctx = zstandard.ZstdCompressor(level=level, write_content_size=False)
    with (
        base.open("rb") as old,
        target.open("rb") as new,
        cctx.stream_writer(out, closefd=False) as writer,
    ):
        while block := new.read(_BLOCK):
            writer.write(
                _planes(
                    np.frombuffer(old.read(len(block)), np.uint8) ^ np.frombuffer(block, np.uint8)
                )
            )


def _planes(data: np.ndarray[Any, Any]) -> bytes:
    padded = np.zeros(-(-len(data) // 4) * 4, np.uint8)
    padded[: len(data)] = data
    return bytes(padded.reshape(-1, 4).T.tobytes())


def _unplanes(data: bytes, length: int) -> np.ndarray[Any, Any]:
    words = np.frombuffer(data, np.uint8).reshape(4, -1).T
    out: np.ndarray[Any, Any] = words.reshape(-1)[:length]
    return out


def apply_delta(base: Path, delta: Path, dest: Path, *, length: int, sha256: str) -> Path:
    """Rebuild the archive of signed ``length`` and ``sha256`` from ``base`` and ``delta`` into
    ``dest`` (atomically). ``DeltaUnusableError`` when the delta does not decode against this
    base or its output is not exactly the signed archive; nothing is left under ``dest`` then."""
    if base.stat().st_size > MAX_BASE_BYTES or length > MAX_BASE_BYTES:
        raise DeltaUnusableError(f"archives over {MAX_BASE_BYTES} bytes are not delta-encoded")
    part = dest.with_name(dest.name + ".part")
    part.unlink(missing_ok=True)  # what a power cut during an earlier rebuild left
    digest = hashlib.sha256()
    try:
        with delta.open("rb") as src, part.open("wb") as out:
            method = delta_method(src)
            if method == "xor-planes" and base.stat().st_size != length:
                raise DeltaUnusableError("an xor-planes delta needs a base of the archive's length")
            blocks = (
                _unpatch(base, src, length) if method == "patch-from" else _unxor(base, src, length)
            )
            written = 0
            for block in blocks:
                written += len(block)
                if written > length:
                    raise DeltaUnusableError(
                        f"the delta rebuilds more than the signed {length} bytes"
                    )
                digest.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if written != length or digest.hexdigest() != sha256:
            raise DeltaUnusableError(
                f"the rebuilt archive ({written} bytes, sha256 {digest.hexdigest()[:16]}...) is "
                f"not the signed one ({length} bytes, {sha256[:16]}...): wrong base or bad delta"
            )
        part.replace(dest)
        fsync_dir(dest.parent)
    except zstandard.ZstdError as exc:
        raise DeltaUnusableError(f"the delta does not decode against this base: {exc}") from exc
    except OSError as exc:
        raise DeltaUnusableError(f"cannot rebuild the archive: {exc}") from exc
    finally:
        part.unlink(missing_ok=True)
    return dest


def _unpatch(base: Path, src: IO[bytes], length: int) -> Iterator[bytes]:
    dictionary = zstandard.ZstdCompressionDict(
        base.read_bytes(), dict_type=zstandard.DICT_TYPE_RAWCONTENT
    )
    dctx = zstandard.ZstdDecompressor(
        dict_data=dictionary, max_window_size=1 << _window_log(base.stat().st_size, length)
    )
    reader = dctx.stream_reader(src, read_across_frames=False)
    while block := reader.read(_CHUNK):
        yield block


def _unxor(base: Path, src: IO[bytes], length: int) -> Iterator[bytes]:
    reader = zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=False)
    with base.open("rb") as old:
        left = length
        while left > 0:
            size = min(_BLOCK, left)
            want = -(-size // 4) * 4
            data = _read_exactly(reader, want)
            if len(data) < want:
                raise DeltaUnusableError("the delta ends early (truncated)")
            yield (_unplanes(data, size) ^ np.frombuffer(old.read(size), np.uint8)).tobytes()
            left -= size
        if reader.read(1):
            raise DeltaUnusableError(f"the delta rebuilds more than the signed {length} bytes")


def _read_exactly(reader: Any, n: int) -> bytes:
    parts = []
    while n > 0:
        chunk = reader.read(n)
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def delta_summary(from_version: str, delta_bytes: int, full_bytes: int) -> str:
    """``delta from 1.2.0, 3.1 MB of 24 MB``: what the update events say."""
    return f"delta from {from_version}, {_mb(delta_bytes)} of {_mb(full_bytes)}"


def _mb(n: int) -> str:
    mb = n / 1e6
    if mb >= 10:
        return f"{mb:.0f} MB"
    if mb >= 0.1:
        return f"{mb:.1f} MB"
    return f"{n / 1e3:.1f} kB"
