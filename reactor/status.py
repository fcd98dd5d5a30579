"""What `reactor status` and the dashboard show, read straight from the database
(so it works with no reactor running)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from reactor import queries
from reactor.config import QUEUES

__all__ = ["CronJob", "QueueStatus", "cron_status", "queue_status", "recent_dead_letters"]


@dataclass(frozen=True)
class QueueStatus:
    queue: str
    depth: int
    oldest_age_s: int | None
    processed_last_hour: int
    dead_letters: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CronJob:
    name: str
    schedule: str
    active: bool
    last_run: datetime | None
    last_status: str | None
    failures_last_day: int

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["last_run"] = self.last_run.isoformat() if self.last_run else None
        return d


def queue_status(conn: psycopg.Connection) -> list[QueueStatus]:
    result = []
    for queue in QUEUES:
        row = conn.execute(queries.STATUS_QUEUE.format(
            archive=sql.Identifier(f"a_{queue}")), {"queue": queue}).fetchone()
        assert row is not None
        result.append(QueueStatus(queue, row[0] or 0, row[1], row[2], row[3] or 0))
    return result


def cron_status(conn: psycopg.Connection) -> list[CronJob] | None:
    """The pg_cron jobs, or None when pg_cron is not in this database."""
    if conn.execute(queries.CRON_PRESENT).fetchone() is None:
        return None
    return [CronJob(*row) for row in conn.execute(queries.STATUS_CRON).fetchall()]


def recent_dead_letters(conn: psycopg.Connection, limit: int = 20) -> list[dict[str, Any]]:
    letters: list[dict[str, Any]] = []
    for queue in QUEUES:
        for msg_id, enqueued_at, body in conn.execute(queries.RECENT_DEAD_LETTERS.format(
                table=sql.Identifier(f"q_{queue}_dlq")), {"limit": limit}).fetchall():
            body = body if isinstance(body, dict) else {}
            letters.append({"queue": queue, "msg_id": msg_id,
                            "at": enqueued_at.isoformat(), "error": body.get("error"),
                            "attempts": body.get("attempts"),
                            "source_msg_id": body.get("source_msg_id")})
    letters.sort(key=lambda d: str(d["at"]), reverse=True)
    return letters[:limit]
