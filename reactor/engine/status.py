"""What `reactor status` and the dashboard show, read straight from the database
(so it works with no reactor running, and nothing is forgotten when the page
opens late or the reactor restarts).

Sources: pgmq's archive `pgmq.a_<queue>` (finished; dead-lettering archives the
original too, so dead letters are subtracted), the dead-letter queues
`<queue>_dlq` (and their archive, for replayed ones) and
`reactor.job_failures` (retries and dead letters with their reason and
attempt, pruned by the housekeeping job). Error texts are masked like logs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from reactor.engine import queries
from reactor.engine.logs import mask_emails_in
from reactor.engine.queues import validate_queue

__all__ = ["CHART_BUCKET_S", "CHART_WINDOW_S", "CronJob", "QueueStatus", "cron_status",
           "queue_status", "recent_dead_letters", "recent_failures"]

CHART_BUCKET_S = 60          # the throughput chart: jobs finished per minute …
CHART_WINDOW_S = 3600        # … over the last hour


@dataclass(frozen=True)
class QueueStatus:
    """One queue: its state now and what became of its messages lately."""

    queue: str
    depth: int                      # waiting or in flight
    oldest_age_s: int | None
    retrying: int                   # failed at least once, waiting for another try
    done_1h: int                    # finished successfully (archived, not dead-lettered)
    done_24h: int
    dead_lettered_1h: int
    dead_lettered_24h: int
    dead_letters: int               # waiting in <queue>_dlq (replay or purge them)
    # Finished per CHART_BUCKET_S bucket: epoch seconds of the bucket start → count.
    throughput: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["throughput"] = {str(k): v for k, v in sorted(self.throughput.items())}
        return d


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


def queue_names(conn: psycopg.Connection) -> list[str]:
    """The work queues of the database's registry (reactor.queue_names(), filled by the
    app's migrations)."""
    return [str(row[0]) for row in conn.execute(queries.QUEUE_NAMES).fetchall()]


def _tables(queue: str) -> dict[str, sql.Identifier]:
    validate_queue(queue)  # only a queue's name is ever composed into SQL
    return {"table": sql.Identifier(f"q_{queue}"), "archive": sql.Identifier(f"a_{queue}"),
            "dlq": sql.Identifier(f"q_{queue}_dlq"),
            "dlq_archive": sql.Identifier(f"a_{queue}_dlq")}


def queue_status(conn: psycopg.Connection, *, bucket_s: int = CHART_BUCKET_S,
                 window_s: int = CHART_WINDOW_S) -> list[QueueStatus]:
    result = []
    for queue in queue_names(conn):
        row = conn.execute(queries.HISTORY_QUEUE.format(**_tables(queue)),
                           {"queue": queue, "bucket_s": bucket_s,
                            "window_s": window_s}).fetchone()
        assert row is not None
        series = {int(k): int(v) for k, v in (row[8] or {}).items()}
        result.append(QueueStatus(queue, row[0] or 0, row[1], row[2], row[3], row[4], row[5],
                                  row[6], row[7], series))
    return result


def cron_status(conn: psycopg.Connection) -> list[CronJob] | None:
    """The pg_cron jobs, or None when pg_cron is not in this database."""
    if conn.execute(queries.CRON_PRESENT).fetchone() is None:
        return None
    return [CronJob(*row) for row in conn.execute(queries.STATUS_CRON).fetchall()]


def recent_dead_letters(conn: psycopg.Connection, limit: int = 20) -> list[dict[str, Any]]:
    """Dead letters waiting in the `<queue>_dlq` queues, newest first.

    `msg_id` is the original message's id (what events and logs show);
    `dlq_msg_id` is the dead letter's own id in `<queue>_dlq`.
    """
    letters: list[dict[str, Any]] = []
    for queue in queue_names(conn):
        for dlq_id, enqueued_at, body in conn.execute(queries.RECENT_DEAD_LETTERS.format(
                table=sql.Identifier(f"q_{queue}_dlq")), {"limit": limit}).fetchall():
            body = body if isinstance(body, dict) else {}
            source = body.get("source_msg_id")
            letters.append({"queue": queue, "msg_id": source if isinstance(source, int) else None,
                            "dlq_msg_id": dlq_id, "at": enqueued_at.isoformat(),
                            "error": _masked(body.get("error")),
                            "attempts": body.get("attempts")})
    letters.sort(key=lambda d: str(d["at"]), reverse=True)
    return letters[:limit]


def recent_failures(conn: psycopg.Connection, limit: int = 30) -> list[dict[str, Any]]:
    """The latest failed deliveries (retried or dead-lettered), newest first.

    Each has the original `msg_id`, the `attempt` and the reason; a dead-lettered
    one still waiting in its dead-letter queue also has its `dlq_msg_id` (what
    `reactor dlq replay QUEUE --id` takes; `--msg-id` takes `msg_id`).
    """
    letters = recent_dead_letters(conn, limit=1000)
    waiting = {(d["queue"], d["msg_id"]): d["dlq_msg_id"] for d in letters}
    failures = []
    for queue, msg_id, attempt, error, dead, at in conn.execute(
            queries.RECENT_FAILURES, {"limit": limit}).fetchall():
        failures.append({"queue": queue, "msg_id": msg_id, "attempt": attempt,
                         "error": _masked(error),
                         "outcome": "dead_lettered" if dead else "retried",
                         "dlq_msg_id": waiting.get((queue, msg_id)) if dead else None,
                         "at": at.isoformat()})
    # Dead letters with no failure record (purged records, or written by an older
    # reactor) are failures too.
    known = {(f["queue"], f["msg_id"]) for f in failures}
    failures += [{"queue": d["queue"], "msg_id": d["msg_id"], "attempt": d["attempts"],
                  "error": d["error"], "outcome": "dead_lettered", "dlq_msg_id": d["dlq_msg_id"],
                  "at": d["at"]} for d in letters if (d["queue"], d["msg_id"]) not in known]
    failures.sort(key=lambda f: str(f["at"]), reverse=True)
    return failures[:limit]


def _masked(value: Any) -> str | None:
    return None if value is None else mask_emails_in(str(value))
