"""Every SQL statement the reactor itself runs, in one place.

Values are always bound parameters. The only identifiers ever composed are
pgmq table names for the reactor's own fixed queue names (see queues.py).
Only pgmq functions that Supabase's pgmq 1.4.4-1.5.1 has are called.
"""

from __future__ import annotations

from typing import LiteralString

from psycopg import sql as _sql

# -- migrations ---------------------------------------------------------------
# Arbitrary but fixed: the key of the session advisory lock `reactor migrate` holds.
MIGRATION_LOCK_KEY = 7_301_944_120_551
MIGRATION_LOCK: LiteralString = f"SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"
MIGRATION_UNLOCK: LiteralString = f"SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"

CRON_DATABASE_NAME: LiteralString = "SELECT current_setting('cron.database_name', true)"
# pgmq.send is overloaded, so to_regproc() cannot be used to find it.
PGMQ_INSTALLED: LiteralString = """
SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'pgmq' AND p.proname = 'send' LIMIT 1
"""
PGMQ_EXTENSION_AVAILABLE: LiteralString = (
    "SELECT 1 FROM pg_available_extensions WHERE name = 'pgmq'"
)

# The Supabase CLI's table (version, statements, name), plus our checksum.
CREATE_MIGRATIONS_TABLE: LiteralString = """
CREATE SCHEMA IF NOT EXISTS supabase_migrations;
CREATE TABLE IF NOT EXISTS supabase_migrations.schema_migrations (
    version text PRIMARY KEY,
    statements text[],
    name text
);
ALTER TABLE supabase_migrations.schema_migrations ADD COLUMN IF NOT EXISTS checksum text;
ALTER TABLE supabase_migrations.schema_migrations
    ADD COLUMN IF NOT EXISTS applied_at timestamptz DEFAULT now();
"""
MIGRATIONS_TABLE_EXISTS: LiteralString = (
    "SELECT 1 WHERE to_regclass('supabase_migrations.schema_migrations') IS NOT NULL"
)
APPLIED_MIGRATIONS: LiteralString = (
    "SELECT version, checksum FROM supabase_migrations.schema_migrations"
)
RECORD_MIGRATION: LiteralString = """
INSERT INTO supabase_migrations.schema_migrations (version, name, statements, checksum)
VALUES (%s, %s, %s, %s)
"""

# -- connections ----------------------------------------------------------------
SESSION_SETUP: LiteralString = "SET statement_timeout = '30s'; SET lock_timeout = '10s'"
LISTEN: LiteralString = "LISTEN reactor_wakeup"
NOTIFY_PROBE: LiteralString = "SELECT pg_notify('reactor_wakeup', %s)"
PING: LiteralString = "SELECT 1"

# -- queues -------------------------------------------------------------------------
# read_ct is pgmq's count of deliveries: the attempt number of this delivery.
READ: LiteralString = """
SELECT msg_id, read_ct, enqueued_at, message
  FROM pgmq.read(%(queue)s, %(vt)s, %(qty)s)
"""
# Archive what finished, then read the next batch: one statement, so one round trip
# and one commit. set_config(..., true) turns synchronous_commit off for this
# statement's own transaction only (see queues.archive_then_read for why that is
# safe). The read is LATERAL on `pre` (the `0 * archived` term) so that Postgres
# archives before it reads; both run in the same snapshot, and the archived
# messages are still invisible, so the read cannot take them again.
ARCHIVE_THEN_READ: LiteralString = """
SELECT r.msg_id, r.read_ct, r.enqueued_at, r.message
  FROM (SELECT set_config('synchronous_commit', 'off', true) AS async_commit,
               (SELECT count(*) FROM pgmq.archive(%(queue)s, %(ids)s::bigint[]))::int
                   AS archived) AS pre,
       LATERAL pgmq.read(%(queue)s, %(vt)s + 0 * pre.archived, %(qty)s) AS r
"""
ARCHIVE_ASYNC: LiteralString = """
SELECT set_config('synchronous_commit', 'off', true),
       (SELECT count(*) FROM pgmq.archive(%(queue)s, %(ids)s::bigint[]))
"""
ARCHIVE_MANY: LiteralString = "SELECT pgmq.archive(%(queue)s, %(ids)s::bigint[])"
# Retry later / release now / extend a lease. One statement for many ids,
# using only the single-message set_vt that pgmq 1.4.4 already has.
SET_VT_MANY: LiteralString = """
SELECT count(*) FROM unnest(%(ids)s::bigint[]) AS id,
       LATERAL pgmq.set_vt(%(queue)s, id, %(vt)s) AS m
"""
SEND: LiteralString = "SELECT pgmq.send(%(queue)s, %(message)s, %(delay)s)"
ENQUEUE: LiteralString = "SELECT public.enqueue(%(queue)s, %(message)s, %(delay)s)"
QUEUE_METRICS: LiteralString = """
SELECT queue_name::text, queue_length, oldest_msg_age_sec, total_messages
  FROM pgmq.metrics_all()
"""
DELETE_MANY: LiteralString = "SELECT pgmq.delete(%(queue)s, %(ids)s::bigint[])"

# -- processors -----------------------------------------------------------------------
INSERT_ANALYTICS_EVENT: LiteralString = """
INSERT INTO public.analytics_events (event, user_id, properties, occurred_at, source_msg_id)
VALUES (%(event)s, %(user_id)s, %(properties)s, coalesce(%(occurred_at)s, now()), %(msg_id)s)
ON CONFLICT (source_msg_id) DO NOTHING
"""

