"""The tables, as typed SQLAlchemy 2 declarative models.

Timestamps are stored timezone-aware and always read back in UTC (SQLite keeps no zone).
JSON columns hold pydantic contract payloads (profile, labels, manifest, variant spec) as dumped
by ``model_dump(mode="json")``; the services validate them on the way in and out.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "ApiToken",
    "Assignment",
    "Base",
    "BootstrapToken",
    "BuildJob",
    "Device",
    "Lease",
    "Model",
    "ModelVersion",
    "ShadowAssignment",
    "UTCDateTime",
    "VariantRow",
]


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware datetime that comes back in UTC on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(timezone.utc) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}  # noqa: RUF012


class ApiToken(Base):
    """An operator's API token; only the sha256 of the token is kept."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(64))
    revoked_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]  # set for every stored token (migration 0006)


class BootstrapToken(Base):
    """An enrollment token: the labels it binds, how often and until when it may enroll.

    Only the sha256 is kept. The settings' bootstrap token gets a row of its own at its first
    use (``created_by`` = ``settings``), so its uses are counted like any other token's.
    """

    __tablename__ = "bootstrap_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    labels: Mapped[dict[str, Any]]
    max_uses: Mapped[int | None] = mapped_column(Integer)  # None: no bound (settings token only)
    uses: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(64))
    revoked_at: Mapped[datetime | None]


class Device(Base):
    """An enrolled device: its credential hash, labels, last profile and last reported state.

    ``labels`` select assignments; they come from the operator or from the bootstrap token the
    device enrolled with. ``requested_labels`` are what the device asked for at enrollment: they
    select nothing until an operator approves them. ``retries`` counts the operator's explicit
    retries per model name (``edgectl devices retry``); it feeds the generation of the device's
    desired-state entries. A credential rotation keeps the old credential's hash in
    ``previous_token_hash`` until the device uses its new one or ``credential_rotate_by`` passes.
    """

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    labels: Mapped[dict[str, Any]]
    profile: Mapped[dict[str, Any] | None]
    reported: Mapped[dict[str, Any] | None]
    enrolled_at: Mapped[datetime]
    last_seen_at: Mapped[datetime | None]
    reported_at: Mapped[datetime | None]
    retries: Mapped[dict[str, Any] | None]
    requested_labels: Mapped[dict[str, Any] | None]
    bootstrap_token_id: Mapped[int | None] = mapped_column(Integer)
    previous_token_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    credential_rotate_by: Mapped[datetime | None]
    credential_revoked_at: Mapped[datetime | None]
    changed_at: Mapped[datetime | None]  # labels or profile last changed (a snapshot's stamp)


class Model(Base):
    """A model name in the registry and its accuracy budget (top-1 points)."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    accuracy_budget: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime]

    versions: Mapped[list[ModelVersion]] = relationship(
        back_populates="model", order_by="ModelVersion.id"
    )


class ModelVersion(Base):
    """One uploaded version: the digests of its inputs and, once built, its bundle manifest."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version", name="uq_model_versions_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    version: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # building | ready | failed
    source_sha256: Mapped[str] = mapped_column(String(64))
    source_size: Mapped[int] = mapped_column(Integer)
    calibration_sha256: Mapped[str | None] = mapped_column(String(64))
    validation_sha256: Mapped[str | None] = mapped_column(String(64))
    golden_sha256: Mapped[str | None] = mapped_column(String(64))
    # the accuracy gate's task (agent.contracts.accuracy.TASKS); None: inferred by the build
    task: Mapped[str | None] = mapped_column(String(16))
    # agent.contracts.manifest.Preprocessing as declared at upload; None: none declared
    preprocessing: Mapped[dict[str, Any] | None]
    manifest: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(64))

    model: Mapped[Model] = relationship(back_populates="versions")
    variants: Mapped[list[VariantRow]] = relationship(
        back_populates="version", order_by="VariantRow.id"
    )


class VariantRow(Base):
    """A built variant: its manifest entry (``spec``), verdict and bundle archive digest."""

    __tablename__ = "variants"
    __table_args__ = (UniqueConstraint("version_id", "variant_id", name="uq_variants_variant"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), index=True
    )
    variant_id: Mapped[str] = mapped_column(String(64))
    runtime: Mapped[str] = mapped_column(String(32))
    format: Mapped[str] = mapped_column(String(32))
    precision: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))  # accepted | rejected
    spec: Mapped[dict[str, Any]]
    archive_sha256: Mapped[str | None] = mapped_column(String(64))
    archive_size: Mapped[int | None] = mapped_column(Integer)

    version: Mapped[ModelVersion] = relationship(back_populates="variants")


class BuildJob(Base):
    """A background variant build: status, progress in [0, 1] and its last log lines."""

    __tablename__ = "build_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), index=True
    )
    # queued | running | succeeded | failed
    status: Mapped[str] = mapped_column(String(16), index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    log: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # PostgreSQL job queue (control_plane/jobs.py): who runs it and until when, unless renewed
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Assignment(Base):
    """A model version assigned to one device or to every device matching a label selector."""

    __tablename__ = "assignments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    device_id: Mapped[str | None] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), index=True
    )
    selector: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(64))


class ShadowAssignment(Base):
    """A version one device runs beside its serving one, never answering with it: a rollout's
    shadow stage. Deleted when the stage ends (passed or aborted)."""

    __tablename__ = "shadow_assignments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    rollout_id: Mapped[str] = mapped_column(String(64), index=True)
    sample_share: Mapped[float] = mapped_column(Float)
    max_busy_share: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime]


class Lease(Base):
    """A named role one replica holds until ``expires_at`` unless it renews (the rollout runner)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime]
    acquired_at: Mapped[datetime]
