"""A bounded ``multipart/form-data`` reader that streams each file part straight to disk.

Owns reading an upload body after the route has checked the caller: the route calls
``read_multipart`` only once its credential dependency has passed, so no byte of a large body
is read for an unknown caller. Each file part goes to its own file in a scratch directory as it
arrives (memory holds one network chunk), and every count is bounded: which fields exist, how
long a text field is, how large a file is, how many parts there are. The whole body's bound is
``control_plane.api.limits``'.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from control_plane.errors import InvalidInputError, PayloadTooLargeError

__all__ = ["FormLimits", "UploadForm", "read_multipart"]


@dataclass(frozen=True)
class FormLimits:
    """What one upload form may hold."""

    files: Mapping[str, str]  # file field -> file name in the scratch directory
    fields: frozenset[str]  # text fields
    max_file_bytes: int
    max_field_bytes: int = 1024  # bytes, per text field


@dataclass
class UploadForm:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # only the non-empty ones


@dataclass
class _Part:
    name: str = ""
    is_file: bool = False
    text: bytearray = field(default_factory=bytearray)
    out: IO[bytes] | None = None
    size: int = 0


class _Reader:
    """python-multipart callbacks; file data is queued and written off the event loop."""

    def __init__(self, scratch: Path, limits: FormLimits) -> None:
        self._scratch = scratch
        self._limits = limits
        self._part = _Part()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._seen: set[str] = set()
        self.form = UploadForm()
        self.pending: list[tuple[IO[bytes], bytes]] = []
        self.opened: list[IO[bytes]] = []

    def on_part_begin(self) -> None:
        self._part = _Part()
        self._disposition = b""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        raw_name = options.get(b"name")
        if raw_name is None:
            raise InvalidInputError("a form part has no name in its Content-Disposition")
        name = raw_name.decode("utf-8", "replace")
        if name in self._seen:
            raise InvalidInputError("given twice", field=name[:64])
        self._seen.add(name)
        self._part.name = name
        if name in self._limits.files:
            self._part.is_file = True
            out = (self._scratch / self._limits.files[name]).open("xb")
            self.opened.append(out)
            self._part.out = out
        elif name not in self._limits.fields:
            raise InvalidInputError(f"unknown form field {name[:64]!r}")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part, size = self._part, end - start
        part.size += size
        if part.is_file:
            if part.size > self._limits.max_file_bytes:
                raise PayloadTooLargeError(
                    f"{part.name}: larger than the limit of {self._limits.max_file_bytes} bytes",
                    limit=self._limits.max_file_bytes,
                )
            assert part.out is not None
            self.pending.append((part.out, data[start:end]))
        else:
            if part.size > self._limits.max_field_bytes:
                raise InvalidInputError(
                    f"longer than {self._limits.max_field_bytes} bytes", field=part.name
                )
            part.text += data[start:end]

    def on_part_end(self) -> None:
        part = self._part
        if part.is_file:
            if part.size:
                self.form.files[part.name] = self._scratch / self._limits.files[part.name]
        else:
            self.form.fields[part.name] = part.text.decode("utf-8", "replace")


def _write(pending: list[tuple[IO[bytes], bytes]]) -> None:
    for out, data in pending:
        out.write(data)


async def read_multipart(
    content_type: str, stream: AsyncIterator[bytes], scratch: Path, limits: FormLimits
) -> UploadForm:
    """Read the form from ``stream`` into ``scratch``; ``InvalidInputError`` (422) for a form
    that breaks ``limits`` or the format, ``PayloadTooLargeError`` (413) for a file too large."""
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidInputError("the body must be multipart/form-data with a boundary")
    reader = _Reader(scratch, limits)
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": reader.on_part_begin,
            "on_part_data": reader.on_part_data,
            "on_part_end": reader.on_part_end,
            "on_header_field": reader.on_header_field,
            "on_header_value": reader.on_header_value,
            "on_header_end": reader.on_header_end,
            "on_headers_finished": reader.on_headers_finished,
        },
    )
    try:
        async for chunk in stream:
            try:
                parser.write(chunk)
            except (InvalidInputError, PayloadTooLargeError):
                raise
            except Exception as exc:  # python-multipart's own parse errors
                raise InvalidInputError(f"the form does not parse: {exc}") from exc
            if reader.pending:
                pending, reader.pending = reader.pending, []
                await run_in_threadpool(_write, pending)
        parser.finalize()
    finally:
        for out in reader.opened:
            out.close()
    return reader.form
