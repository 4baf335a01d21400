"""The model registry: create models, upload versions (variant builds start at once), read them.

An upload is checked whole (ONNX parses and loads, sample sets match its inputs, the version is
new) in a scratch directory before anything is stored; a refusal leaves no row and no blob.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from sqlalchemy import select

from agent.logs import get_logger
from control_plane.api.deps import Context, CurrentOperator, OperatorWriter, SessionDep
from control_plane.api.params import VERSION_RE, ModelNamePath, VersionPath
from control_plane.api.schemas import ModelCreate, ModelPublic, VersionPublic
from control_plane.api.views import model_public, version_public
from control_plane.db.models import Model
from control_plane.errors import InvalidInputError
from control_plane.registry import (
    StagedUpload,
    check_new_version,
    create_model,
    create_version,
    get_model,
    get_version,
)
from control_plane.uploads import check_upload

router = APIRouter(prefix="/v1/models", tags=["models"])
log = get_logger(__name__)

COPY_CHUNK = 1024 * 1024  # bytes


@router.post("", status_code=201, summary="Create a model")
def create(
    body: ModelCreate, session: SessionDep, operator: OperatorWriter, ctx: Context
) -> ModelPublic:
    model = create_model(
        session,
        name=body.name,
        accuracy_budget=body.accuracy_budget,
        description=body.description,
        now=ctx.now(),
    )
    return model_public(model)


@router.get("", summary="List models")
def list_models(session: SessionDep, operator: CurrentOperator) -> list[ModelPublic]:
    return [model_public(m) for m in session.scalars(select(Model).order_by(Model.name))]


@router.get("/{name}", summary="A model and its versions")
def show(name: ModelNamePath, session: SessionDep, operator: CurrentOperator) -> ModelPublic:
    return model_public(get_model(session, name))


@router.get("/{name}/versions/{version}", summary="A version, its variants and its build job")
def show_version(
    name: ModelNamePath, version: VersionPath, session: SessionDep, operator: CurrentOperator
) -> VersionPublic:
    return version_public(session, get_version(session, name, version))


def _save(upload: UploadFile | None, dest: Path, *, field: str, limit: int) -> Path | None:
    if upload is None:
        return None
    written = 0
    with dest.open("wb") as out:
        while chunk := upload.file.read(COPY_CHUNK):
            written += len(chunk)
            if written > limit:
                raise InvalidInputError(f"larger than the limit of {limit} bytes", field=field)
            out.write(chunk)
    if written == 0:
        raise InvalidInputError("empty file", field=field)
    return dest


@router.post(
    "/{name}/versions",
    status_code=202,
    summary="Upload a version; its variants build in the background",
    description=(
        "Multipart: `version` (semantic version), `onnx` (the FP32 model), optional "
        "`calibration` (.npz of input samples, arrays keyed by input name), `validation` "
        "(.npz like calibration plus `labels`), `golden` (.npz of golden inputs). Answers the "
        "version with its queued build job; poll `/v1/jobs/{id}`."
    ),
)
def upload_version(
    *,
    name: ModelNamePath,
    version: Annotated[str, Form(pattern=VERSION_RE)],
    onnx: Annotated[UploadFile, File(description="ONNX model")],
    session: SessionDep,
    operator: OperatorWriter,
    ctx: Context,
    calibration: Annotated[UploadFile | None, File(description="calibration samples .npz")] = None,
    validation: Annotated[UploadFile | None, File(description="labelled validation .npz")] = None,
    golden: Annotated[UploadFile | None, File(description="golden inputs .npz")] = None,
) -> VersionPublic:
    model = get_model(session, name)
    check_new_version(session, model, version)
    limit = ctx.settings.max_upload_bytes
    scratch_root = ctx.settings.data_dir / "tmp"
    scratch_root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="upload-", dir=scratch_root))
    try:
        onnx_path = _save(onnx, scratch / "model.onnx", field="onnx", limit=limit)
        assert onnx_path is not None
        staged = StagedUpload(
            onnx=onnx_path,
            calibration=_save(
                calibration, scratch / "calibration.npz", field="calibration", limit=limit
            ),
            validation=_save(
                validation, scratch / "validation.npz", field="validation", limit=limit
            ),
            golden=_save(golden, scratch / "golden.npz", field="golden", limit=limit),
        )
        check_upload(
            staged.onnx,
            calibration=staged.calibration,
            validation=staged.validation,
            golden=staged.golden,
        )
        row, job = create_version(
            session,
            ctx.store,
            model=model,
            version=version,
            staged=staged,
            created_by=operator.name,
            now=ctx.now(),
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ctx.worker.submit(job.id)
    return version_public(session, row)
