"""Download figures of the update client, measured side by side in one run.

- Throughput: the agent's Downloader / a plain ``curl`` of the same artifact from the same
  server on loopback (rounds interleaved; goal >= 0.9).
- Peak RSS growth of a process downloading a 1 GiB artifact (goal <= 16 MiB).
- Bytes transferred for an interrupted-then-resumed download / artifact size (goal <= 1.01).

The throughput rounds use a threaded static server (HTTP Range, streaming from disk) in a
process of its own, so neither client shares an interpreter (and its GIL) with the server; the
resume and RSS figures use the same server in this process, with its fault injection.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.agent.updates.conftest import FileServer  # noqa: E402

SIZE_THROUGHPUT = 256 * 1024 * 1024
SIZE_RSS = 1024 * 1024 * 1024
ROUNDS = 5


def _make_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
            h.update(block)
    return h.hexdigest()


def _agent_download(url: str, dest: Path, size: int, sha: str) -> float:
    import httpx

    from agent.updates.download import DownloadConfig, Downloader

    dest.unlink(missing_ok=True)
    with httpx.Client() as client:
        d = Downloader(client, DownloadConfig(free_space_margin_bytes=0))
        t = time.perf_counter()
        d.fetch(url, dest, length=size, sha256=sha)
        return time.perf_counter() - t


def _curl_download(url: str, dest: Path) -> float:
    dest.unlink(missing_ok=True)
    t = time.perf_counter()
    subprocess.run(["curl", "-sf", "-o", str(dest), url], check=True)
    return time.perf_counter() - t


RSS_CHILD = textwrap.dedent("""
    import resource, sys, httpx
    from pathlib import Path
    from agent.updates.download import DownloadConfig, Downloader
    url, dest, size, sha = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    with httpx.Client() as client:
        d = Downloader(client, DownloadConfig(free_space_margin_bytes=0))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        d.fetch(url, dest, length=size, sha256=sha)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(before, after, flush=True)
""")


SERVER_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from tests.agent.updates.conftest import FileServer
    server = FileServer(Path(sys.argv[1])).start()
    print(server.url, flush=True)
    sys.stdin.read()  # serve until the parent closes our stdin
    server.stop()
""")


@contextlib.contextmanager
def _server_process(served: Path) -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_CHILD, str(served)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    assert proc.stdin is not None
    try:
        yield proc.stdout.readline().strip()
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def main() -> None:
    if shutil.which("curl") is None:
        sys.exit("curl is required for the throughput comparison")
    cache = ROOT / ".cache"
    cache.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        root = Path(tmp)
        served = root / "served"
        served.mkdir()
        sha = _make_file(served / "a.bin", SIZE_THROUGHPUT)
        with _server_process(served) as base:
            agent_s, curl_s = [], []
            for _ in range(ROUNDS):  # interleaved rounds, same server, same file
                agent_s.append(
                    _agent_download(f"{base}/a.bin", root / "agent.bin", SIZE_THROUGHPUT, sha)
                )
                curl_s.append(_curl_download(f"{base}/a.bin", root / "curl.bin"))
        mib = SIZE_THROUGHPUT / 2**20
        a, c = mib / statistics.median(agent_s), mib / statistics.median(curl_s)
        server = FileServer(served).start()
        url = f"{server.url}/a.bin"
        try:
            # Interrupted at 40 %, then resumed by a new downloader.
            import httpx

            from agent.errors import DownloadError
            from agent.updates.download import DownloadConfig, Downloader

            dest = root / "resumed.bin"
            server.faults.close_after["a.bin"] = int(SIZE_THROUGHPUT * 0.4)
            server.faults.bytes_sent = 0
            with httpx.Client() as client:
                with contextlib.suppress(DownloadError):
                    Downloader(
                        client, DownloadConfig(free_space_margin_bytes=0, max_attempts=1)
                    ).fetch(url, dest, length=SIZE_THROUGHPUT, sha256=sha)
                Downloader(client, DownloadConfig(free_space_margin_bytes=0)).fetch(
                    url, dest, length=SIZE_THROUGHPUT, sha256=sha
                )
            resumed_ratio = server.faults.bytes_sent / SIZE_THROUGHPUT

            for f in served.iterdir():
                f.unlink()
            for f in root.glob("*.bin"):
                f.unlink()
            sha_big = _make_file(served / "big.bin", SIZE_RSS)
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    RSS_CHILD,
                    f"{server.url}/big.bin",
                    str(root / "big.bin"),
                    str(SIZE_RSS),
                    sha_big,
                ],
                check=True,
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            before_kb, after_kb = map(int, out.stdout.strip().splitlines()[-1].split())
        finally:
            server.stop()

    rss_mib = (after_kb - before_kb) / 1024
    rows = [
        (f"agent download MiB/s (median of {ROUNDS})", f"{a:.0f}", ""),
        (f"curl download MiB/s (median of {ROUNDS})", f"{c:.0f}", ""),
        ("throughput agent / curl", f"{a / c:.3f}", ">= 0.9"),
        ("peak RSS growth, 1 GiB download (MiB)", f"{rss_mib:.1f}", "<= 16"),
        ("bytes sent for interrupted+resumed / size", f"{resumed_ratio:.4f}", "<= 1.01"),
    ]
    print(f"{'figure':<46}{'value':>10}{'goal':>10}")
    for name, value, goal in rows:
        print(f"{name:<46}{value:>10}{goal:>10}")


if __name__ == "__main__":
    main()
