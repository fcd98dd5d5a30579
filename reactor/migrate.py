"""`reactor migrate`: apply migrations/NNN_*.sql in order, each once.

Each file runs in its own transaction and is recorded, with a checksum, in
`supabase_migrations.schema_migrations` (the table the Supabase CLI uses).
A session advisory lock serialises concurrent runs: the second one waits,
then finds nothing left to do. Before the first migration, pgmq is made to
exist: the extension where the server offers it, else the SQL that the
`pgmq` PyPI package ships.

Exposed on purpose, or not at all: on Supabase every new table and function
of `public` is granted to the API roles by default, and PostgREST publishes
it. So whatever a migration creates (functions, tables, views, sequences,
schemas; not an extension's own objects) is locked down in the migration's
own transaction: PUBLIC, anon and authenticated lose every privilege on it,
and service_role keeps only EXECUTE on the SECURITY DEFINER functions of
`public` (the SQL API) and what it was granted on tables of `public`. A
later migration may still grant on purpose; docs/supabase.md lists what is.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from reactor import queries
from reactor.paths import MIGRATIONS_DIR

__all__ = ["Migration", "MigrationError", "MigrationReport", "load_migrations", "migrate"]

_FILE_RE = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    """A migration cannot be applied; the message says what to do."""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


@dataclass
class MigrationReport:
    applied: list[str] = field(default_factory=list)
    already_applied: int = 0
    pgmq: str = "present"


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migration files of `directory`, in version order."""
    if not directory.is_dir():
        raise MigrationError(f"migrations directory not found: {directory} (set REACTOR_HOME)")
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_RE.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNN_name.sql")
        migrations.append(
            Migration(match.group(1), match.group(2), path.read_text(encoding="utf-8"))
        )
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a version number")
    return migrations


def _check_pg_cron(conn: psycopg.Connection) -> None:
    try:
        row = conn.execute(queries.CRON_DATABASE_NAME).fetchone()
    except psycopg.errors.InsufficientPrivilege as exc:
        # A non-superuser needs pg_read_all_settings (Supabase's `postgres` has it
        # through pg_monitor); migration 030 reads the same setting.
        raise MigrationError(
            f"role {conn.info.user} may not read cron.database_name: run `reactor migrate` "
            "as the database owner after GRANT pg_monitor TO that role "
            "(Supabase's postgres has it)"
        ) from exc
    if row is None or row[0] is None:
        raise MigrationError(
            "pg_cron is not loaded: add shared_preload_libraries = 'pg_cron' and "
            "cron.database_name = '<your database>' to postgresql.conf, then restart Postgres"
        )


def _ensure_pgmq(conn: psycopg.Connection) -> str:
    """Make pgmq exist; return how: present, extension or the bundled SQL version."""
    if conn.execute(queries.PGMQ_INSTALLED).fetchone():
        return "present"
    if conn.execute(queries.PGMQ_EXTENSION_AVAILABLE).fetchone():
        conn.execute("CREATE EXTENSION IF NOT EXISTS pgmq")
        return "extension"
    from pgmq.install import get_embedded_install_sql, get_embedded_sql_version

    with conn.transaction():
        conn.execute(get_embedded_install_sql())
    return f"sql {get_embedded_sql_version()}"


def migrate(database_url: str, directory: Path = MIGRATIONS_DIR) -> MigrationReport:
    """Apply every pending migration; safe to run twice and concurrently.

    Raises:
        MigrationError: pg_cron missing, or an applied file was edited.
        psycopg.Error: the database refused a statement (the migration rolls back).
    """
    migrations = load_migrations(directory)
    report = MigrationReport()
    with psycopg.connect(database_url, autocommit=True, application_name="reactor migrate") as conn:
        _check_pg_cron(conn)
        conn.execute(queries.MIGRATION_LOCK)
        try:
            with conn.transaction():
                conn.execute(queries.CREATE_MIGRATIONS_TABLE)
            report.pgmq = _ensure_pgmq(conn)
            applied: dict[str, str] = dict(conn.execute(queries.APPLIED_MIGRATIONS).fetchall())
            for migration in migrations:
                recorded = applied.get(migration.version)
                if recorded is not None and recorded != migration.checksum:
                    raise MigrationError(
                        f"migrations/{migration.version}_{migration.name}.sql was edited after "
                        "it was applied: restore it and put the change in a new migration"
                    )
            for migration in migrations:
                if migration.version in applied:
                    report.already_applied += 1
                    continue
                with conn.transaction():
                    conn.execute(queries.SNAPSHOT_OBJECTS)
                    conn.execute(migration.sql.encode("utf-8"))
                    # In the same transaction: nothing a migration creates is
                    # ever committed with the API roles' default privileges.
                    conn.execute(queries.LOCK_DOWN_NEW_OBJECTS)
                    conn.execute(
                        queries.RECORD_MIGRATION,
                        (migration.version, migration.name, [migration.sql], migration.checksum),
                    )
                report.applied.append(f"{migration.version}_{migration.name}")
        finally:
            conn.execute(queries.MIGRATION_UNLOCK)
    return report


def pending_migrations(conn: psycopg.Connection, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Migrations not yet applied to the database (`reactor run` refuses to start then)."""
    migrations = load_migrations(directory)
    applied: set[str] = set()
    if conn.execute(queries.MIGRATIONS_TABLE_EXISTS).fetchone():
        applied = {row[0] for row in conn.execute(queries.APPLIED_MIGRATIONS).fetchall()}
    return [f"{m.version}_{m.name}" for m in migrations if m.version not in applied]
