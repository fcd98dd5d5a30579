"""Rows and queue look-ups the tests share."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb


def profile(conn: psycopg.Connection, *, email: str = "parent@example.com",
            full_name: str = "Анна Петрова", locale: str = "ru") -> UUID:
    row = conn.execute(
        "INSERT INTO public.profiles (email, full_name, locale) VALUES (%s, %s, %s) RETURNING id",
        (email, full_name, locale)).fetchone()
    assert row is not None
    return UUID(str(row[0]))


def appointment(conn: psycopg.Connection, user_id: UUID, *,
                starts_in: timedelta | None = None, at: datetime | None = None,
                status: str = "scheduled", duration_minutes: int = 50,
                specialist_name: str = "Dr. Ivanova") -> UUID:
    """A consultation `starts_in` from now, or `at` a fixed time (exactly one of them)."""
    assert (starts_in is None) != (at is None), "give starts_in or at"
    row = conn.execute(
        """INSERT INTO public.appointments (user_id, specialist_name, scheduled_at,
                                            duration_minutes, status)
           VALUES (%s, %s, coalesce(%s, now() + %s), %s, %s) RETURNING id""",
        (user_id, specialist_name, at, starts_in, duration_minutes, status)).fetchone()
    assert row is not None
    return UUID(str(row[0]))


def assessment(conn: psycopg.Connection, user_id: UUID, *, status: str = "in_progress",
               age: timedelta = timedelta(0), results: dict[str, Any] | None = None) -> UUID:
    row = conn.execute(
        """INSERT INTO public.assessments (user_id, status, created_at, results)
           VALUES (%s, %s, now() - %s, %s) RETURNING id""",
        (user_id, status, age, Jsonb(results) if results is not None else None)).fetchone()
    assert row is not None
    return UUID(str(row[0]))


def payment(conn: psycopg.Connection, user_id: UUID, appointment_id: UUID | None, *,
            amount: str = "3500.00", status: str = "pending") -> UUID:
    row = conn.execute(
        """INSERT INTO public.payments (user_id, appointment_id, amount, currency, status)
           VALUES (%s, %s, %s, 'RUB', %s) RETURNING id""",
        (user_id, appointment_id, amount, status)).fetchone()
    assert row is not None
    return UUID(str(row[0]))


def ledger_entry(conn: psycopg.Connection, key: str, *, msg_id: int,
                 recipient: str = "a@example.com", template: str = "checkup_completed",
                 status: str = "sending", claimed_s_ago: float = 0) -> None:
    """A row of the email ledger, e.g. the 'sending' a worker killed mid-send leaves
    (`claimed_s_ago`: how long ago its delivery claimed it)."""
    conn.execute("""INSERT INTO public.email_ledger (idempotency_key, queue, msg_id, recipient,
                                                     template, status, updated_at)
                    VALUES (%s, 'email_queue', %s, %s, %s, %s,
                            now() - make_interval(secs => %s))""",
                 (key, msg_id, recipient, template, status, claimed_s_ago))


def queued(conn: psycopg.Connection, queue: str) -> list[dict[str, Any]]:
    """Bodies of the messages waiting in a queue, oldest first (without taking them)."""
    rows = conn.execute(sql.SQL("SELECT message FROM pgmq.{} ORDER BY msg_id").format(
        sql.Identifier(f"q_{queue}"))).fetchall()
    return [r[0] for r in rows]


def archived(conn: psycopg.Connection, queue: str) -> list[dict[str, Any]]:
    rows = conn.execute(sql.SQL("SELECT message FROM pgmq.{} ORDER BY msg_id").format(
        sql.Identifier(f"a_{queue}"))).fetchall()
    return [r[0] for r in rows]


def now(conn: psycopg.Connection) -> datetime:
    row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]
