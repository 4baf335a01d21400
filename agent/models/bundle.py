"""Model bundles on disk: build one from model files, read and verify it, pack and unpack archives,
and check a session against its golden cases.

A bundle is a directory::

    manifest.json                     agent.contracts.manifest.BundleManifest
    variants/<variant-id>/<file>      the files each variant lists (shared paths allowed)
    golden/case-000.npz               arrays ``in:<input>`` and FP32 reference ``out:<output>``

or the same tree in a ``.tar`` / ``.tar.gz`` archive (manifest first). This module owns that layout,
the archive format and its path-traversal checks, and the golden comparison (relative L2 per
output). It leaves the manifest schema to ``agent.contracts.manifest``, installing to
``agent.models.store`` and building quantized variants to the control plane, which calls
``build_bundle`` with the files it produced.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
from pydantic import ValidationError as PydanticValidationError

from agent._fs import file_sha256
from agent.contracts.manifest import (
    MANIFEST_FILE,
    AccuracyReport,
    ArtifactFormat,
    BundleManifest,
    FileEntry,
    GoldenCase,
    Precision,
    Preprocessing,
    Provenance,
    Runtime,
    TargetConstraints,
    Tolerance,
    Variant,
)
from agent.contracts.tensors import TensorSpec, loaded, storable
from agent.errors import BundleError, ValidationError

__all__ = [
    "ArchiveReader",
    "GoldenSet",
    "VariantSpec",
    "build_bundle",
    "check_entry",
    "compare_outputs",
    "golden_sets",
    "merge_bundles",
    "pack",
    "parse_manifest",
    "read_manifest",
    "safe_member_path",
    "synthetic_feeds",
    "unpack",
    "validate_outputs",
    "verify_bundle",
]

Array = np.ndarray[Any, Any]
Feeds = Mapping[str, Array]
_CHUNK = 1 << 20


@dataclass(frozen=True)
class VariantSpec:
    """One model file (plus companions) to put into a bundle as a variant."""

    model_path: Path
    runtime: Runtime = "onnxruntime"
    precision: Precision = "fp32"
    format: ArtifactFormat = "onnx"
    id: str | None = None  # default: "<runtime>-<precision>"
    extra_files: tuple[Path, ...] = ()  # e.g. an OpenVINO .bin beside its .xml
    target: TargetConstraints = field(default_factory=TargetConstraints)
    tolerance: Tolerance | None = None  # default: build_bundle's tolerance
    accuracy: AccuracyReport | None = None
    status: str = "accepted"
    inputs: tuple[TensorSpec, ...] | None = None  # default: the reference model's
    outputs: tuple[TensorSpec, ...] | None = None

    @property
    def variant_id(self) -> str:
        return self.id or f"{self.runtime}-{self.precision}"


@dataclass(frozen=True)
class GoldenSet:
    """One golden case: the feeds and the FP32 reference outputs."""

    inputs: dict[str, Array]
    outputs: dict[str, Array]


# --- reading and verifying -------------------------------------------------------------------


def parse_manifest(data: bytes, *, source: str = MANIFEST_FILE) -> BundleManifest:
    """Parse manifest bytes; ``BundleError`` saying what is wrong when they do not parse."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{source} does not parse as JSON: {exc}") from exc
    try:
        return BundleManifest.model_validate(raw)
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise BundleError(
            f"{source} is not a valid manifest: {where}: {first['msg']} "
            f"({exc.error_count()} problem(s))"
        ) from exc


def read_manifest(bundle_dir: Path) -> BundleManifest:
    path = bundle_dir / MANIFEST_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise BundleError(f"no {MANIFEST_FILE} in {bundle_dir}") from exc
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc}") from exc
    return parse_manifest(data, source=str(path))


