"""Settings of the control-plane service, read from ``EDGEFLEET_CP__*`` environment variables.

Built once in the entry point (``edgectl serve`` or a test) and passed down; nothing else reads
the environment. The two secrets have no defaults and refuse placeholder values.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "normalize_database_url"]

_PLACEHOLDERS = frozenset(
    {
        "changeme",
        "change-me",
        "change_me",
        "secret",
        "password",
        "token",
        "admin",
        "example",
        "placeholder",
        "replace-me",
        "todo",
        "xxx",
        "test",
    }
)
MIN_SECRET_LENGTH = 16


def normalize_database_url(url: str) -> str:
    """Plain ``postgresql://`` URLs use psycopg 3 (the driver this project installs)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_CP__", extra="ignore", frozen=True)

    data_dir: Path = Path("edgefleet-data")
    # Default: a SQLite file under data_dir; PostgreSQL: postgresql+psycopg://user@host/db
    database_url: str = ""
    bootstrap_token: SecretStr  # devices present it once to enroll
    # Bounds of the settings' bootstrap token (docs/security.md): how many enrollments it may
    # make in all (None: no bound) and until when (None: no expiry; must carry a zone). It binds
    # no labels: what its devices ask for waits for an operator's approval.
    bootstrap_token_max_uses: int | None = Field(default=None, ge=0)
    bootstrap_token_expires_at: datetime | None = None
    admin_token: SecretStr  # bootstraps the first operator tokens
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    build_workers: int = Field(default=1, ge=1, le=16)
    # seconds: time bound of each accuracy-aware INT8 search (per variant; docs/variants.md)
    build_int8_search_s: float = Field(default=600.0, ge=0)
    max_upload_bytes: int = Field(default=2 * 1024**3, ge=1024)  # bytes, per file
    # Request bounds (docs/security.md), applied before anything is parsed. Bytes.
    max_header_bytes: int = Field(default=16 * 1024, ge=1024)  # the whole header block
    max_json_body_bytes: int = Field(default=1024**2, ge=1024)  # every route but uploads
    max_upload_request_bytes: int = Field(default=4 * 1024**3, ge=1024)  # a whole upload body
    # Upload checks: what a sample set may unpack to, and what constants a model may make.
    max_sample_set_bytes: int = Field(default=256 * 1024**2, ge=1024)  # bytes, per .npz
    max_model_constant_bytes: int = Field(default=256 * 1024**2, ge=1024)  # bytes, per model
    # seconds: how stale another replica's cached desired state may get (this one drops it at once)
    desired_state_cache_ttl_s: float = Field(default=300.0, ge=0)
    # seconds between the coalesced last_seen_at writes of polling devices (docs/control-plane.md);
    # None: a poll does not refresh last_seen_at (only profile and reported-state writes do)
    last_seen_write_s: float | None = Field(default=5.0, gt=0)
    log_level: str = "info"
    # Signed metadata (docs/updates.md): how often roles are checked for re-signing, and where
    # the root key is written at first start (move it offline afterwards).
    tuf_refresh_interval_s: float = Field(default=3600.0, gt=0)
    tuf_root_key_dir: Path | None = None
    # Model deltas (docs/updates.md#deltas): offered when smaller than delta_max_ratio of the full
    # archive; a delta no device needed for delta_keep_s seconds is removed.
    deltas: bool = True
    delta_max_ratio: float = Field(default=0.8, gt=0, le=1)
    delta_keep_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    # Telemetry ingestion and rollouts (docs/rollouts.md). mqtt_host None: no ingester, no commands.
    mqtt_host: str | None = None
    mqtt_port: int = Field(default=1883, ge=1, le=65535)
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = None
    mqtt_tls_ca: Path | None = None
    mqtt_client_id: str = "edgefleet-control-plane"
    mqtt_topic_prefix: str = "edgefleet/v1"
    mqtt_session_expiry_s: int = Field(default=3600, ge=0)  # broker queues events this long
    telemetry_retention_s: float = Field(default=7 * 24 * 3600.0, gt=0)  # time buckets, by age
    telemetry_max_rows: int = Field(default=2_000_000, ge=1000)  # time buckets, by rows
    # seconds: a device's latest-state row is rewritten at most this often (write-behind)
    telemetry_state_write_s: float = Field(default=5.0, ge=0)
    rollout_interval_s: float = Field(default=5.0, gt=0)  # seconds between controller ticks
    rollout_runner: bool = True  # may run the controller here (replicas elect one: below)
    # Several replicas (docs/deployment.md). replica_id: how this process names itself in job
    # leases and the runner's lease row; empty: <hostname>-<pid>-<random>.
    replica_id: str = Field(default="", max_length=64)
    build_lease_s: float = Field(default=60.0, ge=1)  # seconds a build's lease lasts unrenewed
    build_poll_s: float = Field(default=2.0, gt=0)  # seconds between looks for queued builds
    rollout_lease_s: float = Field(default=4.0, ge=1)  # seconds the runner's lease lasts
    # MQTT 5 shared subscription group for telemetry and events; None: every replica gets all
    mqtt_shared_group: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # Where artifacts, bundles and TUF metadata live: a local directory or an S3-compatible store
    object_store: Literal["local", "s3"] = "local"
    s3_bucket: str | None = None
    s3_prefix: str = ""  # every key starts with it, e.g. "edgefleet/"
    s3_endpoint_url: str | None = None  # None: AWS; MinIO, Ceph RGW: their URL
    s3_region: str | None = None
    s3_access_key_id: str | None = None  # None (both): boto3's default credential chain
    s3_secret_access_key: SecretStr | None = None
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"

    @field_validator("bootstrap_token", "admin_token")
    @classmethod
    def _not_placeholder(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
        if raw.strip().lower() in _PLACEHOLDERS:
            raise ValueError(
                "is a placeholder; generate one: python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'"
            )
        if len(raw) < MIN_SECRET_LENGTH:
            raise ValueError(f"must be at least {MIN_SECRET_LENGTH} characters")
        return value

    @field_validator("bootstrap_token_expires_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("needs a time zone, e.g. 2030-01-01T00:00:00Z")
        return value

    @model_validator(mode="after")
    def _distinct_secrets(self) -> Settings:
        if self.bootstrap_token.get_secret_value() == self.admin_token.get_secret_value():
            raise ValueError("bootstrap_token and admin_token must differ")
        return self

    @model_validator(mode="after")
    def _s3_complete(self) -> Settings:
        if self.object_store == "s3" and not self.s3_bucket:
            raise ValueError("object_store 's3' needs s3_bucket")
        if self.s3_prefix and not self.s3_prefix.endswith("/"):
            raise ValueError("s3_prefix must end with '/'")
        return self

    def resolved_database_url(self) -> str:
        if self.database_url:
            return normalize_database_url(self.database_url)
        return f"sqlite:///{(self.data_dir / 'control-plane.db').resolve()}"
