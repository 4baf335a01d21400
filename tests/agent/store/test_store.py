"""The on-disk store: install, pointer, garbage collection, start-up recovery, and bad input
(each rejected with a clear reason while the active version keeps serving, nothing half-written)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pytest
from structlog.testing import capture_logs

from agent.contracts.events import UpdateEvent
from agent.errors import BundleError, ModelLoadError, StoreError, ValidationError
from agent.models.activation import ModelActivator
from agent.models.probation import Limits, UpdateJournal
from agent.models.slots import ModelSlot
from agent.models.store import ModelStore
from tests.agent.store import models
from tests.agent.store.conftest import expected_logits


@pytest.fixture
def serving(
    store: ModelStore, slot: ModelSlot, bundles: dict[str, Path]
) -> tuple[ModelStore, ModelSlot]:
    """1.0.0 installed, active and serving."""
    store.install(bundles["1.0.0"])
    store.activate("digits", "1.0.0")
    slot.start("1.0.0")
    return store, slot


def assert_intact(
    store: ModelStore, slot: ModelSlot, model_files: dict[str, Path], x: np.ndarray
) -> None:
    """1.0.0 still active and serving correct answers; no staging leftovers; nothing else."""
    assert store.active("digits") == "1.0.0"
    (version, _variant), out = slot.infer_versioned({"input": x})
    assert version == "1.0.0"
    np.testing.assert_allclose(out["logits"], expected_logits(model_files["1.0.0"], x), rtol=1e-5)
    staging = store.root / ".staging"
    assert not staging.exists() or not any(staging.iterdir())
    assert store.versions("digits") == ["1.0.0"]
    store.verify("digits", "1.0.0", deep=True)
    assert store.recover().clean


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dest = tmp_path / f"copy-{bundle.name}"
    shutil.copytree(bundle, dest)
    return dest


def _model_file(bundle: Path) -> Path:
    return next((bundle / "variants").rglob("*.onnx"))


# --- the happy paths ---------------------------------------------------------------------------


def test_install_directory_and_archive(
    store: ModelStore,
    bundles: dict[str, Path],
    archives: dict[str, Path],
    events: list[UpdateEvent],
) -> None:
    installed = store.install(bundles["1.0.0"])
    assert installed.path == store.root / "digits" / "1.0.0"
    assert not installed.already_present
    assert store.install(archives["2.0.0"]).version == "2.0.0"
    assert store.versions("digits") == ["1.0.0", "2.0.0"]
    assert store.installed_at("digits", "2.0.0") is not None
    store.verify("digits", "2.0.0", deep=True)
    assert [e.step for e in events] == ["staged", "staged"]
    again = store.install(archives["1.0.0"])  # same content again: a no-op
    assert again.already_present


def test_same_version_with_other_content_is_refused(
    store: ModelStore,
    bundles: dict[str, Path],
    model_files: dict[str, Path],
    tmp_path: Path,
    golden_x: np.ndarray,
) -> None:
    store.install(bundles["1.0.0"])
    other = tmp_path / "other"
    models.make_bundle(other, "1.0.0", model_files["2.0.0"], golden_x)
    with pytest.raises(StoreError, match="already installed with different content"):
        store.install(other)


def test_pointer_flips_and_rollback(store: ModelStore, bundles: dict[str, Path]) -> None:
    for v in ("1.0.0", "2.0.0"):
        store.install(bundles[v])
    assert store.active("digits") is None
    store.activate("digits", "1.0.0")
    pointer = store.activate("digits", "2.0.0")
    assert (pointer.version, pointer.previous) == ("2.0.0", "1.0.0")
    on_disk = json.loads((store.root / "digits" / "active.json").read_text())
    assert on_disk["version"] == "2.0.0"
    back = store.rollback("digits")
    assert (back.version, back.previous) == ("1.0.0", None)
    with pytest.raises(StoreError, match="no previous version recorded"):
        store.rollback("digits")
    with pytest.raises(StoreError, match="not installed"):
        store.activate("digits", "9.9.9")
    with pytest.raises(StoreError, match="invalid model name"):
        store.activate("../etc", "1.0.0")


def test_gc_keeps_newest_and_never_active_or_previous(
    state_dir: Path, tmp_path: Path, model_files: dict[str, Path], golden_x: np.ndarray
) -> None:
    store = ModelStore(state_dir, keep_versions=2)
    for i, v in enumerate(["1.0.0", "1.1.0", "1.2.0", "1.3.0", "1.4.0"]):
        models.make_bundle(tmp_path / v, v, model_files["1.0.0"], golden_x)
        store.install(tmp_path / v)
        if i == 0:
            store.activate("digits", v)
        if i == 1:
            store.activate("digits", v)  # active 1.1.0, previous 1.0.0
    assert store.versions("digits") == ["1.0.0", "1.1.0", "1.3.0", "1.4.0"]
    store.activate("digits", "1.4.0")  # previous 1.1.0: 1.0.0 is no longer protected
    assert store.gc("digits") == ["1.0.0"]
    assert store.versions("digits") == ["1.1.0", "1.3.0", "1.4.0"]


# --- start-up recovery ------------------------------------------------------------------------


def test_recovery_discards_half_written_and_corrupt_and_repairs_pointer(
    store: ModelStore, bundles: dict[str, Path]
) -> None:
    for v in ("1.0.0", "2.0.0"):
        store.install(bundles[v])
    store.activate("digits", "1.0.0")
    store.activate("digits", "2.0.0")
    # an install cut off mid-copy, a temp pointer, and bit rot in the active version
    half = store.root / ".staging" / "digits-3.0.0.abcd1234"
    (half / "variants").mkdir(parents=True)
    (half / "variants" / "part.onnx").write_bytes(b"\0" * 100)
    (store.root / "digits" / ".active.json.123.tmp").write_text("{")
    model = _model_file(store.path("digits", "2.0.0"))
    data = bytearray(model.read_bytes())
    data[100] ^= 0xFF
    model.write_bytes(bytes(data))

    with capture_logs() as logs:
        report = store.recover()
    assert report.staging_removed == 1
    assert [(n, v) for n, v, _ in report.discarded] == [("digits", "2.0.0")]
    assert "sha256" in report.discarded[0][2]
    assert report.pointers_repaired == [("digits", "2.0.0", "1.0.0")]
    assert store.active("digits") == "1.0.0"
    assert store.versions("digits") == ["1.0.0"]
    assert not any((store.root / ".staging").iterdir())
    assert not (store.root / "digits" / ".active.json.123.tmp").exists()
    names = {entry["event"] for entry in logs}
    assert {"store_staging_discarded", "store_version_removed", "store_pointer_repaired"} <= names
    assert store.recover().clean


def test_recovery_of_a_corrupt_pointer_picks_the_newest_valid_version(
    store: ModelStore, bundles: dict[str, Path]
) -> None:
    for v in ("1.0.0", "2.0.0"):
        store.install(bundles[v])
    (store.root / "digits" / "active.json").write_text('{"version": ')
    with pytest.raises(StoreError, match="corrupt"):
        store.active("digits")
    store.recover()
    assert store.active("digits") == "2.0.0"


def test_recovery_removes_a_pointer_with_nothing_left(
    store: ModelStore, bundles: dict[str, Path]
) -> None:
    store.install(bundles["1.0.0"])
    store.activate("digits", "1.0.0")
    (store.path("digits", "1.0.0") / "manifest.json").write_text("garbage")
    store.recover()
    assert store.active("digits") is None
    assert store.versions("digits") == []


# --- bad input: each rejected, the active version keeps serving, nothing half-written ----------


def test_bundle_with_a_missing_file(
    serving: tuple[ModelStore, ModelSlot],
    bundles: dict[str, Path],
    model_files: dict[str, Path],
    tmp_path: Path,
    golden_x: np.ndarray,
    events: list[UpdateEvent],
) -> None:
    store, slot = serving
    bad = _copy(bundles["2.0.0"], tmp_path)
    _model_file(bad).unlink()
    with pytest.raises(BundleError, match=r"file variants/onnxruntime-fp32/v2.0.0.onnx is missing"):
        store.install(bad)
    assert events[-1].step == "refused"
    assert "missing" in (events[-1].reason or "")
    assert_intact(store, slot, model_files, golden_x)


def test_bundle_with_a_wrong_sha256(
    serving: tuple[ModelStore, ModelSlot],
    bundles: dict[str, Path],
    model_files: dict[str, Path],
    tmp_path: Path,
    golden_x: np.ndarray,
) -> None:
    store, slot = serving
    bad = _copy(bundles["2.0.0"], tmp_path)
    path = _model_file(bad)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # same size, other bytes
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"sha256 [0-9a-f]{16}\.\.\. does not match"):
        store.install(bad)
    assert_intact(store, slot, model_files, golden_x)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{not json", "does not parse as JSON"),
        ('{"schema_version": 1, "name": "digits", "version": "two"}', "not a valid manifest"),
        (
            '{"schema_version": 1, "name": "../up", "version": "1.0.0", "variants": []}',
            "not a valid manifest",
        ),
    ],
)
def test_manifest_that_does_not_parse(
    serving: tuple[ModelStore, ModelSlot],
    bundles: dict[str, Path],
    model_files: dict[str, Path],
    tmp_path: Path,
    golden_x: np.ndarray,
    text: str,
    reason: str,
) -> None:
    store, slot = serving
    bad = _copy(bundles["2.0.0"], tmp_path)
    (bad / "manifest.json").write_text(text)
    with pytest.raises(BundleError, match=reason):
        store.install(bad)
    assert_intact(store, slot, model_files, golden_x)


def _activator(slot: ModelSlot, state_dir: Path) -> ModelActivator:
    return ModelActivator(slot, journal=UpdateJournal(state_dir), limits=Limits(probation_s=10))


def test_model_that_fails_to_load(
    serving: tuple[ModelStore, ModelSlot],
    model_files: dict[str, Path],
    tmp_path: Path,
    golden_x: np.ndarray,
    state_dir: Path,
    events: list[UpdateEvent],
) -> None:
    store, slot = serving
    models.make_bundle(
        tmp_path / "b",
        "2.0.0",
        model_files["corrupt"],
        golden_x,
        reference_model=model_files["2.0.0"],
    )
    store.install(tmp_path / "b")  # the files are what the manifest says: the bytes are fine
    activator = _activator(slot, state_dir)
    with pytest.raises(ModelLoadError, match="corrupt or not an ONNX file"):
        activator.update("2.0.0")
    record = activator.record()
    assert record is not None
    assert record.phase == "failed"
    assert "corrupt or not an ONNX file" in (record.reason or "")
    assert [e.step for e in events][-2:] == ["failed", "removed"]
    assert_intact(store, slot, model_files, golden_x)


def test_golden_outputs_that_do_not_match(
    serving: tuple[ModelStore, ModelSlot],
    model_files: dict[str, Path],
    tmp_path: Path,
    golden_x: np.ndarray,
    state_dir: Path,
) -> None:
    store, slot = serving
    # The reference outputs come from 1.0.0 while the variant is the shifted 2.0.0 network.
    models.make_bundle(
        tmp_path / "b",
        "2.0.0",
        model_files["2.0.0"],
        golden_x,
        reference_model=model_files["1.0.0"],
    )
    store.install(tmp_path / "b")
    with pytest.raises(
        ValidationError, match=r"golden case 0: output 'logits': rel L2 [0-9.]+ > 0.001"
    ):
        _activator(slot, state_dir).update("2.0.0")
    assert_intact(store, slot, model_files, golden_x)


# --- a disk that fills up, for real -------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (root can mount one here; elsewhere the test says why it cannot run)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up ({done.stderr.decode().strip()}); needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_that_fills_during_install(
    small_fs: Path,
    bundles: dict[str, Path],
    model_files: dict[str, Path],
    tmp_path: Path,
    golden_x: np.ndarray,
    events: list[UpdateEvent],
) -> None:
    filler = small_fs / "another-process.bin"
    fill = {"armed": False}

    def writer(path: Path) -> IO[bytes]:
        # Another process fills the disk once the install has started writing.
        if fill["armed"] and not filler.exists():
            free = shutil.disk_usage(small_fs).free
            filler.write_bytes(b"\0" * (free - 200 * 1024))
        return path.open("xb")

    state = small_fs / "state"
    store = ModelStore(state, file_writer=writer)
    slot = ModelSlot("digits", store)
    try:
        store.install(bundles["1.0.0"])
        store.activate("digits", "1.0.0")
        slot.start("1.0.0")
        big = tmp_path / "big"
        models.make_bundle(big, "2.0.0", model_files["2.0.0"], golden_x, blob_bytes=1024 * 1024)
        fill["armed"] = True
        with pytest.raises(
            StoreError,
            match=r"disk full while installing digits 2.0.0 .*"
            r"nothing was installed, the active version is unchanged",
        ):
            store.install(big)
        assert_intact(store, slot, model_files, golden_x)
        filler.unlink()

        # Not enough room from the start: refused before writing anything.
        filler.write_bytes(b"\0" * (shutil.disk_usage(small_fs).free - 300 * 1024))
        fill["armed"] = False
        with pytest.raises(StoreError, match=r"not enough free space to install digits 2\.0\.0"):
            store.install(big)
        assert_intact(store, slot, model_files, golden_x)

        # Full to the last page: the pointer cannot flip and stays as it was.
        store.install(bundles["2.0.0"])
        free = shutil.disk_usage(small_fs).free
        with (small_fs / "last.bin").open("wb") as f:
            f.write(b"\0" * free)
        with pytest.raises(
            StoreError, match=r"cannot flip the active pointer of digits to 2\.0\.0: disk full"
        ):
            store.activate("digits", "2.0.0")
        assert store.active("digits") == "1.0.0"
        assert not [p for p in (state / "models" / "digits").iterdir() if p.name.endswith(".tmp")]
    finally:
        slot.close()