def check_entry(path: Path, entry: FileEntry, *, deep: bool = True) -> str | None:
    """Why ``path`` does not match ``entry`` (missing, size, sha256), or ``None``."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"file {entry.path} is missing"
    except OSError as exc:
        return f"file {entry.path} cannot be read: {exc}"
    if size != entry.size:
        return f"file {entry.path} has {size} bytes where the manifest says {entry.size}"
    if deep:
        digest = file_sha256(path)
        if digest != entry.sha256:
            return (
                f"file {entry.path} has sha256 {digest[:16]}... "
                f"where the manifest says {entry.sha256[:16]}..."
            )
    return None


def verify_bundle(bundle_dir: Path, *, deep: bool = True) -> BundleManifest:
    """Read the manifest and check every file's size (and sha256 when ``deep``)."""
    manifest = read_manifest(bundle_dir)
    for entry in manifest.all_files():
        problem = check_entry(bundle_dir / entry.path, entry, deep=deep)
        if problem:
            raise BundleError(problem, model=manifest.name)
    return manifest


# --- golden cases ----------------------------------------------------------------------------


def golden_sets(bundle_dir: Path, manifest: BundleManifest) -> list[GoldenSet]:
    """Load the golden ``.npz`` files (no pickles)."""
    sets: list[GoldenSet] = []
    for case in manifest.golden:
        path = bundle_dir / case.file.path
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: loaded(npz[key]) for key in npz.files}
        except (OSError, ValueError) as exc:
            raise BundleError(f"golden file {case.file.path} cannot be read: {exc}") from exc
        inputs = {k[3:]: v for k, v in arrays.items() if k.startswith("in:")}
        outputs = {k[4:]: v for k, v in arrays.items() if k.startswith("out:")}
        if not inputs:
            raise BundleError(f"golden file {case.file.path} holds no 'in:' arrays")
        sets.append(GoldenSet(inputs, outputs))
    return sets


