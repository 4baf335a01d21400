"""Alembic migrations of the control-plane schema (run at start by ``upgrade_database``)."""
