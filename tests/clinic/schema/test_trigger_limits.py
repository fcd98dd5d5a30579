"""The limits of the database webhooks (041): what cannot be built, and a bulk import.

Heavy (a 256 MiB value, a 2,000-row import), so they run on plain Postgres only; the
behaviour is the same SQL on the Supabase-like database (tests/clinic/schema/test_triggers.py).
"""

from __future__ import annotations

from datetime import timedelta

import psycopg

from tests import factories as f


def test_a_variable_json_cannot_hold_is_refused_not_raised(db: psycopg.Connection) -> None:
    """A full_name longer than a JSON string may be (256 MiB): the message cannot even be
    built; the booking commits and the refusal says why."""
    row = db.execute("INSERT INTO public.profiles (email, full_name) "
                     "VALUES ('a@example.com', repeat('x', 268435456)) RETURNING id").fetchone()
    assert row is not None
    appointment = f.appointment(db, row[0], starts_in=timedelta(days=2))
    [letter] = f.queued(db, "email_queue_dlq")
    assert str(letter["error"]).startswith("refused at enqueue: the message could not be built: ")
    assert "too long" in str(letter["error"])
    assert letter["refused_by"] == f"handle_new_appointment() for appointment {appointment}"
    assert [e["event"] for e in f.queued(db, "analytics_queue")] == ["appointment_created"]


def test_a_bulk_import_writes_in_one_transaction_good_or_bad_addresses(
        db: psycopg.Connection) -> None:
    """No subtransaction that writes, per row: every row of a 2,000-row import, its queued
    mails, dead letters and events carry the one transaction id (many subtransaction ids
    in one transaction would slow every other session of the database)."""
    good, bad = f.profile(db), f.profile(db, email="not an address")
    db.execute("INSERT INTO public.appointments (user_id, specialist_name, scheduled_at) "
               "SELECT CASE WHEN i %% 2 = 0 THEN %s ELSE %s END::uuid, 'Dr', "
               "       now() + interval '2 days' FROM generate_series(1, 2000) AS i",
               (good, bad))
    written = db.execute("""
        SELECT count(*), count(DISTINCT xmin::text) FROM (
            SELECT xmin FROM public.appointments UNION ALL
            SELECT xmin FROM pgmq.q_email_queue UNION ALL
            SELECT xmin FROM pgmq.q_email_queue_dlq UNION ALL
            SELECT xmin FROM pgmq.q_analytics_queue) AS rows""").fetchone()
    assert written == (6000, 1)  # 2,000 bookings and events, 1,000 mails, 1,000 refused
    assert len(f.queued(db, "email_queue")) == 1000
    assert len(f.queued(db, "email_queue_dlq")) == 1000
