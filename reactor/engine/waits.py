"""How long messages waited between enqueue and start, kept in the database.

The Prometheus histograms (reactor.engine.metrics) live in the process and start
from zero at every restart; the dashboard's p50/p95 per queue over the last hour
must not. So a bus sink (`WaitRecorder.observe`) counts each first delivery's
wait into fixed buckets per queue and minute, and the runtime writes the counts
to `reactor.queue_waits` every WAITS_EVERY_S (and once on the way out): a few
rows every few seconds, never a write per job on the drainers' hot path.
Percentiles are read back from the bucket counts, interpolated inside a bucket as
Prometheus's histogram_quantile does (so they are as exact as the buckets).
A reactor killed without a chance to write loses at most WAITS_EVERY_S of counts.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any, Final

import psycopg

from reactor.engine import queries
from reactor.engine.db import Database, DatabaseUnavailable
from reactor.engine.events import Event, Succeeded

__all__ = ["WAITS_EVERY_S", "WAIT_BUCKETS_S", "WINDOW_S", "WaitRecorder", "percentiles",
           "quantile", "recent_percentiles"]

# Upper bounds in seconds (the last count of a row is "longer than the last bound").
# The same bounds as reactor_job_wait_seconds: the dashboard and Prometheus agree.
WAIT_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                         60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
WAITS_EVERY_S: Final = 5.0
WINDOW_S: Final = 3600          # the dashboard's percentiles: over the last hour
# Counts a database that does not answer keeps from being written are kept this long.
KEEP_UNWRITTEN_S: Final = 3600
_OUTCOMES = frozenset({"job.succeeded", "job.retrying", "job.dead_lettered", "job.deferred"})


class WaitRecorder:
    """Counts first deliveries' waits per (queue, minute); `write` stores and forgets them."""

    def __init__(self) -> None:
        self._pending: dict[tuple[str, int], list[int]] = {}

    def observe(self, event: Event) -> None:
        """The bus sink: an outcome event of a first delivery carries its `wait_ms`."""
        wait_ms = event.get("wait_ms")
        if wait_ms is None or event["type"] not in _OUTCOMES or not event["queue"]:
            return
        minute = int(event["ts"] // 60 * 60)
        counts = self._pending.get((event["queue"], minute))
        if counts is None:
            counts = self._pending[(event["queue"], minute)] = [0] * (len(WAIT_BUCKETS_S) + 1)
        counts[bisect.bisect_left(WAIT_BUCKETS_S, wait_ms / 1000)] += 1

    def observe_succeeded(self, queue: str, ts: float, jobs: Sequence[Succeeded]) -> None:
        """The bus sink's batch form: the jobs of one archive (job.succeeded at `ts`)."""
        if not queue:
            return
        minute = int(ts // 60 * 60)
        counts = self._pending.get((queue, minute))
        if counts is None:
            counts = self._pending[(queue, minute)] = [0] * (len(WAIT_BUCKETS_S) + 1)
        bounds = WAIT_BUCKETS_S
        for job in jobs:
            if job.wait_ms is not None:
                counts[bisect.bisect_left(bounds, job.wait_ms / 1000)] += 1

    async def write(self, db: Database) -> None:
        """Add what was counted to reactor.queue_waits; on failure keep it for next time."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}

        def store(conn: psycopg.Connection) -> None:
            with conn.transaction():
                for (queue, minute), counts in sorted(pending.items()):
                    conn.execute(queries.RECORD_WAITS,
                                 {"queue": queue, "minute": minute, "counts": counts})
                conn.execute(queries.PRUNE_WAITS)

        try:
            await db.run(store)
        except (DatabaseUnavailable, psycopg.Error):
            self._merge_back(pending)
        except BaseException:
            self._merge_back(pending)
            raise

    def _merge_back(self, pending: dict[tuple[str, int], list[int]]) -> None:
        newest = max(minute for _, minute in pending)
        for key, counts in pending.items():
            if key[1] < newest - KEEP_UNWRITTEN_S:
                continue  # bounded: an hour-long outage does not grow this for ever
            mine = self._pending.setdefault(key, [0] * len(counts))
            for i, n in enumerate(counts):
                mine[i] += n


def quantile(q: float, counts: list[int]) -> float | None:
    """The q-quantile (0..1) of bucket counts over WAIT_BUCKETS_S, interpolated linearly
    inside its bucket; the last bound when it falls among the "longer" ones; None when
    there is nothing."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i == len(WAIT_BUCKETS_S):
                return WAIT_BUCKETS_S[-1]
            lower = WAIT_BUCKETS_S[i - 1] if i else 0.0
            return lower + (WAIT_BUCKETS_S[i] - lower) * (rank - seen) / n
        seen += n
    return WAIT_BUCKETS_S[-1]


def percentiles(counts: list[int]) -> dict[str, Any]:
    return {"count": sum(counts), "p50_s": _round(quantile(0.5, counts)),
            "p95_s": _round(quantile(0.95, counts))}


def recent_percentiles(conn: psycopg.Connection,
                       window_s: int = WINDOW_S) -> dict[str, dict[str, Any]]:
    """Per queue: how many first deliveries started over the window, and their p50/p95
    wait in seconds (None when there were none)."""
    summed: dict[str, list[int]] = {}
    for queue, counts in conn.execute(queries.RECENT_WAITS, {"window_s": window_s}):
        mine = summed.setdefault(queue, [0] * (len(WAIT_BUCKETS_S) + 1))
        for i, n in enumerate(counts[:len(mine)]):
            mine[i] += n
    return {queue: percentiles(counts) for queue, counts in summed.items()}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
