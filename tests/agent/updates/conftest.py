"""A real HTTP file server on loopback with Range support and switchable faults."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest


@dataclass
class Faults:
    close_after: dict[str, int] = field(default_factory=dict)  # path -> bytes, once per entry
    endless: set[str] = field(default_factory=set)
    fail_status: dict[str, list[int]] = field(default_factory=dict)  # path -> statuses to send
    ignore_range: set[str] = field(default_factory=set)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range)
    bytes_sent: int = 0


class FileServer:
    def __init__(self, root: Path, port: int = 0) -> None:
        self.root = root
        self.faults = Faults()
        handler = self._handler()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> FileServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                pass

            def do_GET(self) -> None:
                f = server.faults
                path = self.path.lstrip("/")
                rng = self.headers.get("Range")
                f.requests.append((path, rng))
                if f.fail_status.get(path):
                    self.send_response(f.fail_status[path].pop(0))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if path in f.endless:
                    self.send_response(200)
                    self.end_headers()
                    try:
                        while True:
                            self.wfile.write(b"\0" * 65536)
                            f.bytes_sent += 65536
                    except OSError:
                        return
                file = server.root / path
                if not file.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                total = file.stat().st_size
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if m and path not in f.ignore_range:
                    start = int(m.group(1))
                    if start >= total:
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(total - start))
                self.end_headers()
                cut = f.close_after.pop(path, None)
                budget = total - start if cut is None else min(cut, total - start)
                try:
                    with file.open("rb") as src:
                        src.seek(start)
                        while budget > 0:
                            block = src.read(min(1 << 20, budget))
                            if not block:
                                break
                            self.wfile.write(block)
                            f.bytes_sent += len(block)
                            budget -= len(block)
                except OSError:
                    return
                if cut is not None:
                    self.close_connection = True

        return Handler


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[FileServer]:
    root = tmp_path / "served"
    root.mkdir()
    server = FileServer(root).start()
    yield server
    server.stop()
