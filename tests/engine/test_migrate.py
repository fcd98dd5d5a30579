"""`reactor migrate`: in order, once, under a lock, checksummed; pgmq and pg_cron checks."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from pathlib import Path

import psycopg
import pytest

from reactor.clinic.resources import MIGRATIONS_DIR
from reactor.clinic.schema import MigrationError, migrate, migration_plan
from reactor.testing import start_on_a_free_port, throwaway_cluster
from tests.harness import reactor_command

SCHEMA_FINGERPRINT = """
SELECT (SELECT count(*) FROM pg_proc WHERE pronamespace = 'public'::regnamespace),
       (SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal),
       (SELECT count(*) FROM pg_class WHERE relnamespace IN
            ('public'::regnamespace, 'pgmq'::regnamespace)),
       (SELECT count(*) FROM pgmq.meta),
       (SELECT count(*) FROM supabase_migrations.schema_migrations)
"""


def test_fresh_database_gets_pgmq_and_every_migration(empty_database_url: str) -> None:
    report = migrate(empty_database_url)
    assert report.pgmq.startswith("sql ")  # no pgmq extension here: the PyPI package's SQL
    plan = migration_plan()
    # The engine's line first, then the clinic's, then the repeatable files.
    assert report.applied[0] == "engine_001_queue_registry"
    assert report.applied[-1] == "engine_R__queue_api"
    assert report.applied == [m.version if m.repeatable else f"{m.version}_{m.name}"
                              for m in plan]
    with psycopg.connect(empty_database_url) as conn:
        rows = conn.execute(
            "SELECT version, checksum FROM supabase_migrations.schema_migrations ORDER BY 1"
        ).fetchall()
    assert sorted((r[0], r[1]) for r in rows) == sorted((m.version, m.checksum) for m in plan)


def test_second_run_changes_nothing(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        before = conn.execute(SCHEMA_FINGERPRINT).fetchone()
    report = migrate(database_url)
    assert report.applied == []
    assert report.pgmq == "present"
    assert report.already_applied == len(migration_plan())
    with psycopg.connect(database_url) as conn:
        assert conn.execute(SCHEMA_FINGERPRINT).fetchone() == before


def test_two_concurrent_runs_both_succeed(empty_database_url: str) -> None:
    results: list[object] = []

    def run() -> None:
        try:
            results.append(migrate(empty_database_url))
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not [r for r in results if isinstance(r, Exception)], results
    applied = sorted(len(r.applied) for r in results)  # type: ignore[attr-defined]
    assert applied == [0, len(migration_plan())]  # one did the work, the other waited
    with psycopg.connect(empty_database_url) as conn:
        row = conn.execute("SELECT count(*) FROM supabase_migrations.schema_migrations").fetchone()
    assert row == (len(migration_plan()),)


def test_edited_migration_is_refused(empty_database_url: str, tmp_path: Path) -> None:
    migrations = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, migrations)
    migrate(empty_database_url, migrations)
    edited = migrations / "031_setup_queues.sql"
    edited.write_text(edited.read_text() + "\n-- a change\n")
    with pytest.raises(MigrationError, match=r"031_setup_queues\.sql was edited after it"):
        migrate(empty_database_url, migrations)


def test_new_migration_is_applied_once(database_url: str, tmp_path: Path) -> None:
    migrations = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, migrations)
    (migrations / "900_extra.sql").write_text("CREATE TABLE public.extra (id int);")
    assert migrate(database_url, migrations).applied == ["900_extra"]
    assert migrate(database_url, migrations).applied == []


def test_failing_migration_rolls_back_whole_file(database_url: str, tmp_path: Path) -> None:
    migrations = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, migrations)
    (migrations / "900_bad.sql").write_text(
        "CREATE TABLE public.half_done (id int);\nSELECT no_such_function();")
    with pytest.raises(psycopg.errors.UndefinedFunction):
        migrate(database_url, migrations)
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT to_regclass('public.half_done')").fetchone() == (None,)
        assert conn.execute("SELECT 1 FROM supabase_migrations.schema_migrations "
                            "WHERE version = '900'").fetchone() is None


@pytest.mark.process
def test_cli_refuses_without_pg_cron_in_one_line() -> None:
    cluster = throwaway_cluster("reactor-test-nocron-", pg_cron=False)
    start_on_a_free_port(cluster)
    try:
        result = reactor_command("migrate", DATABASE_URL=cluster.url())
    finally:
        cluster.remove()
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "shared_preload_libraries = 'pg_cron'" in lines[0]


@pytest.mark.process
def test_cli_migrate_reports_and_is_idempotent(empty_database_url: str) -> None:
    def run() -> subprocess.CompletedProcess[str]:
        return reactor_command("migrate", DATABASE_URL=empty_database_url)

    first = run()
    assert first.returncode == 0, first.stderr
    assert "applied 031_setup_queues" in first.stdout
    second = run()
    assert second.returncode == 0, second.stderr
    assert "0 applied" in second.stdout


@pytest.mark.process
def test_cli_unreachable_database_is_one_line() -> None:
    with socket.socket() as closed:  # bound, never listened on: connections are refused
        closed.bind(("127.0.0.1", 0))
        url = f"postgresql://postgres@127.0.0.1:{closed.getsockname()[1]}/postgres"
        result = reactor_command("migrate", DATABASE_URL=url)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "cannot reach the database" in result.stderr
    assert "DATABASE_URL" in result.stderr