# -- composed per queue (the identifier is one of the reactor's fixed queue tables) --
# Seconds until the next message of a queue becomes visible (None: queue empty).
NEXT_VISIBLE_IN = _sql.SQL(
    "SELECT extract(epoch FROM min(vt) - clock_timestamp())::float8 FROM pgmq.{table}"
)
# Dead letters, read without taking them (pgmq.read would bump read_ct and vt).
PEEK: _sql.SQL = _sql.SQL(
    "SELECT msg_id, read_ct, enqueued_at, message FROM pgmq.{table}"
    " WHERE (%(msg_id)s::bigint IS NULL OR msg_id = %(msg_id)s) ORDER BY msg_id LIMIT %(limit)s"
)

# -- email ---------------------------------------------------------------------------
# Claim a key for sending: a new key, or one whose earlier attempt failed.
# No row back means someone holds it ('sending') or it was sent ('sent').
CLAIM_EMAIL: LiteralString = """
INSERT INTO public.email_ledger (idempotency_key, queue, msg_id, recipient, template, status)
VALUES (%(key)s, %(queue)s, %(msg_id)s, %(recipient)s, %(template)s, 'sending')
ON CONFLICT (idempotency_key) DO UPDATE
   SET status = 'sending', attempts = email_ledger.attempts + 1, msg_id = EXCLUDED.msg_id,
       updated_at = now()
 WHERE email_ledger.status = 'failed'
RETURNING status
"""
EMAIL_SENT: LiteralString = """
UPDATE public.email_ledger SET status = 'sent', message_id = %(message_id)s, sent_at = now(),
       updated_at = now(), last_error = NULL
 WHERE idempotency_key = %(key)s
"""
EMAIL_FAILED: LiteralString = """
UPDATE public.email_ledger SET status = 'failed', last_error = %(error)s, updated_at = now()
 WHERE idempotency_key = %(key)s
"""
EMAIL_LEDGER_ROW: LiteralString = """
SELECT status, updated_at FROM public.email_ledger WHERE idempotency_key = %(key)s
"""
PROFILE_LOCALE_BY_EMAIL: LiteralString = """
SELECT locale FROM public.profiles WHERE lower(email) = lower(%(email)s) LIMIT 1
"""

# -- status (reactor status, dashboard) -------------------------------------------------
STATUS_QUEUE = _sql.SQL("""
SELECT m.queue_length, m.oldest_msg_age_sec,
       (SELECT count(*) FROM pgmq.{archive} WHERE archived_at > now() - interval '1 hour'),
       (SELECT queue_length FROM pgmq.metrics(%(queue)s || '_dlq'))
  FROM pgmq.metrics(%(queue)s) AS m
""")
CRON_PRESENT: LiteralString = "SELECT 1 WHERE to_regclass('cron.job') IS NOT NULL"
STATUS_CRON: LiteralString = """
SELECT j.jobname, j.schedule, j.active, last.start_time, last.status,
       (SELECT count(*) FROM cron.job_run_details d
         WHERE d.jobid = j.jobid AND d.status = 'failed'
           AND d.start_time > now() - interval '1 day')::int
  FROM cron.job j
  LEFT JOIN LATERAL (SELECT d.start_time, d.status FROM cron.job_run_details d
                      WHERE d.jobid = j.jobid ORDER BY d.start_time DESC LIMIT 1) AS last ON true
 ORDER BY j.jobname
"""
RECENT_DEAD_LETTERS = _sql.SQL(
    "SELECT msg_id, enqueued_at, message FROM pgmq.{table} ORDER BY msg_id DESC LIMIT %(limit)s"
)

# -- reports ----------------------------------------------------------------------------
LOAD_CHECKUP: LiteralString = """
SELECT a.status, a.user_id, a.completed_at, a.results, p.email, p.full_name, p.locale
  FROM public.assessments a JOIN public.profiles p ON p.id = a.user_id
 WHERE a.id = %(assessment_id)s
"""
# xmax = 0 tells a fresh insert from an update: only a new report mails the family.
UPSERT_REPORT: LiteralString = """
INSERT INTO public.reports (assessment_id, user_id, path, bytes, sha256, generated_at)
VALUES (%(assessment_id)s, %(user_id)s, %(path)s, %(bytes)s, %(sha256)s, now())
ON CONFLICT (assessment_id) DO UPDATE
   SET path = EXCLUDED.path, bytes = EXCLUDED.bytes, sha256 = EXCLUDED.sha256,
       generated_at = EXCLUDED.generated_at
RETURNING (xmax = 0) AS inserted
"""

# -- payments ---------------------------------------------------------------------------
LOAD_PAYMENT: LiteralString = """
SELECT status, amount, currency, provider, provider_payment_id, created_at
  FROM public.payments WHERE id = %(payment_id)s
"""
# A final status never moves backwards: pending → completed|failed, completed → refunded.
SET_PAYMENT_STATUS: LiteralString = """
UPDATE public.payments SET status = %(status)s, status_reason = %(reason)s
 WHERE id = %(payment_id)s
   AND (status = 'pending' OR (status = 'completed' AND %(status)s = 'refunded'))
RETURNING status
"""
PAYMENT_BY_PROVIDER_ID: LiteralString = """
SELECT id FROM public.payments WHERE provider_payment_id = %(provider_payment_id)s
"""
QUEUE_PAYMENT_VERIFY: LiteralString = (
    "SELECT public.queue_payment_processing(%(payment_id)s, 'verify')")
