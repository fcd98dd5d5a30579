"""Group commit: what several jobs each need written, written in one statement.

A job that ends in one small write (an analytics row, a mail's 'sent' verdict)
spends most of its cost on that write's round trip and commit. `GroupCommit`
lets the jobs running at one moment share them: whoever holds the writer
writes every item waiting then, in one call; the others find theirs written
when their turn comes. The first item is written at once (no timer, no added
latency); under load a batch forms by itself while the previous one commits.

Each caller still gets its own outcome before its job settles: the batch's
result, or the batch's error. A writer cut off (its job's deadline, shutdown)
puts the batch back for the next writer: an item is never lost because
another job was cancelled, so `write` must be harmless to repeat (an upsert,
ON CONFLICT DO NOTHING, a verdict rewritten with the same value).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

import trio

__all__ = ["GroupCommit"]

T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)
class _Waiting(Generic[T, R]):
    item: T
    written: bool = False
    result: R | None = None
    error: Exception | None = None


class GroupCommit(Generic[T, R]):
    """`await submit(item)` returns `write(batch)`'s result for the batch that held the
    item, or raises its error. One batch is written at a time, per instance."""

    def __init__(self, write: Callable[[Sequence[T]], Awaitable[R]]) -> None:
        self._write = write
        self._unwritten: list[_Waiting[T, R]] = []
        self._writer = trio.Lock()

    async def submit(self, item: T) -> R:
        waiting: _Waiting[T, R] = _Waiting(item)
        self._unwritten.append(waiting)
        async with self._writer:
            if not waiting.written:
                batch, self._unwritten = self._unwritten, []
                try:
                    result = await self._write([w.item for w in batch])
                except Exception as exc:
                    for each in batch:
                        each.error, each.written = exc, True
                except BaseException:  # cut off: the next writer takes them
                    self._unwritten[:0] = batch
                    raise
                else:
                    for each in batch:
                        each.result, each.written = result, True
        if waiting.error is not None:
            raise waiting.error
        return cast(R, waiting.result)  # set with `written`
