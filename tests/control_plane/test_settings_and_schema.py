"""Settings validation and the migrations matching the models, on both databases."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from pydantic import ValidationError
from sqlalchemy import inspect

from control_plane.db import Base, make_engine, upgrade_database
from control_plane.db.engine import alembic_config
from control_plane.settings import Settings

GOOD_A = "a-long-random-admin-token-000000"
GOOD_B = "a-long-random-bootstrap-token-00"


@pytest.mark.parametrize(
    ("admin", "bootstrap", "words"),
    [
        ("changeme", GOOD_B, "placeholder"),
        (GOOD_A, "CHANGEME", "placeholder"),
        ("short", GOOD_B, "at least 16"),
        (GOOD_A, GOOD_A, "must differ"),
    ],
)
def test_secrets_refuse_placeholders(admin: str, bootstrap: str, words: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(admin_token=admin, bootstrap_token=bootstrap)
    assert words in str(info.value)


def test_secrets_are_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEFLEET_CP__ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("EDGEFLEET_CP__BOOTSTRAP_TOKEN", GOOD_B)
    with pytest.raises(ValidationError, match="admin_token"):
        Settings()  # type: ignore[call-arg]


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGEFLEET_CP__ADMIN_TOKEN", GOOD_A)
    monkeypatch.setenv("EDGEFLEET_CP__BOOTSTRAP_TOKEN", GOOD_B)
    monkeypatch.setenv("EDGEFLEET_CP__DATA_DIR", str(tmp_path))
    settings = Settings()  # type: ignore[call-arg]
    assert settings.resolved_database_url() == f"sqlite:///{tmp_path.resolve()}/control-plane.db"
    monkeypatch.setenv("EDGEFLEET_CP__DATABASE_URL", "postgresql://u@db:5432/fleet")
    assert Settings().resolved_database_url() == "postgresql+psycopg://u@db:5432/fleet"  # type: ignore[call-arg]
    assert GOOD_A not in repr(Settings())  # type: ignore[call-arg]


def test_migrations_match_models_and_downgrade(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade_database(engine)
        upgrade_database(engine)  # idempotent at every start
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        cfg = alembic_config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
