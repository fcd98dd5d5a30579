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
from reactor.engine import GroupCommit
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
        # hop an event. A batch the database refuses (a value jsonb cannot hold, a
        # constraint) is written again row by row: one bad event fails its own job.
        self._rows: GroupCommit[_Row, set[int]] = GroupCommit(
            self._insert, alone_after=(psycopg.Error,))

    async def handle(self, job: Job[AnalyticsMessage]) -> None:
        msg = job.message
        row = _Row(msg.event, msg.user_id, Jsonb(msg.properties), msg.occurred_at, job.msg_id)
        try:
            missing = await self._rows.submit(row)
        except psycopg.errors.ForeignKeyViolation:
            missing = {job.msg_id}  # the profile went while the row was written
        except (psycopg.errors.DataError, psycopg.errors.IntegrityError) as exc:
            # This row alone (see above), and the same row would be refused again.
            raise PermanentError("the database refused the event: "
                                 f"{exc.diag.message_primary or exc}") from None
        if job.msg_id in missing:
            raise PermanentError(f"user {msg.user_id} does not exist in public.profiles")

    async def _insert(self, rows: Sequence[_Row]) -> set[int]:
        """Insert the rows; the msg_ids of those whose user is not in public.profiles."""
        found = await self.db.fetch(queries.INSERT_ANALYTICS_EVENTS, {
            "events": [r.event for r in rows], "user_ids": [r.user_id for r in rows],
            "properties": [r.properties for r in rows],
            "occurred_at": [r.occurred_at for r in rows], "msg_ids": [r.msg_id for r in rows]})
        return {int(msg_id) for (msg_id,) in found}


@dataclass(frozen=True)
class _Row:
    event: str
    user_id: UUID | None
    properties: Jsonb
    occurred_at: datetime | None
    msg_id: int
