"""App schema, queues, enqueue helpers and NOTIFY semantics (migrations 001-031)."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Jsonb

from reactor.clinic.app import QUEUES as DECLARED
from tests import factories as f
from tests.harness import wait_until

QUEUES = [q.name for q in DECLARED]

APP_TABLES = ("profiles", "assessments", "appointments", "payments", "reports",
              "analytics_events")


def test_app_tables_exist_with_rls_and_uuid_ids(db: psycopg.Connection) -> None:
    rows: dict[str, bool] = dict(db.execute(
        "SELECT relname, relrowsecurity FROM pg_class "
        "WHERE relnamespace = 'public'::regnamespace AND relkind = 'r'").fetchall())
    for table in APP_TABLES:
        assert rows.get(table) is True, f"{table} missing or without RLS"
        id_default = db.execute(
            "SELECT column_default FROM information_schema.columns "
            "WHERE table_schema = 'public' AND table_name = %s AND column_name = 'id'",
            (table,)).fetchone()
        assert id_default is not None
        assert "gen_random_uuid" in id_default[0]


def test_supabase_roles_exist_and_anon_sees_no_rows(db: psycopg.Connection) -> None:
    roles = {r[0] for r in db.execute("SELECT rolname FROM pg_roles").fetchall()}
    assert {"anon", "authenticated", "service_role"} <= roles
    f.profile(db)
    db.execute("GRANT SELECT ON public.profiles TO anon")  # even with a grant, RLS hides rows
    with db.transaction():
        db.execute("SET LOCAL ROLE anon")
        assert db.execute("SELECT count(*) FROM public.profiles").fetchone() == (0,)
    with db.transaction():
        db.execute("SET LOCAL ROLE service_role")
        assert db.execute("SELECT count(*) FROM public.profiles").fetchone() == (1,)


def test_every_queue_and_its_dead_letter_queue_exist(db: psycopg.Connection) -> None:
    names = {r[0] for r in db.execute("SELECT queue_name FROM pgmq.list_queues()").fetchall()}
    assert names == set(QUEUES) | {f"{q}_dlq" for q in QUEUES}


def test_enqueue_sends_and_notifies_only_at_commit_once_per_queue(
        database_url: str, db: psycopg.Connection) -> None:
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN reactor_wakeup")
        with db.transaction():
            for i in range(50):
                db.execute("SELECT public.enqueue('analytics_queue', %s)", (Jsonb({"n": i}),))
            db.execute("SELECT public.enqueue('email_queue', %s)", (Jsonb({"n": 0}),))
            # Not yet committed: nothing delivered.
            assert list(listener.notifies(timeout=0.2)) == []
        payloads = [n.payload for n in listener.notifies(timeout=0.5)]
    assert sorted(payloads) == ["analytics_queue", "email_queue"]  # folded: one per queue
    assert len(f.queued(db, "analytics_queue")) == 50


def test_rolled_back_enqueue_neither_sends_nor_notifies(
        database_url: str, db: psycopg.Connection) -> None:
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN reactor_wakeup")
        db.execute("BEGIN")
        db.execute("SELECT public.enqueue('analytics_queue', '{\"n\": 1}')")
        db.execute("ROLLBACK")
        assert list(listener.notifies(timeout=0.3)) == []
    assert f.queued(db, "analytics_queue") == []


@pytest.mark.parametrize(("call", "message"), [
    ("SELECT public.enqueue('nope_queue', '{}')", 'unknown queue "nope_queue"'),
    ("SELECT public.enqueue('email_queue', '[1]')", "message must be a JSON object"),
    ("SELECT public.queue_email_task('not-an-address', NULL, 'x')",
     '"to" is not a valid email address'),
    ("SELECT public.queue_email_task(E'a@example.com\\r\\nBcc: x@evil.test', NULL, 'x')",
     '"to" is not a valid email address'),
    ("SELECT public.queue_email_task('a@example.com', E'Hi\\nBcc: x@evil.test', 'x')",
     "subject must not contain CR or LF"),
    ("SELECT public.queue_email_task('a@example.com', repeat('a ', 500), 'x')",
     "subject must be at most 998 characters"),
    ("SELECT public.queue_email_task('a@example.com', NULL, '../etc/passwd')",
     "template must match [a-z0-9_]+"),
    ("SELECT public.queue_email_task('a@example.com', NULL, 'x', '{}', 0, 'de')",
     "locale must be ru or en"),
    ("SELECT public.queue_report_generation(NULL, gen_random_uuid())",
     "assessment_id and user_id are required"),
    ("SELECT public.queue_payment_processing(gen_random_uuid(), 'steal')",
     "action must be verify, capture or refund"),
    ("SELECT public.queue_payment_processing(NULL)", "payment_id is required"),
    ("SELECT public.queue_analytics_event('Bad Event!', NULL)", "event must match"),
])
def test_helpers_refuse_bad_input_and_enqueue_nothing(
        db: psycopg.Connection, call: str, message: str) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue) as raised:
        db.execute(call)
    assert message in str(raised.value)
    for queue in QUEUES:
        assert f.queued(db, queue) == []


def test_helpers_build_the_documented_messages(db: psycopg.Connection) -> None:
    db.execute("SELECT public.queue_email_task('a@example.com', 'Hello', 'payment_failed', "
               "'{\"amount\": 10}', 7, 'en')")
    db.execute("SELECT public.queue_report_generation("
               "'00000000-0000-0000-0000-000000000001', '00000000-0000-0000-0000-000000000002')")
    db.execute("SELECT public.queue_payment_processing('00000000-0000-0000-0000-000000000003')")
    db.execute("SELECT public.queue_analytics_event('signup', NULL, '{\"plan\": \"family\"}')")
    assert f.queued(db, "email_queue") == [{
        "to": "a@example.com", "subject": "Hello", "template": "payment_failed",
        "variables": {"amount": 10}, "priority": 7, "locale": "en"}]
    assert f.queued(db, "report_generation_queue") == [{
        "assessment_id": "00000000-0000-0000-0000-000000000001",
        "user_id": "00000000-0000-0000-0000-000000000002", "report_type": "pdf"}]
    assert f.queued(db, "payment_processing_queue") == [{
        "payment_id": "00000000-0000-0000-0000-000000000003", "action": "verify"}]
    [analytics] = f.queued(db, "analytics_queue")
    assert analytics["event"] == "signup"
    assert analytics["properties"] == {"plan": "family"}
    assert analytics["occurred_at"]


def test_enqueue_with_delay_is_invisible_until_then(db: psycopg.Connection) -> None:
    row = db.execute("SELECT public.enqueue('analytics_queue', '{\"event\": \"later\"}', 3600)"
                     ).fetchone()
    assert row is not None
    later = row[0]
    # Stored: visible an hour after it was sent (not merely absent).
    stored = db.execute("SELECT extract(epoch FROM vt - enqueued_at) FROM pgmq.q_analytics_queue "
                        "WHERE msg_id = %s", (later,)).fetchone()
    assert stored is not None
    assert 3599 <= stored[0] <= 3601
    assert db.execute("SELECT count(*) FROM pgmq.read('analytics_queue', 30, 10)"
                      ).fetchone() == (0,)
    # And it does appear once its time comes: a 1 s delay, polled with a generous budget.
    row = db.execute("SELECT public.enqueue('analytics_queue', '{\"event\": \"soon\"}', 1)"
                     ).fetchone()
    assert row is not None
    soon = row[0]
    read = wait_until(lambda: db.execute("SELECT msg_id FROM pgmq.read('analytics_queue', 30, 10)"
                                         ).fetchall(), within_s=30, what="the delayed message")
    assert read == [(soon,)]  # the one-hour message is still hidden
