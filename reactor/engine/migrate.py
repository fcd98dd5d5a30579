"""`reactor migrate`: apply the engine's migrations and an app's, in order, each once.

Two lines in one history (River's migration lines): the engine's own
(reactor/engine/migrations: its bookkeeping and the queue registry, recorded
as `engine_NNN`) runs first, then the app's (`NNN`, e.g. the clinic's
top-level migrations/). Last come the repeatable files (`R__name.sql`, as in
Flyway), re-applied whenever they change: they re-assert the engine's SQL API
over whatever an app's history defined under the same names.

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

from reactor.engine import queries

__all__ = ["ENGINE_MIGRATIONS_DIR", "Migration", "MigrationError", "MigrationReport",
           "load_migrations", "migrate", "migration_plan", "pending_migrations"]

_FILE_RE = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.sql$")
_REPEATABLE_RE = re.compile(r"^R__([a-z0-9_]+)\.sql$")
# The engine's line, shipped in the package (the wheel carries it).
ENGINE_MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
ENGINE_LINE = "engine_"


class MigrationError(RuntimeError):
    """A migration cannot be applied; the message says what to do."""


@dataclass(frozen=True)
class Migration:
    version: str  # as recorded: "042" (an app's line) or "engine_001"; "engine_R__x" repeatable
    name: str
    sql: str
    repeatable: bool = False

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


@dataclass
class MigrationReport:
    applied: list[str] = field(default_factory=list)
    already_applied: int = 0
    pgmq: str = "present"


def load_migrations(directory: Path, line: str = "") -> list[Migration]:
    """The migration files of `directory`, versioned in order, then the repeatable ones.

    `line` prefixes the recorded versions (the engine's: "engine_"; an app's: none).
    """
    if not directory.is_dir():
        raise MigrationError(f"migrations directory not found: {directory} (set REACTOR_HOME "
                             "to a folder that has migrations/, or reinstall reactor)")
    versioned, repeatable = [], []
    for path in sorted(directory.glob("*.sql")):
        text = path.read_text(encoding="utf-8")
        if match := _FILE_RE.match(path.name):
            versioned.append(Migration(line + match.group(1), match.group(2), text))
        elif match := _REPEATABLE_RE.match(path.name):
            repeatable.append(Migration(f"{line}R__{match.group(1)}", match.group(1), text,
                                        repeatable=True))
        else:
            raise MigrationError(f"{path.name}: migration files are named NNN_name.sql "
                                 "(or R__name.sql for a repeatable one)")
    versions = [m.version for m in versioned]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a version number")
    return versioned + repeatable


def migration_plan(app_directory: Path) -> list[Migration]:
    """Every migration `reactor migrate` applies for an app, in order: the engine's
    versioned line, the app's, then the repeatable files of both."""
    both = load_migrations(ENGINE_MIGRATIONS_DIR, ENGINE_LINE) + load_migrations(app_directory)
    return [m for m in both if not m.repeatable] + [m for m in both if m.repeatable]


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


def _due(migration: Migration, applied: dict[str, str]) -> bool:
    """Not applied yet; for a repeatable one, also: changed since it was applied."""
    recorded = applied.get(migration.version)
    return recorded is None or (migration.repeatable and recorded != migration.checksum)


def migrate(database_url: str, directory: Path, *, pg_cron: bool = False) -> MigrationReport:
    """Apply every pending migration of the engine and of the app whose migrations are in
    `directory`; safe to run twice and concurrently. pg_cron: the app schedules pg_cron
    jobs, so pg_cron must be loaded (checked first, with the fix in the message).

    Raises:
        MigrationError: pg_cron missing, or an applied file was edited.
        psycopg.Error: the database refused a statement (the migration rolls back).
    """
    migrations = migration_plan(directory)
    report = MigrationReport()
    with psycopg.connect(database_url, autocommit=True, application_name="reactor migrate") as conn:
        if pg_cron:
            _check_pg_cron(conn)
        conn.execute(queries.MIGRATION_LOCK)
        try:
            with conn.transaction():
                conn.execute(queries.CREATE_MIGRATIONS_TABLE)
            report.pgmq = _ensure_pgmq(conn)
            applied: dict[str, str] = dict(conn.execute(queries.APPLIED_MIGRATIONS).fetchall())
            for migration in migrations:
                recorded = applied.get(migration.version)
                if not migration.repeatable and recorded is not None \
                        and recorded != migration.checksum:
                    raise MigrationError(
                        f"migrations/{migration.version}_{migration.name}.sql was edited after "
                        "it was applied: restore it and put the change in a new migration"
                    )
            for migration in migrations:
                if not _due(migration, applied):
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
                report.applied.append(_label(migration))
        finally:
            conn.execute(queries.MIGRATION_UNLOCK)
    return report


def pending_migrations(conn: psycopg.Connection, directory: Path) -> list[str]:
    """Migrations never applied to the database (`reactor run` refuses to start then).

    A repeatable file applied in another version does not count: during a rolling
    deploy or a rollback the database may hold a newer release's, which this release
    must not call "missing" (`reactor migrate` brings it to this release's).
    """
    applied: dict[str, str] = {}
    if conn.execute(queries.MIGRATIONS_TABLE_EXISTS).fetchone():
        applied = dict(conn.execute(queries.APPLIED_MIGRATIONS).fetchall())
    return [_label(m) for m in migration_plan(directory) if m.version not in applied]


def _label(migration: Migration) -> str:
    return migration.version if migration.repeatable else f"{migration.version}_{migration.name}"
