"""The clinic's schema: the engine's migration runner over the clinic's migrations
(the top-level `migrations/` folder, or the wheel's copy: reactor.clinic.resources)."""

from __future__ import annotations

from pathlib import Path

import psycopg

from reactor.clinic.resources import MIGRATIONS_DIR
from reactor.engine import migrate as _runner
from reactor.engine.migrate import Migration, MigrationError, MigrationReport

__all__ = ["MIGRATIONS_DIR", "Migration", "MigrationError", "MigrationReport",
           "load_migrations", "migrate", "migration_plan", "pending_migrations"]


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The clinic's own line."""
    return _runner.load_migrations(directory)


def migration_plan(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The engine's line, the clinic's, then the repeatable files: what migrate applies."""
    return _runner.migration_plan(directory)


def migrate(database_url: str, directory: Path = MIGRATIONS_DIR) -> MigrationReport:
    """The clinic schedules pg_cron jobs (030): pg_cron must be loaded."""
    return _runner.migrate(database_url, directory, pg_cron=True)


def pending_migrations(conn: psycopg.Connection, directory: Path = MIGRATIONS_DIR) -> list[str]:
    return _runner.pending_migrations(conn, directory)
