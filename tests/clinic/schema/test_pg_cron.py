"""pg_cron itself (030): the jobs in the cron database, and one real scheduled run.

pg_cron lives only in the cluster's `postgres` database (cron.database_name),
so this module migrates that database; the per-test clones never have it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from reactor.clinic.resources import MIGRATIONS_DIR
from reactor.clinic.schema import migrate
from reactor.engine.pgcluster import CRON_DATABASE, PgCluster
from tests import factories as f
from tests.harness import wait_until

EXPECTED_JOBS = {
    "update-appointment-statuses": "*/5 * * * *",
    "cleanup-old-assessments": "0 3 * * *",
    "send-appointment-reminders": "0 * * * *",
    "reactor-housekeeping": "30 3 * * *",
}


@pytest.fixture(scope="module")
def cron_db(pg_cluster: PgCluster) -> Iterator[psycopg.Connection]:
    url = pg_cluster.url(CRON_DATABASE)
    migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        yield conn


def jobs(conn: psycopg.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT jobname, schedule FROM cron.job").fetchall())


def test_jobs_have_the_old_names_and_schedules(cron_db: psycopg.Connection) -> None:
    assert jobs(cron_db) == EXPECTED_JOBS


def test_reapplying_never_duplicates_a_job(cron_db: psycopg.Connection) -> None:
    cron_db.execute((Path(MIGRATIONS_DIR) / "030_setup_cron_jobs.sql").read_text())
    cron_db.execute("SELECT public.schedule_reactor_cron_jobs()")
    assert cron_db.execute("SELECT count(*) FROM cron.job").fetchone() == (len(EXPECTED_JOBS),)


def test_clones_without_pg_cron_still_migrate(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert conn.execute("SELECT to_regnamespace('cron')").fetchone() == (None,)
        assert conn.execute("SELECT public.schedule_reactor_cron_jobs()").fetchone() == (0,)


@pytest.mark.slow
def test_a_scheduled_job_really_runs(cron_db: psycopg.Connection) -> None:
    """Waits for pg_cron's next minute tick (the one test allowed to)."""
    since = f.now(cron_db)
    user = f.profile(cron_db, email="cron@example.com")
    ended = f.appointment(cron_db, user, starts_in=-timedelta(hours=3))
    cron_db.execute("SELECT cron.alter_job(jobid, schedule => '* * * * *') FROM cron.job "
                    "WHERE jobname = 'update-appointment-statuses'")
    try:
        run = wait_until(lambda: cron_db.execute(
            "SELECT d.status, d.return_message FROM cron.job_run_details d "
            "JOIN cron.job j USING (jobid) "
            "WHERE j.jobname = 'update-appointment-statuses' AND d.end_time IS NOT NULL "
            "AND d.start_time > %s", (since,)).fetchone(), within_s=150, every_s=1,
            what="pg_cron to run the job at its next minute tick")
    finally:
        cron_db.execute("SELECT cron.alter_job(jobid, schedule => '*/5 * * * *') FROM cron.job "
                        "WHERE jobname = 'update-appointment-statuses'")
    assert run[0] == "succeeded", run
    assert cron_db.execute("SELECT status FROM public.appointments WHERE id = %s",
                           (ended,)).fetchone() == ("completed",)


def test_status_lists_the_cron_jobs(cron_db: psycopg.Connection) -> None:
    from reactor.engine.status import cron_status

    jobs_ = cron_status(cron_db)
    assert jobs_ is not None
    assert {j.name: j.schedule for j in jobs_} == EXPECTED_JOBS
    assert all(j.active for j in jobs_)
