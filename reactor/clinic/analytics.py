"""analytics_queue: each event becomes one row of public.analytics_events.

The row carries the pgmq msg_id as `source_msg_id` (unique), so a
redelivered message (crash between insert and archive) adds nothing. The
rows of the jobs running at one moment are inserted together (a group
commit); each job still settles only after its own row is committed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.types.json import Jsonb
from pydantic import Field

from reactor.clinic import queries
from reactor.engine.batching import GroupCommit
from reactor.engine.processor import Context, Job, MessageModel, PermanentError, Processor

__all__ = ["AnalyticsMessage", "AnalyticsProcessor"]


class AnalyticsMessage(MessageModel):
    event: str = Field(min_length=1, max_length=200)
    user_id: UUID | None = None
    properties: dict[str, Any] = Field(default_factory=dict)
    occurred_at: datetime | None = None


class AnalyticsProcessor(Processor[AnalyticsMessage]):
    model = AnalyticsMessage
    concurrency = 8  # each job is one row of a group commit; the pool is the real limit
    timeout_s = 30.0

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        # The rows of the jobs running at one moment, in one INSERT and one commit: a
        # burst of events costs a round trip a batch, not a round trip and a thread
        # hop an event. Repeating a batch is harmless (ON CONFLICT DO NOTHING).
        self._rows: GroupCommit[_Row, set[int]] = GroupCommit(self._insert)

    async def handle(self, job: Job[AnalyticsMessage]) -> None:
        msg = job.message
        row = _Row(msg.event, msg.user_id, Jsonb(msg.properties), msg.occurred_at, job.msg_id)
        try:
            missing = await self._rows.submit(row)
        except psycopg.errors.ForeignKeyViolation:
            # The user's profile was deleted while the batch was written: this row alone.
            missing = await self._insert_one(row)
        if job.msg_id in missing:
            raise PermanentError(f"user {msg.user_id} does not exist in public.profiles")

    async def _insert(self, rows: Sequence[_Row]) -> set[int]:
        """Insert the rows; the msg_ids of those whose user is not in public.profiles."""
        found = await self.db.fetch(queries.INSERT_ANALYTICS_EVENTS, {
            "events": [r.event for r in rows], "user_ids": [r.user_id for r in rows],
            "properties": [r.properties for r in rows],
            "occurred_at": [r.occurred_at for r in rows], "msg_ids": [r.msg_id for r in rows]})
        return {int(msg_id) for (msg_id,) in found}

    async def _insert_one(self, row: _Row) -> set[int]:
        try:
            await self.db.fetch(queries.INSERT_ANALYTICS_EVENT, {
                "event": row.event, "user_id": row.user_id, "properties": row.properties,
                "occurred_at": row.occurred_at, "msg_id": row.msg_id})
        except psycopg.errors.ForeignKeyViolation:
            return {row.msg_id}
        return set()


@dataclass(frozen=True)
class _Row:
    event: str
    user_id: UUID | None
    properties: Jsonb
    occurred_at: datetime | None
    msg_id: int
