"""The control plane's database: typed SQLAlchemy 2 tables, engine set-up and Alembic migrations.

Owns the schema and how a database is opened and upgraded; what rows mean is decided by the
services in ``control_plane`` (registry, devices, desired state).
"""

from control_plane.db.engine import make_engine, make_sessionmaker, upgrade_database
from control_plane.db.models import (
    ApiToken,
    Assignment,
    Base,
    BuildJob,
    Device,
    Model,
    ModelVersion,
    VariantRow,
)

# Tables owned by the ingester and the rollouts register on the same metadata (the migrations
# are checked against it).
from control_plane.ingest import tables as _ingest_tables  # noqa: F401
from control_plane.rollouts import tables as _rollout_tables  # noqa: F401

__all__ = [
    "ApiToken",
    "Assignment",
    "Base",
    "BuildJob",
    "Device",
    "Model",
    "ModelVersion",
    "VariantRow",
    "make_engine",
    "make_sessionmaker",
    "upgrade_database",
]
