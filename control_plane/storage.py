"""Where a control-plane instance keeps blobs and signed metadata, chosen from its settings.

Owns the choice only: ``object_store = "local"`` keeps artifacts and the TUF repository under
``data_dir`` (one machine, or replicas that share that directory); ``"s3"`` keeps both in one
bucket (``control_plane.s3``), so replicas keep nothing that matters on their own disks. The
stores themselves live in ``control_plane.artifacts``, ``control_plane.s3`` and
``control_plane.signing``.
"""

from __future__ import annotations

from sqlalchemy import Engine

from agent.logs import get_logger
from control_plane.artifacts import ArtifactStore, LocalArtifactStore
from control_plane.coordination import advisory_lock
from control_plane.s3 import S3ArtifactStore, S3Files, S3Location, s3_client
from control_plane.settings import Settings
from control_plane.signing import TufRepository
from control_plane.signing.publisher import ROOT_KEY_DIR, open_repository

__all__ = ["TUF_LOCK", "artifact_store", "s3_location", "tuf_repository"]

log = get_logger(__name__)

TUF_LOCK = "edgefleet-tuf-publish"  # the advisory lock every replica signs under


def s3_location(settings: Settings) -> S3Location:
    assert settings.s3_bucket is not None  # checked by the settings' validator
    secret = settings.s3_secret_access_key
    return S3Location(
        bucket=settings.s3_bucket,
        prefix=settings.s3_prefix,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        access_key_id=settings.s3_access_key_id,
        secret_access_key=secret.get_secret_value() if secret else None,
        addressing_style=settings.s3_addressing_style,
    )


def artifact_store(settings: Settings) -> ArtifactStore:
    if settings.object_store == "s3":
        return S3ArtifactStore(s3_location(settings))
    return LocalArtifactStore(settings.data_dir / "artifacts")


def tuf_repository(settings: Settings, engine: Engine) -> TufRepository:
    """The service's TUF repository, created with fresh keys on first use (by one replica)."""
    if settings.object_store != "s3":
        return open_repository(settings.data_dir, settings.tuf_root_key_dir)
    location = s3_location(settings)
    client = s3_client(location)
    metadata = S3Files(location, "tuf/metadata", client)
    created = not metadata.exists("timestamp.json")
    root_keys = settings.tuf_root_key_dir or S3Files(location, f"tuf/{ROOT_KEY_DIR}", client)
    repo = TufRepository.init(
        metadata,
        S3Files(location, "tuf/keys", client),
        root_keys,
        lock=lambda: advisory_lock(engine, TUF_LOCK),
    )
    if created:
        log.warning(
            "tuf_repository_created",
            bucket=location.bucket,
            prefix=location.prefix,
            root_key_dir=str(settings.tuf_root_key_dir or f"{location.prefix}tuf/{ROOT_KEY_DIR}/"),
            advice="move the root key offline; provision devices with `edgectl tuf root`",
        )
    return repo
