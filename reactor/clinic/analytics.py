"""analytics_queue: each event becomes one row of public.analytics_events.

The row carries the pgmq msg_id as `source_msg_id` (unique), so a
redelivered message (crash between insert and archive) adds nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.types.json import Jsonb
from pydantic import Field

from reactor.clinic import queries
from reactor.engine.processor import Job, MessageModel, PermanentError, Processor

__all__ = ["AnalyticsMessage", "AnalyticsProcessor"]


class AnalyticsMessage(MessageModel):
    event: str = Field(min_length=1, max_length=200)
    user_id: UUID | None = None
    properties: dict[str, Any] = Field(default_factory=dict)
    occurred_at: datetime | None = None


class AnalyticsProcessor(Processor[AnalyticsMessage]):
    model = AnalyticsMessage
    concurrency = 8  # each job is one INSERT; the pool is the real limit
    timeout_s = 30.0

    async def handle(self, job: Job[AnalyticsMessage]) -> None:
        msg = job.message
        params = {"event": msg.event, "user_id": msg.user_id, "properties": Jsonb(msg.properties),
                  "occurred_at": msg.occurred_at, "msg_id": job.msg_id}

        def insert(conn: psycopg.Connection) -> None:
            conn.execute(queries.INSERT_ANALYTICS_EVENT, params)

        try:
            await self.db.run(insert)
        except psycopg.errors.ForeignKeyViolation:
            raise PermanentError(f"user {msg.user_id} does not exist in public.profiles") from None
