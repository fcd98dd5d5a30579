"""Group commit: what several jobs each need written, written in one statement.

A job that ends in one small write (an analytics row, a mail's 'sent' verdict)
spends most of its cost on that write's round trip and commit. `GroupCommit`
lets the jobs running at one moment share them: whoever holds the writer
writes every item waiting then, in one call; the others find theirs written
when their turn comes. The first item is written at once (no timer, no added
latency); under load a batch forms by itself while the previous one commits.

Each caller still gets its own outcome before its job settles:
- the batch's result, or the batch's error when the write failed for all of
  them (the database is down);
- where one item can make the whole write fail (a value the database refuses:
  `alone_after`), its own error: the failed batch's items are then written
  one by one, so one bad item fails its own job only, never its neighbours.

A caller that leaves before its item is written (its job's deadline, shutdown)
takes the item with it: the job did not succeed, so its effect must not appear
later. A writer cut off mid-write hands the others' items to the next writer.
`keep_orphans` keeps a departed caller's item instead, for what must be
recorded whoever waits for it (a mail that went out). An item may be written
more than once (a cut-off write the server had committed), so `write` must be
harmless to repeat: an upsert, ON CONFLICT DO NOTHING, the same verdict again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
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
    alone: bool = False  # its batch failed on an `alone_after` error: write it by itself
    departed: bool = False  # its caller left (cancelled) before it was written
    result: R | None = None
    error: Exception | None = None


class GroupCommit(Generic[T, R]):
    """`await submit(item)` returns `write(batch)`'s result for the batch that held the
    item, or raises its error. One write at a time, per instance.

    Args:
        write: writes a batch (one item or more); harmless to repeat.
        alone_after: errors of a batch's write that may be one item's fault: each item
            of that batch is then written alone, and gets its own outcome.
        keep_orphans: write the item of a caller that left, too (see the module).
    """

    def __init__(self, write: Callable[[Sequence[T]], Awaitable[R]], *,
                 alone_after: tuple[type[Exception], ...] = (),
                 keep_orphans: bool = False) -> None:
        self._write = write
        self._alone_after = alone_after
        self._keep_orphans = keep_orphans
        self._unwritten: list[_Waiting[T, R]] = []
        self._writer = trio.Lock()

    async def submit(self, item: T) -> R:
        waiting: _Waiting[T, R] = _Waiting(item)
        self._unwritten.append(waiting)
        try:
            async with self._writer:
                if not waiting.written and not waiting.alone:
                    await self._write_pending(waiting)
                if waiting.alone:
                    return await self._write([waiting.item])
        except BaseException:
            if not waiting.written and not self._keep_orphans:
                waiting.departed = True
                with suppress(ValueError):
                    self._unwritten.remove(waiting)
            raise
        if waiting.error is not None:
            raise waiting.error
        return cast(R, waiting.result)  # set with `written`

    async def _write_pending(self, own: _Waiting[T, R]) -> None:
        batch, self._unwritten = self._unwritten, []
        try:
            result = await self._write([w.item for w in batch])
        except Exception as exc:
            one_item_may_be_at_fault = len(batch) > 1 and isinstance(exc, self._alone_after)
            for each in batch:
                if one_item_may_be_at_fault:
                    each.alone = True
                else:
                    each.error, each.written = exc, True
        except BaseException:  # cut off: the others' items go to the next writer
            own.departed = not self._keep_orphans
            self._unwritten[:0] = [w for w in batch if not w.departed]
            raise
        else:
            for each in batch:
                each.result, each.written = result, True
