"""Every SQL statement the engine itself runs, in one place.

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
# A repeatable migration is recorded again each time it is re-applied.
RECORD_MIGRATION: LiteralString = """
INSERT INTO supabase_migrations.schema_migrations (version, name, statements, checksum)
VALUES (%s, %s, %s, %s)
ON CONFLICT (version) DO UPDATE SET statements = EXCLUDED.statements,
    checksum = EXCLUDED.checksum, applied_at = now()
"""

# -- connections ----------------------------------------------------------------
LISTEN: LiteralString = "LISTEN reactor_wakeup"
NOTIFY_PROBE: LiteralString = "SELECT pg_notify('reactor_wakeup', %s)"
PING: LiteralString = "SELECT 1"

# -- queues -------------------------------------------------------------------------
# Every query that takes messages returns, per message: msg_id, read_ct (pgmq's count
# of deliveries: the attempt number of this one), enqueued_at, the body as TEXT (NULL
# when it is over %(max_bytes)s: never sent to us), its size in bytes, and how many of
# its earlier deliveries ended with an outcome the reactor recorded (reactor.job_failures:
# a retry or a release). The body is decoded message by message in Python (queues.py),
# so one malformed, enormous or absurdly nested body can never take down a batch.
_TAKEN_COLUMNS = """
SELECT r.msg_id, r.read_ct, r.enqueued_at,
       CASE WHEN octet_length(r.body) <= %(max_bytes)s THEN r.body END,
       octet_length(r.body), coalesce(f.outcomes, 0)
"""
_FAILURES_JOIN = """
  LEFT JOIN reactor.job_failures f
         ON f.queue = %(queue)s AND f.msg_id = r.msg_id AND f.enqueued_at = r.enqueued_at
"""
READ: LiteralString = _TAKEN_COLUMNS + """
  FROM (SELECT m.msg_id, m.read_ct, m.enqueued_at, m.message::text AS body
          FROM pgmq.read(%(queue)s, %(vt)s, %(qty)s) AS m) AS r
