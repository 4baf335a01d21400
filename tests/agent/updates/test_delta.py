"""The delta format on real archives: round trip, every way a delta can fail, and a power cut
(SIGKILL of a real process) in the middle of a rebuild."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agent.updates.delta import (
    BaseArchives,
    DeltaUnusableError,
    Method,
    apply_delta,
    delta_method,
    delta_summary,
    make_delta,
)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """Two 'archives': float32 weights, the second with one tensor out of eight retrained."""
    rng = np.random.default_rng(0)
    weights = rng.normal(0, 0.1, size=(8, 64 * 1024)).astype(np.float32)
    old = tmp_path / "old.tar"
    old.write_bytes(weights.tobytes())
    weights[5] = rng.normal(0, 0.1, size=64 * 1024).astype(np.float32)
    new = tmp_path / "new.tar"
    new.write_bytes(weights.tobytes())
    return old, new


def test_delta_rebuilds_the_new_archive_and_is_small(pair: tuple[Path, Path], tmp_path: Path):
    old, new = pair
    delta = tmp_path / "d.zst"
    size = make_delta(old, new, delta)
    assert size < new.stat().st_size * 0.2  # one changed tensor of eight travels
    out = apply_delta(old, delta, tmp_path / "out.tar", length=new.stat().st_size, sha256=_sha(new))
    assert out.read_bytes() == new.read_bytes()
    assert not (tmp_path / "out.tar.part").exists()


def test_wrong_base_is_refused_and_leaves_nothing(pair: tuple[Path, Path], tmp_path: Path):
    old, new = pair
    delta = tmp_path / "d.zst"
    make_delta(old, new, delta)
    other = tmp_path / "other.tar"
    other.write_bytes(os.urandom(old.stat().st_size))
    with pytest.raises(DeltaUnusableError, match=r"wrong base|does not decode"):
        apply_delta(other, delta, tmp_path / "out.tar", length=new.stat().st_size, sha256=_sha(new))
    assert not (tmp_path / "out.tar").exists()
    assert not (tmp_path / "out.tar.part").exists()


def test_truncated_and_tampered_deltas_are_refused(pair: tuple[Path, Path], tmp_path: Path):
    old, new = pair
    delta = tmp_path / "d.zst"
    make_delta(old, new, delta)
    data = delta.read_bytes()
    kw = {"length": new.stat().st_size, "sha256": _sha(new)}
    (tmp_path / "short.zst").write_bytes(data[: len(data) // 2])
    with pytest.raises(DeltaUnusableError):
        apply_delta(old, tmp_path / "short.zst", tmp_path / "out.tar", **kw)  # type: ignore[arg-type]
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    (tmp_path / "bad.zst").write_bytes(bytes(flipped))
    with pytest.raises(DeltaUnusableError):
        apply_delta(old, tmp_path / "bad.zst", tmp_path / "out.tar", **kw)  # type: ignore[arg-type]
    assert not (tmp_path / "out.tar").exists()


@pytest.mark.parametrize("method", ["patch-from", "xor-planes"])
def test_output_beyond_the_signed_length_is_cut(
    pair: tuple[Path, Path], tmp_path: Path, method: Method
) -> None:
    old, new = pair
    delta = tmp_path / "d.zst"
    make_delta(old, new, delta, methods=(method,))
    assert delta_method(delta) == method
    with pytest.raises(DeltaUnusableError, match=r"more than the signed|needs a base"):
        apply_delta(old, delta, tmp_path / "out.tar", length=1000, sha256=_sha(new))
    assert not (tmp_path / "out.tar.part").exists()


@pytest.mark.parametrize("method", ["patch-from", "xor-planes"])
def test_each_method_round_trips_a_fine_tune(tmp_path: Path, method: Method) -> None:
    """Every weight moved a little (a fine-tune): xor-planes is the smaller one."""
    rng = np.random.default_rng(1)
    weights = rng.normal(0, 0.1, size=256 * 1024 + 3).astype(np.float32)
    old, new = tmp_path / "old.tar", tmp_path / "new.tar"
    old.write_bytes(b"hdr" + weights.tobytes())
    new.write_bytes(
        b"hdr" + (weights * (1 + rng.normal(0, 1e-3, weights.shape))).astype(np.float32).tobytes()
    )
    delta = tmp_path / "d.zst"
    size = make_delta(old, new, delta, methods=(method,))
    if method == "xor-planes":
        assert size < new.stat().st_size * 0.6
    out = apply_delta(old, delta, tmp_path / "out.tar", length=new.stat().st_size, sha256=_sha(new))
    assert out.read_bytes() == new.read_bytes()
    both = make_delta(old, new, tmp_path / "best.zst")
    assert delta_method(tmp_path / "best.zst") == "xor-planes"
    assert both <= size


def test_not_a_delta_is_refused(pair: tuple[Path, Path], tmp_path: Path) -> None:
    old, new = pair
    junk = tmp_path / "junk.zst"
    junk.write_bytes(b"\x28\xb5\x2f\xfd" + b"0" * 100)
    with pytest.raises(DeltaUnusableError, match="not a model delta"):
        apply_delta(old, junk, tmp_path / "out.tar", length=new.stat().st_size, sha256=_sha(new))


def test_base_archives_check_the_digest_and_prune(tmp_path: Path, pair: tuple[Path, Path]):
    old, _ = pair
    bases = BaseArchives(tmp_path / "bases")
    digest = _sha(old)
    copy = tmp_path / "copy.tar"
    copy.write_bytes(old.read_bytes())
    bases.keep("digits", "1.0.0", "fp32", copy)
    assert bases.find("digits", "1.0.0", "fp32", digest).read_bytes() == old.read_bytes()
    with pytest.raises(DeltaUnusableError, match="no base archive"):
        bases.find("digits", "0.9.0", "fp32", digest)
    with pytest.raises(DeltaUnusableError, match="not the one"):
        bases.find("digits", "1.0.0", "fp32", "0" * 64)
    copy.write_bytes(b"x")
    bases.keep("digits", "2.0.0", "fp32", copy)
    bases.prune("digits", ["2.0.0"])
    assert not (tmp_path / "bases" / "digits" / "1.0.0").exists()
    assert (tmp_path / "bases" / "digits" / "2.0.0" / "fp32.tar").exists()


def test_summary_reads_like_the_events() -> None:
    assert delta_summary("1.2.0", 3_100_000, 24_000_000) == "delta from 1.2.0, 3.1 MB of 24 MB"
    assert delta_summary("1.0.0", 2_500, 120_000) == "delta from 1.0.0, 2.5 kB of 0.1 MB"


_REBUILD = """
import sys
from pathlib import Path
from agent.updates.delta import apply_delta
base, delta, dest, length, sha = sys.argv[1:]
apply_delta(Path(base), Path(delta), Path(dest), length=int(length), sha256=sha)
"""


def test_power_cut_during_the_rebuild_leaves_no_archive(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """A real process rebuilding from a delta that arrives through a pipe is killed (SIGKILL)
    once it has started writing: nothing under the final name; the next rebuild succeeds and
    removes what the killed one left."""
    old, new = pair
    delta = tmp_path / "d.zst"
    make_delta(old, new, delta)
    fifo = tmp_path / "delta.fifo"
    os.mkfifo(fifo)
    dest = tmp_path / "out.tar"
    args = [str(old), str(fifo), str(dest), str(new.stat().st_size), _sha(new)]
    proc = subprocess.Popen([sys.executable, "-c", _REBUILD, *args])
    try:
        with fifo.open("wb") as pipe:
            data = delta.read_bytes()
            pipe.write(data[: len(data) // 2])
            pipe.flush()
            deadline = time.monotonic() + 30
            while not dest.with_name("out.tar.part").exists():
                assert time.monotonic() < deadline, "the rebuild did not start"
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    except BrokenPipeError:
        pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not dest.exists()
    assert dest.with_name("out.tar.part").exists()  # what the power cut left
    apply_delta(old, delta, dest, length=new.stat().st_size, sha256=_sha(new))
    assert dest.read_bytes() == new.read_bytes()
    assert not dest.with_name("out.tar.part").exists()
