"""pgmq operations on a sync connection (called through `Database.run`).

Only what Supabase's pgmq 1.4.4-1.5.1 offers is used: read, archive,
set_vt, send, delete, metrics_all.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from reactor import queries
from reactor.config import QUEUES

__all__ = ["Message", "QueueDepth", "dlq_name", "validate_queue"]


def validate_queue(name: str) -> str:
    """Accept only the reactor's own queues (their tables are composed into SQL)."""
    if name not in QUEUES:
        raise ValueError(f"unknown queue {name!r}: use one of {', '.join(QUEUES)}")
    return name


def dlq_name(queue: str) -> str:
    return f"{validate_queue(queue)}_dlq"


def _table(queue: str) -> sql.Identifier:
    base = queue.removesuffix("_dlq")
    validate_queue(base)
    return sql.Identifier(f"q_{queue}")


@dataclass(frozen=True, slots=True)
class Message:
    """One delivery of a pgmq message. `attempt` is pgmq's read_ct."""

    queue: str
    msg_id: int
    attempt: int
    enqueued_at: datetime
    body: Any

    @property
    def priority(self) -> int:
        if isinstance(self.body, dict):
            value = self.body.get("priority")
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return 0


@dataclass(frozen=True, slots=True)
class QueueDepth:
    queue: str
    depth: int
    oldest_age_s: int | None
    total: int


def _messages(queue: str, rows: list[tuple[Any, ...]]) -> list[Message]:
    """Rows of (msg_id, read_ct, enqueued_at, message), as every reading query selects them."""
    return [Message(queue, r[0], r[1], r[2], r[3]) for r in rows]


def read(conn: psycopg.Connection, queue: str, vt: int, qty: int) -> list[Message]:
    rows = conn.execute(queries.READ, {"queue": queue, "vt": vt, "qty": qty}).fetchall()
    return _messages(queue, rows)


def archive(conn: psycopg.Connection, queue: str, ids: list[int]) -> None:
    if ids:
        conn.execute(queries.ARCHIVE_MANY, {"queue": queue, "ids": ids})


def archive_fast(conn: psycopg.Connection, queue: str, ids: list[int]) -> None:
    """Archive without waiting for the WAL flush (see archive_then_read for why that is safe)."""
    if ids:
        conn.execute(queries.ARCHIVE_ASYNC, {"queue": queue, "ids": ids})


def set_vt(conn: psycopg.Connection, queue: str, ids: list[int], seconds: int) -> None:
    """Make messages visible in `seconds` (0 = now): retry later, release, or extend."""
    if ids:
        conn.execute(queries.SET_VT_MANY, {"queue": queue, "ids": ids, "vt": seconds})


def archive_then_read(
    conn: psycopg.Connection, queue: str, done: list[int], vt: int, qty: int
) -> list[Message]:
    """Archive finished messages and read the next batch: one statement, one commit.

    The commit does not wait for the WAL flush (synchronous_commit off, for
    the reactor's bookkeeping only: taking and archiving messages). That is
    safe: if Postgres crashes before the flush, a read or an archive is undone
    and the message is delivered again, and every effect is idempotent and was
    committed durably by its handler. It saves a busy drainer a disk flush and
    three round trips per batch.
    """
    rows = conn.execute(queries.ARCHIVE_THEN_READ,
                        {"queue": queue, "ids": done, "vt": vt, "qty": qty}).fetchall()
    return _messages(queue, rows)


def dead_letter(conn: psycopg.Connection, msg: Message, error: str) -> int:
    """Send to `<queue>_dlq` with the reason and archive the original, atomically."""
    body = {
        "original": msg.body,
        "error": error,
        "attempts": msg.attempt,
        "failed_at": datetime.now(UTC).isoformat(),
        "source_msg_id": msg.msg_id,
        "queue": msg.queue,
    }
    with conn.transaction():
        row = conn.execute(
            queries.SEND, {"queue": dlq_name(msg.queue), "message": Jsonb(body), "delay": 0}
        ).fetchone()
        archive(conn, msg.queue, [msg.msg_id])
    assert row is not None
    return int(row[0])


def next_visible_in(conn: psycopg.Connection, queue: str) -> float | None:
    """Seconds until a message of `queue` becomes visible; None when it is empty."""
    row = conn.execute(queries.NEXT_VISIBLE_IN.format(table=_table(queue))).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def enqueue(conn: psycopg.Connection, queue: str, message: dict[str, Any], delay: int = 0) -> int:
    """public.enqueue: send and wake the reactor at commit."""
    row = conn.execute(
        queries.ENQUEUE, {"queue": validate_queue(queue), "message": Jsonb(message), "delay": delay}
    ).fetchone()
    assert row is not None
    return int(row[0])


def depths(conn: psycopg.Connection) -> list[QueueDepth]:
    return [QueueDepth(r[0], r[1], r[2], r[3]) for r in conn.execute(queries.QUEUE_METRICS)]


def peek(conn: psycopg.Connection, queue: str, msg_id: int | None = None,
         limit: int = 100) -> list[Message]:
    """Messages of a queue without taking them (for the DLQ commands)."""
    rows = conn.execute(queries.PEEK.format(table=_table(queue)),
                        {"msg_id": msg_id, "limit": limit}).fetchall()
    return _messages(queue, rows)


def replay_dead_letters(conn: psycopg.Connection, queue: str, msg_id: int | None = None,
                        limit: int = 1000) -> list[int]:
    """Put dead letters back on their queue as fresh messages; returns the new ids.

    Each replay is one transaction: the new message is sent (waking the
    reactor at commit) and the dead letter archived, so a replay is never
    lost or doubled.
    """
    new_ids = []
    for letter in peek(conn, dlq_name(queue), msg_id, limit):
        original = letter.body.get("original") if isinstance(letter.body, dict) else None
        if not isinstance(original, dict):
            continue  # not a JSON object: replaying it could only fail again; it stays
        with conn.transaction():
            new_ids.append(enqueue(conn, queue, original))
            archive(conn, dlq_name(queue), [letter.msg_id])
    return new_ids


def purge_dead_letters(conn: psycopg.Connection, queue: str) -> int:
    ids = [m.msg_id for m in peek(conn, dlq_name(queue), limit=1_000_000)]
    if ids:
        conn.execute(queries.DELETE_MANY, {"queue": dlq_name(queue), "ids": ids})
    return len(ids)
