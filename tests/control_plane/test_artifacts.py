"""The content-addressed store and the Range header parser."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from control_plane.artifacts import ByteRange, LocalArtifactStore, parse_range
from control_plane.errors import NotFoundError, RangeNotSatisfiableError


def test_store_is_content_addressed(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    data = bytes(range(256)) * 5000  # > one chunk
    src = tmp_path / "blob"
    src.write_bytes(data)
    ref = store.put_file(src)
    assert ref.sha256 == hashlib.sha256(data).hexdigest()
    assert ref.size == len(data)
    assert store.put_file(src) == ref
    assert store.count() == 1
    assert (tmp_path / "store" / "sha256" / ref.sha256[:2] / ref.sha256[2:4] / ref.sha256).exists()
    assert b"".join(store.read_range(ref.sha256, 0, ref.size)) == data
    assert b"".join(store.read_range(ref.sha256, 1_000_000, 10)) == data[1_000_000:1_000_010]
    out = store.copy_to(ref.sha256, tmp_path / "copy")
    assert out.read_bytes() == data
    assert not list((tmp_path / "store" / "tmp").iterdir())
    store.delete(ref.sha256)  # a collected model delta
    assert not store.exists(ref.sha256)
    store.delete(ref.sha256)  # gone already: not an error


def test_store_refuses_unknown_and_malformed_digests(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    with pytest.raises(NotFoundError):
        store.size("a" * 64)
    with pytest.raises(NotFoundError):
        store.read_range("../../etc/passwd", 0, 1)
    assert not store.exists("../x")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-9", ByteRange(0, 9)),
        ("bytes=10-", ByteRange(10, 99)),
        ("bytes=90-1000", ByteRange(90, 99)),
        ("bytes=-5", ByteRange(95, 99)),
        ("bytes=-500", ByteRange(0, 99)),
        ("bytes=5-2", None),  # invalid: ignored, whole body
        ("bytes=0-1,5-6", None),  # several ranges: whole body
        ("items=0-1", None),
        ("bytes=-", None),
    ],
)
def test_parse_range(header: str | None, expected: ByteRange | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=150-200", "bytes=-0"])
def test_unsatisfiable_ranges(header: str) -> None:
    with pytest.raises(RangeNotSatisfiableError) as info:
        parse_range(header, 100)
    assert info.value.size == 100
