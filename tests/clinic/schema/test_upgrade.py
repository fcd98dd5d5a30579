"""A database migrated by the last release (f6fa557: the clinic's 001-040, before the
engine had a line of its own) upgrades in place with plain `reactor migrate`: its
data stays, every function works, and its schema is the one a fresh database gets.

That release's migrations are this checkout's 001-040: a migration never changes once
released (`reactor migrate` refuses an applied file whose checksum changed).
"""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

from reactor.clinic.schema import MIGRATIONS_DIR, migrate
from reactor.engine.migrate import pending_migrations
from tests import factories as f
from tests.harness import migrate_like_the_last_release

LAST_RELEASE = "041"  # the first migration the last release did not have

# Everything a migration defines, as the catalog holds it: functions with their
# bodies, settings and grants; tables with their columns; triggers; pgmq queues.
SCHEMA = """
SELECT 'function', p.oid::regprocedure::text,
       md5(pg_get_functiondef(p.oid)) || coalesce(p.proacl::text, '')
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname IN ('public', 'reactor') AND p.prokind IN ('f', 'p')
UNION ALL
SELECT 'column', c.table_schema || '.' || c.table_name || '.' || c.column_name,
       c.data_type || coalesce(c.column_default, '') || c.is_nullable
  FROM information_schema.columns c WHERE c.table_schema IN ('public', 'reactor')
UNION ALL
SELECT 'trigger', tgrelid::regclass::text || '.' || tgname, tgfoid::regprocedure::text
  FROM pg_trigger WHERE NOT tgisinternal
UNION ALL
SELECT 'queue', queue_name, '' FROM pgmq.list_queues()
ORDER BY 1, 2
"""


def test_the_last_releases_database_upgrades_in_place(
        empty_database_url: str, database_url: str, tmp_path: Path) -> None:
    for path in MIGRATIONS_DIR.glob("*.sql"):
        if path.name < LAST_RELEASE:
            shutil.copy(path, tmp_path)
    migrate_like_the_last_release(empty_database_url, tmp_path)
    with psycopg.connect(empty_database_url, autocommit=True) as db:
        user = f.profile(db, email="mama@example.com", full_name="Мария")
        appointment = f.appointment(db, user, starts_in=timedelta(hours=20))
        checkup = f.assessment(db, user, status="completed")
        payment = f.payment(db, user, appointment)
        db.execute("SELECT pgmq.send('email_queue_dlq', %s)",
                   (Jsonb({"original": {"to": "x@example.com"}, "error": "old"}),))
        before = {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()
                  for table in ("public.profiles", "public.appointments", "public.assessments",
                                "public.payments", "pgmq.q_email_queue",
                                "pgmq.q_email_queue_dlq", "pgmq.q_analytics_queue")}
        assert pending_migrations(db, MIGRATIONS_DIR)  # `reactor run` would refuse it

    report = migrate(empty_database_url)

    assert report.applied == ["engine_001_queue_registry", "engine_002_prune_history",
                              "engine_003_dead_letter_actions", "engine_004_queue_waits",
                              "041_enqueue_never_fails_the_app", "042_register_queues",
                              "043_prune_through_the_engine", "044_internationalized_addresses",
                              "045_subject_length",
                              "engine_R__queue_api"]
    with psycopg.connect(empty_database_url, autocommit=True) as db:
        assert pending_migrations(db, MIGRATIONS_DIR) == []
        for table, count in before.items():
            assert db.execute(f"SELECT count(*) FROM {table}").fetchone() == count, table
        # Every queue is the registry's now, and the SQL API works on each.
        assert db.execute("SELECT reactor.queue_names()").fetchone() == (
            ["analytics_queue", "email_queue", "payment_processing_queue",
             "report_generation_queue"],)
        for queue in ("email_queue", "report_generation_queue", "payment_processing_queue",
                      "analytics_queue"):
            db.execute("SELECT public.enqueue(%s, '{}')", (queue,))
            db.execute("SELECT public.pgmq_metrics(%s)", (queue,))
        db.execute("SELECT public.queue_email_task('a@example.com', NULL, 'checkup_completed')")
        db.execute("SELECT public.queue_report_generation(%s, %s)", (checkup, user))
        db.execute("SELECT public.queue_payment_processing(%s)", (payment,))
        db.execute("SELECT public.queue_analytics_event('upgraded', %s)", (user,))
        assert db.execute("SELECT * FROM public.send_appointment_reminders()").fetchone() == (
            1, 0)
        db.execute("SELECT * FROM public.update_appointment_statuses()")
        db.execute("SELECT public.cleanup_old_assessments()")
        db.execute("SELECT public.prune_reactor_history()")
        # The triggers are 041's: a bad address no longer fails the booking.
        bad = f.profile(db, email="not an address")
        f.appointment(db, bad, starts_in=timedelta(days=3))
        upgraded = db.execute(SCHEMA).fetchall()

    with psycopg.connect(database_url) as fresh:  # the template: migrated from nothing
        assert upgraded == fresh.execute(SCHEMA).fetchall()
