"""The model registry: create models, upload versions (variant builds start at once), read them.

An upload's body is read only after the caller's credential has been checked, streamed file by
file into a scratch directory with every size bounded (``control_plane.api.multipart``), then
checked whole (ONNX parses and loads within its memory bound, sample sets match its inputs, the
version is new) before anything is stored; a refusal leaves no row and no blob.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError as PydanticValidationError
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from agent.contracts.accuracy import TASKS
from agent.contracts.manifest import Preprocessing
from agent.logs import get_logger
from control_plane.api.deps import Context, CurrentOperator, OperatorWriter, SessionDep
from control_plane.api.multipart import FormLimits, UploadForm, read_multipart
from control_plane.api.params import VERSION_RE, ModelNamePath, VersionPath
from control_plane.api.schemas import ErrorBody, ModelCreate, ModelPublic, VersionPublic
from control_plane.api.views import model_public, version_public
from control_plane.context import AppContext
from control_plane.db.models import Model
from control_plane.errors import InvalidInputError
from control_plane.registry import (
    StagedUpload,
    check_new_version,
    create_model,
    create_version,
    delete_failed_version,
    get_model,
    get_version,
)
from control_plane.uploads import check_upload

router = APIRouter(prefix="/v1/models", tags=["models"])
log = get_logger(__name__)


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


@router.delete(
    "/{name}/versions/{version}",
    status_code=204,
    summary="Delete a version whose build failed (its number can then be uploaded again)",
    responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
def delete_version(
    name: ModelNamePath, version: VersionPath, session: SessionDep, operator: OperatorWriter
) -> Response:
    delete_failed_version(session, name, version)
    log.info("version_delete_requested", model=name, version=version, by=operator.name)
    return Response(status_code=204)


_UPLOAD_FILES = {
    "onnx": "model.onnx",
    "calibration": "calibration.npz",
    "validation": "validation.npz",
    "golden": "golden.npz",
}
_VERSION = re.compile(VERSION_RE)
_UPLOAD_SCHEMA: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["version", "onnx"],
                "properties": {
                    "version": {"type": "string", "pattern": VERSION_RE},
                    "task": {
                        "type": "string",
                        "enum": list(TASKS),
                        "description": "what the accuracy gate measures (default: the task"
                        " the ONNX metadata declares, else inferred from the outputs)",
                    },
                    "preprocessing": {
                        "type": "string",
                        "maxLength": 1024,
                        "description": "how the device's loop turns frames into the first input:"
                        " 'resize=640x640,layout=nchw,mean=0.485,0.456,0.406,std=0.229,0.224,"
                        "0.225,color=rgb,fit=letterbox', or the Preprocessing object as JSON",
                    },
                    "onnx": {"type": "string", "format": "binary", "description": "ONNX model"},
                    "calibration": {
                        "type": "string",
                        "format": "binary",
                        "description": "calibration samples .npz",
                    },
                    "validation": {
                        "type": "string",
                        "format": "binary",
                        "description": "labelled validation .npz",
                    },
                    "golden": {
                        "type": "string",
                        "format": "binary",
                        "description": "golden inputs .npz",
                    },
                },
            }
        }
    },
}


def _staged(form: UploadForm) -> tuple[str, StagedUpload]:
    """The form's version and files, each present file non-empty."""
    version = form.fields.get("version", "")
    if not _VERSION.match(version):
        raise InvalidInputError(f"{version[:64]!r} is not a semantic version", field="version")
    for field, path in form.files.items():
        if path.stat().st_size == 0:
            raise InvalidInputError("empty file", field=field)
    if "onnx" not in form.files:
        raise InvalidInputError("missing: the ONNX model is required", field="onnx")
    task = form.fields.get("task") or None
    if task is not None and task not in TASKS:
        raise InvalidInputError(
            f"{task[:32]!r} is not a task; known: {', '.join(TASKS)}", field="task"
        )
    preprocessing = _preprocessing(form.fields.get("preprocessing") or None)
    return version, StagedUpload(
        preprocessing=preprocessing,
        task=task,  # type: ignore[arg-type]  # checked against TASKS above
        onnx=form.files["onnx"],
        calibration=form.files.get("calibration"),
        validation=form.files.get("validation"),
        golden=form.files.get("golden"),
    )


def _preprocessing(text: str | None) -> Preprocessing | None:
    """The declared preprocessing: a JSON object, or the ``key=value,...`` form."""
    if text is None:
        return None
    if len(text) > 1024:
        raise InvalidInputError("longer than 1024 characters", field="preprocessing")
    try:
        if text.lstrip().startswith("{"):
            return Preprocessing.model_validate_json(text)
        return Preprocessing.parse(text)
    except PydanticValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'preprocessing'}: {e['msg']}"
            for e in exc.errors()
        )
        raise InvalidInputError(problems, field="preprocessing") from None
    except ValueError as exc:
        raise InvalidInputError(str(exc), field="preprocessing") from None


def _known_model(ctx: AppContext, name: str) -> None:
    with ctx.sessions() as session:
        get_model(session, name)


def _store_version(
    ctx: AppContext, name: str, version: str, staged: StagedUpload, created_by: str
) -> tuple[VersionPublic, int]:
    """Check the staged upload whole, then record it; the version and its build job's id."""
    settings = ctx.settings
    with ctx.sessions() as session:
        model = get_model(session, name)
        check_new_version(session, model, version)
        check_upload(
            staged.onnx,
            calibration=staged.calibration,
            validation=staged.validation,
            golden=staged.golden,
            task=staged.task,
            max_sample_bytes=settings.max_sample_set_bytes,
            max_constant_bytes=settings.max_model_constant_bytes,
        )
        row, job = create_version(
            session,
            ctx.store,
            model=model,
            version=version,
            staged=staged,
            created_by=created_by,
            now=ctx.now(),
        )
        return version_public(session, row), job.id


@router.post(
    "/{name}/versions",
    status_code=202,
    summary="Upload a version; its variants build in the background",
    description=(
        "Multipart: `version` (semantic version), `onnx` (the FP32 model), optional "
        "`calibration` (.npz of input samples, arrays keyed by input name), `validation` "
        "(.npz like calibration plus `labels`), `golden` (.npz of golden inputs). Answers the "
        "version with its queued build job; poll `/v1/jobs/{id}`. The credential is checked "
        "before any of the body is read; 413 when the body or one file is over its limit."
    ),
    openapi_extra={"requestBody": _UPLOAD_SCHEMA},
)
async def upload_version(
    name: ModelNamePath, request: Request, operator: OperatorWriter, ctx: Context
) -> VersionPublic:
    # The dependencies (the operator's credential) have run; only now is the body read.
    await run_in_threadpool(_known_model, ctx, name)
    settings = ctx.settings
    scratch_root = settings.data_dir / "tmp"
    scratch_root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="upload-", dir=scratch_root))
    limits = FormLimits(
        files=_UPLOAD_FILES,
        fields=frozenset({"version", "task", "preprocessing"}),
        max_file_bytes=settings.max_upload_bytes,
    )
    try:
        form = await read_multipart(
            request.headers.get("content-type", ""), request.stream(), scratch, limits
        )
        version, staged = _staged(form)
        public, job_id = await run_in_threadpool(
            _store_version, ctx, name, version, staged, operator.name
        )
    finally:
        await run_in_threadpool(shutil.rmtree, scratch, True)
    ctx.worker.submit(job_id)
    return public