""" + _FAILURES_JOIN
# pgmq.read's own UPDATE of the messages a `next` CTE chose (both takes below), as a
# join (TAKE: pgmq.read's form) or by an id list (TAKE_ONLY: see there).
_TAKE_SET = """), r AS (
    UPDATE pgmq.{table} AS m
       SET vt = clock_timestamp() + make_interval(secs => %(vt)s),
           read_ct = m.read_ct + 1{last_read}"""
_TAKE_RETURNING = """
    RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.message::text AS body
)"""
# The drainers' hot statement: archive what finished, then take the next batch, in one
# round trip and one commit. set_config(..., true) turns synchronous_commit off for
# this statement's own transaction only (see queues.archive_then_read for why that is
# safe). Archiving goes through pgmq.archive (the archive table's layout differs
# between pgmq versions), and only when there is something to archive (an InitPlan in
# a CASE branch runs only when the branch is taken); the take is pgmq.read's own
# UPDATE, issued directly on the queue's table `{table}`: pgmq.read builds the same
# statement with format() and EXECUTEs it, planned afresh at every call, which costs
# twice the statement itself (0.8 vs 0.4 ms here, and this is what a wake-up waits
# for). `{last_read}` is empty, or sets last_read_at where the queue's table has it
# (pgmq >= 1.8 does, Supabase's 1.4.4-1.5.x does not). The archived ids are excluded
# from the take, so a message whose lease ran out while it ran is not taken again in
# the same statement that archives it. The take is LATERAL on `pre` (the
# `pre.async_commit IS NOT NULL` term): `pre` is evaluated first, once, whatever the
# planner estimates; joined as a plain FROM item, a plan that scans the (empty) take
# first never executes `pre`, and the archive with it.
TAKE: LiteralString = """
WITH pre AS (
    SELECT set_config('synchronous_commit', 'off', true) AS async_commit,
           CASE WHEN cardinality(%(ids)s::bigint[]) > 0
                THEN (SELECT count(*) FROM pgmq.archive(%(queue)s, %(ids)s::bigint[]))
           END AS archived
), next AS (
    SELECT t.msg_id FROM pre, LATERAL (
        SELECT q.msg_id FROM pgmq.{table} AS q
         WHERE q.vt <= clock_timestamp() AND q.msg_id <> ALL(%(ids)s::bigint[])
           AND pre.async_commit IS NOT NULL
         ORDER BY q.msg_id LIMIT %(qty)s FOR UPDATE SKIP LOCKED) AS t
""" + _TAKE_SET + """
      FROM next
     WHERE m.msg_id = next.msg_id""" + _TAKE_RETURNING + _TAKEN_COLUMNS + """
  FROM r""" + _FAILURES_JOIN
# The same take when nothing finished (a wake-up after an idle spell): no archive to
# order first, so no `pre`, and the failure count as a subquery per taken row instead
# of a hash join: a third less to plan and run (0.45 vs 0.75 ms here, on every wake-up).
# set_config runs for each visible message the scan meets, before FOR UPDATE locks it
# (the CASE: only once the row is known visible; as a plain AND term the planner puts
# it first, and a scan past 2,000 in-flight rows took twice as long): the commit of a
# take that locked anything does not wait for the WAL flush either, and a take whose
# scan met nothing has nothing to commit. Per taken row (in the select list) would not
# do: a take can lock a row and return none, when another replica's take of that
# message commits between this statement's snapshot and its scan reaching it (FOR
# UPDATE then locks the new version, the recheck drops it, the lock stays: a
# transaction id to commit, durably). A one-time filter would cost an InitPlan on every
# take (+10-20 us here). The seventh column (the setting in force: off) is ignored.
# A wake-up runs it as a server-side prepared statement with every value bound in
# (queues.Take.wake, Database.fetch_prepared), so Postgres plans it once: its UPDATE
# finds the taken rows by an id list, so that one plan uses the primary key whatever
# size the table had when it was made (as a join, a plan made on an empty table hashes
# a sequential scan of it, and keeps doing so while the table grows).
TAKE_ONLY: LiteralString = """
WITH next AS (
    SELECT q.msg_id FROM pgmq.{table} AS q
     WHERE CASE WHEN q.vt <= clock_timestamp()
                THEN set_config('synchronous_commit', 'off', true) IS NOT NULL END
     ORDER BY q.msg_id LIMIT %(qty)s FOR UPDATE SKIP LOCKED
""" + _TAKE_SET + """
     WHERE m.msg_id = ANY (ARRAY(SELECT msg_id FROM next))""" + _TAKE_RETURNING + """
SELECT r.msg_id, r.read_ct, r.enqueued_at,
       CASE WHEN octet_length(r.body) <= %(max_bytes)s THEN r.body END,
       octet_length(r.body),
       coalesce((SELECT f.outcomes FROM reactor.job_failures f
                  WHERE f.queue = %(queue)s AND f.msg_id = r.msg_id
                    AND f.enqueued_at = r.enqueued_at), 0),
       current_setting('synchronous_commit')
  FROM r
"""
TAKE_SETS_LAST_READ: LiteralString = ",\n           last_read_at = clock_timestamp()"
# Does the queue's table have pgmq's last_read_at column? (%(table)s: 'pgmq.q_<queue>')
HAS_LAST_READ_AT: LiteralString = """
SELECT EXISTS (SELECT 1 FROM pg_attribute
                WHERE attrelid = to_regclass(%(table)s) AND attname = 'last_read_at'
                  AND NOT attisdropped)
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
# Failed (or released at shutdown) deliveries: each message becomes visible again after
# its own delay, and its outcome is counted in reactor.job_failures, in one statement.
# A NULL error is a release, not a failure: it keeps the last failure's reason.
# A row left by an earlier message with the same msg_id (a queue dropped and
# recreated) is recognised by enqueued_at and started afresh.
RECORD_OUTCOMES: LiteralString = """
WITH r AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(delays)s::int[], %(attempts)s::int[],
                         %(errors)s::text[], %(enqueued)s::timestamptz[])
                  AS t(msg_id, delay, attempt, error, enqueued_at)
), counted AS (
    INSERT INTO reactor.job_failures AS f
           (queue, msg_id, enqueued_at, outcomes, last_attempt, last_error)
    SELECT %(queue)s, msg_id, enqueued_at, 1, attempt, error FROM r
    ON CONFLICT (queue, msg_id) DO UPDATE SET
        outcomes = CASE WHEN f.enqueued_at = EXCLUDED.enqueued_at THEN f.outcomes + 1 ELSE 1 END,
        last_attempt = CASE WHEN EXCLUDED.last_error IS NULL
                             AND f.enqueued_at = EXCLUDED.enqueued_at
                            THEN f.last_attempt ELSE EXCLUDED.last_attempt END,
        last_error = CASE WHEN EXCLUDED.last_error IS NULL
                           AND f.enqueued_at = EXCLUDED.enqueued_at
                          THEN f.last_error ELSE EXCLUDED.last_error END,
        enqueued_at = EXCLUDED.enqueued_at, dead_lettered = false, updated_at = now()
    RETURNING 1
)
SELECT (SELECT count(*) FROM counted), count(*)
  FROM r, LATERAL pgmq.set_vt(%(queue)s, r.msg_id, r.delay) AS m
"""
SEND: LiteralString = "SELECT pgmq.send(%(queue)s, %(message)s, %(delay)s)"
ENQUEUE: LiteralString = "SELECT public.enqueue(%(queue)s, %(message)s, %(delay)s)"
QUEUE_METRICS: LiteralString = """
SELECT queue_name::text, queue_length, oldest_msg_age_sec, total_messages
  FROM pgmq.metrics_all()
"""
DELETE_MANY: LiteralString = "SELECT pgmq.delete(%(queue)s, %(ids)s::bigint[])"

# -- composed per queue (the identifier is one of the reactor's fixed queue tables) --
# Seconds until the next message of a queue becomes visible (None: queue empty).
NEXT_VISIBLE_IN = _sql.SQL(
    "SELECT extract(epoch FROM min(vt) - clock_timestamp())::float8 FROM pgmq.{table}"
)
# Dead-letter one message: its body is copied into `<queue>_dlq` by the server (it never
# travels through Python: it may be undecodable), the reason recorded, the original
# archived; one statement, so atomic. An undecodable body is kept as the first 2,000
# characters of its text under "original_text" ("original" is then null). `stamp` is
# merged into the original: what the processor needs a replay to keep (the email
# ledger key of a mail queued without one, so a replay is the same mail).
DEAD_LETTER = _sql.SQL("""
WITH letter AS (
    SELECT pgmq.send(%(dlq)s,
               jsonb_build_object(
                   'original', CASE WHEN %(decodable)s THEN q.message || %(stamp)s END,
                   'error', %(error)s::text, 'attempts', %(attempts)s::int,
                   'failed_at', now(), 'source_msg_id', q.msg_id, 'queue', %(queue)s::text)
               || CASE WHEN %(decodable)s THEN '{{}}'::jsonb
                       ELSE jsonb_build_object('original_text', left(q.message::text, 2000)) END,
               0) AS dlq_msg_id,
           q.msg_id, q.enqueued_at
      FROM pgmq.{table} q WHERE q.msg_id = %(msg_id)s
), recorded AS (
    INSERT INTO reactor.job_failures AS f
           (queue, msg_id, enqueued_at, outcomes, last_attempt, last_error, dead_lettered)
    SELECT %(queue)s, msg_id, enqueued_at, 1, %(attempts)s, %(error)s, true FROM letter
    ON CONFLICT (queue, msg_id) DO UPDATE SET
        outcomes = CASE WHEN f.enqueued_at = EXCLUDED.enqueued_at THEN f.outcomes + 1 ELSE 1 END,
        enqueued_at = EXCLUDED.enqueued_at, last_attempt = EXCLUDED.last_attempt,
        last_error = EXCLUDED.last_error, dead_lettered = true, updated_at = now()
    RETURNING 1
)
SELECT letter.dlq_msg_id, pgmq.archive(%(queue)s, letter.msg_id), (SELECT count(*) FROM recorded)
  FROM letter
""")
# "Not yet" (a payment still pending at the provider): the same body goes back on the
# queue as a new message after the delay, and the original is archived, in one
# statement. pgmq's read_ct starts again, so polling never looks like a crash loop.
# `stamp` (an object, usually empty) is merged into the body: see errors.RetryLater.
REQUEUE = _sql.SQL("""
SELECT pgmq.send(%(queue)s, q.message || %(stamp)s, %(delay)s), pgmq.archive(%(queue)s, q.msg_id)
  FROM pgmq.{table} q WHERE q.msg_id = %(msg_id)s
""")
# A deferral (errors.Deferred): the same, but the original is deleted, not archived: it
# is not done, and the archive is what `reactor status` and the dashboard count as done.
DEFER = _sql.SQL("""
SELECT pgmq.send(%(queue)s, q.message || %(stamp)s, %(delay)s), pgmq.delete(%(queue)s, q.msg_id)
  FROM pgmq.{table} q WHERE q.msg_id = %(msg_id)s
""")
# Dead letters, read without taking them (pgmq.read would bump read_ct and vt).
PEEK: _sql.SQL = _sql.SQL(
    "SELECT msg_id, read_ct, enqueued_at, message FROM pgmq.{table}"
    " WHERE (%(msg_id)s::bigint IS NULL OR msg_id = %(msg_id)s) ORDER BY msg_id LIMIT %(limit)s"
)

# == dead letters handled by people (owner: dead_letters.py; the dashboard and `reactor
# dlq` share it) ===========================================================================
# The dead letters of one `<queue>_dlq` that a filter selects, oldest first: by dead-letter
# ids, by original message id (`source_msg_id`), and/or by a piece of the reason
# (case-insensitive, matched as plain text: strpos, never a pattern).
SELECT_DEAD_LETTERS = _sql.SQL("""
SELECT msg_id, enqueued_at, message, message::text
  FROM pgmq.{table}
 WHERE (%(dlq_ids)s::bigint[] IS NULL OR msg_id = ANY (%(dlq_ids)s::bigint[]))
   AND (%(msg_id)s::bigint IS NULL
        OR (jsonb_typeof(message -> 'source_msg_id') = 'number'
            AND (message ->> 'source_msg_id')::bigint = %(msg_id)s))
   AND (%(reason)s::text IS NULL
        OR strpos(lower(coalesce(message ->> 'error', '')), lower(%(reason)s)) > 0)
 ORDER BY msg_id
 LIMIT %(limit)s
""")
# How many dead letters that filter selects in all (the panel says "20 of 345").
COUNT_DEAD_LETTERS = _sql.SQL("""
SELECT count(*) FROM pgmq.{table}
 WHERE (%(reason)s::text IS NULL
        OR strpos(lower(coalesce(message ->> 'error', '')), lower(%(reason)s)) > 0)
""")
# Take one dead letter out of `<queue>_dlq` into its archive; false when it is no longer
# there (another replay or discard took it first: the row lock makes the second wait,
# then find nothing).
ARCHIVE_ONE: LiteralString = "SELECT pgmq.archive(%(queue)s, %(msg_id)s::bigint)"
DELETE_ONE: LiteralString = "SELECT pgmq.delete(%(queue)s, %(msg_id)s::bigint)"
RECORD_DEAD_LETTER_ACTION: LiteralString = """
INSERT INTO reactor.dead_letter_actions
       (action, queue, dlq_ids, msg_ids, new_msg_ids, filter, client, note)
VALUES (%(action)s, %(queue)s, %(dlq_ids)s::bigint[], %(msg_ids)s::bigint[],
        %(new_msg_ids)s::bigint[], %(filter)s, %(client)s, %(note)s)
RETURNING id, at
"""
DEAD_LETTER_ACTIONS: LiteralString = """
SELECT id, at, action, queue, dlq_ids, msg_ids, new_msg_ids, filter, client, note
  FROM reactor.dead_letter_actions
 WHERE (%(queue)s::text IS NULL OR queue = %(queue)s)
 ORDER BY id DESC LIMIT %(limit)s
"""

# == wait times (owner: waits.py) ==========================================================
# Add one minute's bucket counts of one queue to what is there (replicas share the row).
RECORD_WAITS: LiteralString = """
INSERT INTO reactor.queue_waits AS w (queue, minute, counts)
VALUES (%(queue)s, to_timestamp(%(minute)s), %(counts)s::int[])
ON CONFLICT (queue, minute) DO UPDATE SET counts = (
    SELECT array_agg(coalesce(a, 0) + coalesce(b, 0) ORDER BY i)
      FROM unnest(w.counts, EXCLUDED.counts) WITH ORDINALITY AS t(a, b, i))
"""
PRUNE_WAITS: LiteralString = (
    "DELETE FROM reactor.queue_waits WHERE minute < now() - interval '1 day'"
)
# Every queue's bucket counts over the window, one row per queue and minute.
RECENT_WAITS: LiteralString = """
SELECT queue, counts FROM reactor.queue_waits
 WHERE minute > now() - make_interval(secs => %(window_s)s)
"""
# The age of the oldest message that is visible (waiting to be taken, not in flight or
# waiting for its retry): the queue's backlog as families feel it. By msg_id, so a long
# queue is not scanned: the first visible one is near the start.
OLDEST_VISIBLE_AGE = _sql.SQL("""
SELECT extract(epoch FROM clock_timestamp() - enqueued_at)::float8 FROM pgmq.{table}
 WHERE vt <= clock_timestamp() ORDER BY msg_id LIMIT 1
""")

# -- status (reactor status, dashboard) -------------------------------------------------
# The work queues the app's migrations registered.
# A registered queue whose pgmq tables were dropped by hand is left out (the drainer
# reports it on /healthz): the others are still shown.
QUEUE_NAMES: LiteralString = """
SELECT n FROM unnest(reactor.queue_names()) AS n
 WHERE to_regclass(format('pgmq.%I', 'q_' || n)) IS NOT NULL
   AND to_regclass(format('pgmq.%I', 'a_' || n)) IS NOT NULL
   AND to_regclass(format('pgmq.%I', 'q_' || n || '_dlq')) IS NOT NULL
   AND to_regclass(format('pgmq.%I', 'a_' || n || '_dlq')) IS NOT NULL
 ORDER BY 1
"""
# The queues an app declares that the registry lacks (`reactor run` refuses to start).
UNREGISTERED_QUEUES: LiteralString = """
SELECT n FROM unnest(%(names)s::text[]) AS n
 WHERE NOT n = ANY (reactor.queue_names()) ORDER BY 1
"""
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

# == issue 12: history for `reactor status` and the dashboard (owner: status.py) =========
# Dead letters of one queue, by original msg_id, with when they died: pending and
# replayed dead letters (their `source_msg_id`) and reactor.job_failures (which also
# remembers purged ones). Dead-lettering archives the original too, so "finished"
# is the archive minus these.
_DEAD_CTE: LiteralString = """
WITH dead AS (
    SELECT d.msg_id, min(d.at) AS at FROM (
        SELECT CASE WHEN jsonb_typeof(message -> 'source_msg_id') = 'number'
                    THEN (message ->> 'source_msg_id')::bigint END AS msg_id, enqueued_at AS at
          FROM pgmq.{dlq}
        UNION ALL
        SELECT CASE WHEN jsonb_typeof(message -> 'source_msg_id') = 'number'
                    THEN (message ->> 'source_msg_id')::bigint END, enqueued_at
          FROM pgmq.{dlq_archive}
        UNION ALL
        SELECT msg_id, updated_at FROM reactor.job_failures
         WHERE queue = %(queue)s AND dead_lettered
    ) AS d WHERE d.msg_id IS NOT NULL GROUP BY d.msg_id
)
"""
# One queue: depth, oldest age, retrying now (failed at least once, still queued),
# finished and dead-lettered over 1 h and 24 h, dead letters waiting in <queue>_dlq,
# and finished per bucket (epoch seconds of the bucket start → count) over the window.
HISTORY_QUEUE = _sql.SQL(_DEAD_CTE + """
, finished AS (
    SELECT a.archived_at FROM pgmq.{archive} a
     WHERE a.archived_at > now() - greatest(interval '24 hours',
                                            make_interval(secs => %(window_s)s))
       AND NOT EXISTS (SELECT 1 FROM dead WHERE dead.msg_id = a.msg_id)
)
SELECT m.queue_length, m.oldest_msg_age_sec,
       (SELECT count(*) FROM reactor.job_failures f
          JOIN pgmq.{table} q ON q.msg_id = f.msg_id AND q.enqueued_at = f.enqueued_at
         WHERE f.queue = %(queue)s AND NOT f.dead_lettered AND f.last_error IS NOT NULL),
       (SELECT count(*) FROM finished WHERE archived_at > now() - interval '1 hour'),
       (SELECT count(*) FROM finished WHERE archived_at > now() - interval '24 hours'),
       (SELECT count(*) FROM dead WHERE at > now() - interval '1 hour'),
       (SELECT count(*) FROM dead WHERE at > now() - interval '24 hours'),
       (SELECT count(*) FROM pgmq.{dlq}),
       (SELECT coalesce(jsonb_object_agg(b.bucket, b.n), '{{}}'::jsonb) FROM (
            SELECT (floor(extract(epoch FROM archived_at) / %(bucket_s)s)
                    * %(bucket_s)s)::bigint AS bucket, count(*) AS n
              FROM finished WHERE archived_at > now() - make_interval(secs => %(window_s)s)
             GROUP BY 1) AS b)
  FROM pgmq.metrics(%(queue)s) AS m
""")
# The latest failures of every queue (retries and dead letters), newest first; rows
# of messages only released at shutdown (no error) are not failures.
RECENT_FAILURES: LiteralString = """
SELECT queue, msg_id, last_attempt, last_error, dead_lettered, updated_at
  FROM reactor.job_failures
 WHERE last_error IS NOT NULL
 ORDER BY updated_at DESC LIMIT %(limit)s
"""


# -- API surface lock-down (reactor/migrate.py, migration 040, docs/supabase.md) ---------
# What exists before a migration runs, so that what it creates can be told apart
# (temporary, dropped at the migration's COMMIT).
SNAPSHOT_OBJECTS: LiteralString = """
CREATE TEMPORARY TABLE reactor_migrate_before ON COMMIT DROP AS
SELECT 'pg_proc'::regclass AS classid, oid AS objid FROM pg_catalog.pg_proc
UNION ALL SELECT 'pg_class'::regclass, oid FROM pg_catalog.pg_class
UNION ALL SELECT 'pg_namespace'::regclass, oid FROM pg_catalog.pg_namespace
"""
# Every function, table, view, sequence and schema the migration created (not
# an extension's member) loses every privilege of PUBLIC, anon and
# authenticated; service_role keeps EXECUTE on the SECURITY DEFINER functions
# of `public` (the SQL API) and its table grants in `public`, nothing else.
LOCK_DOWN_NEW_OBJECTS: LiteralString = """
DO $lock_down$
DECLARE
    o record;
    clients text;
    api text;
    has_service boolean := to_regrole('service_role') IS NOT NULL;
BEGIN
    SELECT string_agg(quote_ident(r), ', ') INTO api
      FROM unnest(ARRAY['anon', 'authenticated']) AS r WHERE to_regrole(r) IS NOT NULL;
    clients := 'PUBLIC' || coalesce(', ' || api, '');
    FOR o IN
        SELECT p.oid::regprocedure AS fn, n.nspname,
               p.prokind = 'f' AND p.prosecdef
                   AND p.prorettype <> 'pg_catalog.trigger'::regtype AS entry_point
          FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname NOT LIKE 'pg\\_temp\\_%'
           AND NOT EXISTS (SELECT 1 FROM pg_temp.reactor_migrate_before b
                            WHERE b.classid = 'pg_proc'::regclass AND b.objid = p.oid)
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                            WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                              AND d.deptype = 'e')
    LOOP
        EXECUTE format('REVOKE ALL ON ROUTINE %s FROM %s', o.fn, clients);
        IF has_service AND o.nspname = 'public' AND o.entry_point THEN
            EXECUTE format('GRANT EXECUTE ON ROUTINE %s TO service_role', o.fn);
        ELSIF has_service THEN
            EXECUTE format('REVOKE ALL ON ROUTINE %s FROM service_role', o.fn);
        END IF;
    END LOOP;
    FOR o IN
        SELECT c.oid::regclass AS rel, n.nspname,
               CASE WHEN c.relkind = 'S' THEN 'SEQUENCE' ELSE 'TABLE' END AS kind
          FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND c.relpersistence <> 't'
           AND NOT EXISTS (SELECT 1 FROM pg_temp.reactor_migrate_before b
                            WHERE b.classid = 'pg_class'::regclass AND b.objid = c.oid)
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                            WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                              AND d.deptype = 'e')
    LOOP
        EXECUTE format('REVOKE ALL ON %s %s FROM %s', o.kind, o.rel, clients);
        IF has_service AND o.nspname <> 'public' THEN
            EXECUTE format('REVOKE ALL ON %s %s FROM service_role', o.kind, o.rel);
        END IF;
    END LOOP;
    FOR o IN
        SELECT n.oid::regnamespace AS nsp FROM pg_catalog.pg_namespace n
         WHERE n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%'
           AND NOT EXISTS (SELECT 1 FROM pg_temp.reactor_migrate_before b
                            WHERE b.classid = 'pg_namespace'::regclass AND b.objid = n.oid)
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                            WHERE d.classid = 'pg_namespace'::regclass AND d.objid = n.oid
                              AND d.deptype = 'e')
    LOOP
        EXECUTE format('REVOKE ALL ON SCHEMA %s FROM %s', o.nsp, clients);
    END LOOP;
END
$lock_down$
"""