def synthetic_feeds(inputs: Sequence[TensorSpec], *, seed: int = 0) -> dict[str, Array]:
    """Deterministic feeds shaped like ``inputs`` (dynamic dimensions set to 1), for warm-up."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, Array] = {}
    for spec in inputs:
        shape = spec.concrete_shape(1)
        if spec.dtype.kind == "f":
            feeds[spec.name] = rng.random(shape).astype(spec.dtype)
        elif spec.dtype.kind in "iub":
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
        else:
            raise BundleError(f"cannot synthesize input {spec.name!r} of type {spec.datatype}")
    return feeds


def compare_outputs(
    outputs: Mapping[str, Array], reference: Mapping[str, Array], tolerance: Tolerance
) -> list[str]:
    """The reasons ``outputs`` are outside ``tolerance`` of ``reference`` (empty: inside)."""
    problems: list[str] = []
    for name, ref in reference.items():
        if name not in outputs:
            problems.append(f"output {name!r} is missing")
            continue
        got = np.asarray(outputs[name])
        if got.shape != ref.shape:
            problems.append(f"output {name!r} has shape {got.shape} where {ref.shape} is expected")
            continue
        if object in (ref.dtype, got.dtype):  # BYTES: exact, or not at all
            if not np.array_equal(got, ref):
                problems.append(f"output {name!r}: strings differ from the reference")
            continue
        diff = got.astype(np.float64) - ref.astype(np.float64)
        ref_norm = float(np.linalg.norm(ref.astype(np.float64)))
        rel = float(np.linalg.norm(diff)) / max(ref_norm, 1e-12)
        if not np.isfinite(rel) or rel > tolerance.max_rel_l2:
            problems.append(f"output {name!r}: rel L2 {rel:.3g} > {tolerance.max_rel_l2:g}")
        elif tolerance.max_abs is not None:
            worst = float(np.max(np.abs(diff))) if diff.size else 0.0
            if worst > tolerance.max_abs:
                problems.append(f"output {name!r}: max abs {worst:.3g} > {tolerance.max_abs:g}")
    return problems


def validate_outputs(
    run: Callable[[Feeds], Mapping[str, Array]],
    sets: Sequence[GoldenSet],
    tolerance: Tolerance,
    *,
    model: str,
) -> None:
    """Run every golden case; ``ValidationError`` naming the first case and output that strays."""
    for index, case in enumerate(sets):
        problems = compare_outputs(run(case.inputs), case.outputs, tolerance)
        if problems:
            raise ValidationError(f"golden case {index}: " + "; ".join(problems[:3]), model=model)


# --- building --------------------------------------------------------------------------------


def build_bundle(
    out_dir: Path,
    name: str,
    version: str,
    variants: Sequence[VariantSpec | tuple[Any, ...]],
    *,
    golden_inputs: Feeds | Sequence[Feeds] | None = None,
    reference_model: Path | None = None,
    preprocessing: Preprocessing | None = None,
    tolerance: Tolerance | None = None,
    provenance: Provenance | None = None,
) -> BundleManifest:
    """Write a bundle directory and return its manifest.

    ``variants`` are ``VariantSpec``s or tuples of its leading fields
    (``(model_path, runtime, precision, ...)``). The FP32 reference (``reference_model``, else
    the first fp32 ONNX variant) runs on ``golden_inputs`` (one feed dict or several; default:
    one synthetic case) on ONNX Runtime to record the reference outputs.
    """
    from agent.backends import Artifact, LoadOptions, load_first

    specs = [v if isinstance(v, VariantSpec) else VariantSpec(*v) for v in variants]
    if not specs:
        raise BundleError("a bundle needs at least one variant", model=name)
    ref_path = reference_model or next(
        (s.model_path for s in specs if s.precision == "fp32" and s.format == "onnx"), None
    )
    if ref_path is None:
        raise BundleError("no fp32 ONNX variant to compute golden outputs; pass reference_model")
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise BundleError(f"bundle directory {out_dir} is not empty", model=name)

    reference = load_first(
        Artifact(Path(ref_path), name=name), LoadOptions(), order=("onnxruntime",)
    )
    try:
        if golden_inputs is None:
            cases: list[Feeds] = [synthetic_feeds(reference.inputs)]
        elif isinstance(golden_inputs, Mapping):
            cases = [golden_inputs]
        else:
            cases = list(golden_inputs)
        golden: list[GoldenCase] = []
        for index, feeds in enumerate(cases):
            outputs = reference.run(feeds)
            rel = f"golden/case-{index:03d}.npz"
            arrays = {f"in:{k}": storable(np.asarray(v)) for k, v in feeds.items()}
            arrays.update({f"out:{k}": storable(np.asarray(v)) for k, v in outputs.items()})
            buf = io.BytesIO()
            np.savez(buf, **arrays)  # type: ignore[arg-type]
            golden.append(GoldenCase(file=_write_file(out_dir, rel, buf.getvalue())))
        ref_inputs, ref_outputs = reference.inputs, reference.outputs
    finally:
        reference.close()

    built: list[Variant] = []
    for spec in specs:
        vid = spec.variant_id
        entries: list[FileEntry] = []
        for src in (Path(spec.model_path), *spec.extra_files):
            entries.append(_copy_file(src, out_dir, f"variants/{vid}/{src.name}"))
        built.append(
            Variant(
                id=vid,
                runtime=spec.runtime,
                format=spec.format,
                precision=spec.precision,
                entrypoint=entries[0].path,
                files=tuple(entries),
                inputs=spec.inputs or ref_inputs,
                outputs=spec.outputs or ref_outputs,
                target=spec.target,
                tolerance=spec.tolerance or tolerance or Tolerance(),
                accuracy=spec.accuracy,
                status="rejected" if spec.status == "rejected" else "accepted",
            )
        )
    manifest = BundleManifest(
        name=name,
        version=version,
        variants=tuple(built),
        golden=tuple(golden),
        preprocessing=preprocessing,
        provenance=provenance or Provenance(built_at=datetime.now(timezone.utc)),
    )
    _write_file(out_dir, MANIFEST_FILE, manifest.model_dump_json(indent=2).encode())
    return manifest


def _write_file(root: Path, rel: str, data: bytes) -> FileEntry:
    dest = root / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    return FileEntry(path=rel, sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def _copy_file(src: Path, root: Path, rel: str) -> FileEntry:
    dest = root / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    try:
        with src.open("rb") as fin, dest.open("wb") as fout:
            while block := fin.read(_CHUNK):
                digest.update(block)
                size += len(block)
                fout.write(block)
    except OSError as exc:
        raise BundleError(f"cannot copy {src} into the bundle: {exc}") from exc
    return FileEntry(path=rel, sha256=digest.hexdigest(), size=size)


# --- archives --------------------------------------------------------------------------------


def _is_gzip(path: Path) -> bool:
    return path.name.endswith((".gz", ".tgz"))


def pack(bundle_dir: Path, archive: Path) -> Path:
    """Write ``manifest.json`` then every listed file into a tar (gzip for ``.gz``/``.tgz``).

    Reproducible: sorted names, zero mtimes and owners, so equal bundles give equal archives.
    Only files the manifest lists travel, and each is verified first.
    """
    manifest = verify_bundle(bundle_dir)
    names = [MANIFEST_FILE, *sorted(e.path for e in manifest.all_files())]
    mode = "w:gz" if _is_gzip(archive) else "w"
    tmp = archive.with_name(f".{archive.name}.{os.getpid()}.tmp")
    try:
        with tarfile.open(tmp, mode) as tar:  # type: ignore[call-overload]
            for rel in names:
                info = tarfile.TarInfo(rel)
                path = bundle_dir / rel
                info.size = path.stat().st_size
                info.mode = 0o644
                with path.open("rb") as f:
                    tar.addfile(info, f)
        tmp.replace(archive)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BundleError(f"cannot write archive {archive}: {exc}") from exc
    return archive


def safe_member_path(name: str) -> str:
    """The normalized relative path of an archive member; ``BundleError`` if it could escape."""
    if not name or "\\" in name or "\0" in name:
        raise BundleError(f"unsafe path in archive: {name!r}")
    pure = PurePosixPath(name)
    if pure.is_absolute() or any(part == ".." for part in pure.parts):
        raise BundleError(f"unsafe path in archive: {name!r}")
    parts = [p for p in pure.parts if p != "."]
    if not parts:
        raise BundleError(f"unsafe path in archive: {name!r}")
    return "/".join(parts)


class ArchiveReader:
    """Regular files of a bundle archive by relative path, streamed; links and devices refused.

    An archive whose files sit under one top-level directory (``bundle/manifest.json``) is read
    as if that directory were the root.
    """

    def __init__(self, archive: Path) -> None:
        try:
            self._tar = tarfile.open(archive, "r:*")  # noqa: SIM115 - closed by close()
        except (OSError, tarfile.TarError) as exc:
            raise BundleError(f"{archive} is not a readable tar archive: {exc}") from exc
        try:
            self._members = self._index(archive)
        except BaseException:
            self._tar.close()
            raise

    def _index(self, archive: Path) -> dict[str, tarfile.TarInfo]:
        members: dict[str, tarfile.TarInfo] = {}
        try:
            infos = self._tar.getmembers()
        except (OSError, tarfile.TarError, EOFError) as exc:
            raise BundleError(f"{archive} is truncated or corrupt: {exc}") from exc
        for info in infos:
            rel = safe_member_path(info.name)
            if info.isdir():
                continue
            if not info.isfile():
                raise BundleError(f"archive member {info.name!r} is not a regular file")
            if rel in members:
                raise BundleError(f"archive member {rel!r} appears twice")
            members[rel] = info
        if MANIFEST_FILE not in members:
            tops = {rel.split("/", 1)[0] for rel in members}
            if len(tops) == 1 and f"{next(iter(tops))}/{MANIFEST_FILE}" in members:
                prefix = f"{next(iter(tops))}/"
                members = {rel[len(prefix) :]: info for rel, info in members.items()}
        return members

    def names(self) -> list[str]:
        return list(self._members)

    def read(self, rel: str) -> bytes:
        with self.open(rel) as f:
            return f.read()

    def open(self, rel: str) -> IO[bytes]:
        info = self._members.get(rel)
        if info is None:
            raise BundleError(f"file {rel} is missing from the archive")
        try:
            stream = self._tar.extractfile(info)
        except (OSError, tarfile.TarError) as exc:
            raise BundleError(f"cannot read {rel} from the archive: {exc}") from exc
        if stream is None:
            raise BundleError(f"archive member {rel!r} is not a regular file")
        return stream

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> ArchiveReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def unpack(archive: Path, dest: Path) -> BundleManifest:
    """Extract the manifest and the files it lists (verified) into ``dest`` (new or empty)."""
    if dest.exists() and any(dest.iterdir()):
        raise BundleError(f"destination {dest} is not empty")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with ArchiveReader(archive) as reader:
            manifest = parse_manifest(reader.read(MANIFEST_FILE), source=f"{archive}:manifest")
            for entry in manifest.all_files():
                target = dest / entry.path
                target.parent.mkdir(parents=True, exist_ok=True)
                with reader.open(entry.path) as fin, target.open("wb") as fout:
                    shutil.copyfileobj(fin, fout, _CHUNK)
                problem = check_entry(target, entry)
                if problem:
                    raise BundleError(problem, model=manifest.name)
            (dest / MANIFEST_FILE).write_bytes(reader.read(MANIFEST_FILE))
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return manifest


def merge_bundles(sources: Sequence[Path], dest: Path) -> BundleManifest:
    """One bundle directory in ``dest`` (new or empty) with the variants of several bundles of
    the same model version, each an archive or a directory, verified file by file.

    The control plane publishes one archive per variant; a device that measures several
    variants installs them as one version. The golden cases, preprocessing and provenance are
    the first source's; a file path two sources share must hold the same bytes.
    """
    if not sources:
        raise BundleError("nothing to merge")
    if dest.exists() and any(dest.iterdir()):
        raise BundleError(f"destination {dest} is not empty")
    dest.mkdir(parents=True, exist_ok=True)
    work = dest.with_name(f".{dest.name}.parts")
    try:
        shutil.rmtree(work, ignore_errors=True)
        manifests: list[tuple[BundleManifest, Path]] = []
        for index, source in enumerate(sources):
            if source.is_dir():
                manifests.append((verify_bundle(source), source))
            else:
                part = work / str(index)
                manifests.append((unpack(source, part), part))
        first, _ = manifests[0]
        variants: dict[str, Variant] = {}
        files: dict[str, FileEntry] = {}
        for manifest, root in manifests:
            if (manifest.name, manifest.version) != (first.name, first.version):
                raise BundleError(
                    f"cannot merge {manifest.name} {manifest.version} into "
                    f"{first.name} {first.version}",
                    model=first.name,
                )
            wanted = [*(f for v in manifest.variants for f in v.files)]
            if manifest is first:
                wanted += [g.file for g in manifest.golden]
            for entry in wanted:
                known = files.get(entry.path)
                if known is not None:
                    if known.sha256 != entry.sha256:
                        raise BundleError(
                            f"two variants ship different {entry.path}", model=first.name
                        )
                    continue
                files[entry.path] = entry
                target = dest / entry.path
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / entry.path, target)
            for variant in manifest.variants:
                variants.setdefault(variant.id, variant)
        merged = first.model_copy(update={"variants": tuple(variants.values())})
        (dest / MANIFEST_FILE).write_text(merged.model_dump_json(indent=2) + "\n")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return merged
