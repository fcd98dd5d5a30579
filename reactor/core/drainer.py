"""One drainer per queue: read a batch, run the handlers, archive, repeat until
the queue is empty; then sleep until a wake-up, the next visible message, or
the fallback poll.

Reads and archives are batched and share one trip to a worker thread, so a
burst of notifications costs a few reads, not one read per notification.
Failures follow the policy of DESIGN.md: permanent → dead letter now;
anything else → retry with backoff through pgmq.set_vt, dead letter after
MAX_ATTEMPTS deliveries.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Any

import structlog
import trio

from reactor import queues
from reactor.core.events import EventBus
from reactor.core.retry import RetryPolicy
from reactor.db import Database, DatabaseUnavailable
from reactor.processors.base import PermanentError, Processor, RetryableError, RetryLater
from reactor.queues import Message

__all__ = ["DrainSettings", "Drainer"]

log = structlog.get_logger("reactor.drainer")

# After a failed database call the drainer waits this long, doubling, up to the cap.
DB_BACKOFF_START_S = 0.1
DB_BACKOFF_MAX_S = 10.0
# When another replica holds the visible rows for an instant, do not spin.
MIN_IDLE_S = 0.05
# Finished messages are archived at least this often while others still run.
FLUSH_EVERY_S = 1.0


@dataclass(frozen=True)
class DrainSettings:
    batch_size: int
    visibility_timeout_s: int
    poll_interval_s: float
    policy: RetryPolicy


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class Drainer:
    """Drains one queue with one processor. Owned by the Reactor's nursery.

    `concurrency` long-lived workers take messages from a bounded channel
    that the read loop fills, highest priority first. Up to one batch beyond
    the busy workers may wait there (prefetched, its leases kept alive), so
    priority decides what runs next even when every worker is busy.
    """

    def __init__(self, processor: Processor[Any], db: Database, bus: EventBus,
                 settings: DrainSettings) -> None:
        self.processor = processor
        self.queue = processor.queue
        self.db = db
        self.bus = bus
        self.cfg = settings
        self.concurrency = max(1, processor.concurrency)
        self.max_in_flight = self.concurrency + settings.batch_size
        self.max_deliveries = processor.max_deliveries or settings.policy.most_deliveries
        self._send, self._receive = trio.open_memory_channel[Message](self.max_in_flight)
        self._in_flight: dict[int, tuple[Message, float]] = {}
        # Running jobs: msg_id → (deadline, the worker's cancel scope, start time).
        self._deadlines: dict[int, tuple[float, trio.CancelScope, float]] = {}
        # The one job _watch has just cancelled, until its worker records the retry.
        self._timed_out: tuple[Message, float] | None = None
        self._done: list[int] = []
        self._release: list[int] = []
        self._wake_pending = True  # drain once at start
        self._signal = trio.Event()
        # A finishing job signals the read loop only when in-flight falls to this level,
        # so a burst does not wake the read loop once per message.
        self._signal_at_in_flight = 0
        self._stopping = False
        self._workers_scope: trio.CancelScope | None = None
        self._cancel_jobs = False
        self._backoff = DB_BACKOFF_START_S
        self.finished = trio.Event()

    # -- control (called from other tasks) --------------------------------------
    def wake(self) -> None:
        """A NOTIFY (or a reconnect) says there may be work."""
        self._wake_pending = True
        self._signal.set()

    def stop(self) -> None:
        """Stop reading; in-flight jobs may finish."""
        self._stopping = True
        self._signal.set()

    def cancel_jobs(self) -> None:
        """Grace is over: cancel in-flight jobs (their messages become visible at once)."""
        self._cancel_jobs = True
        if self._workers_scope is not None:
            self._workers_scope.cancel()

    # -- the loop --------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drain until stopped; survives database outages."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch)
                async with trio.open_nursery() as workers:
                    self._workers_scope = workers.cancel_scope
                    if self._cancel_jobs:
                        workers.cancel_scope.cancel()
                    for _ in range(self.concurrency):
                        workers.start_soon(self._worker)
                    task_status.started()
                    while not self._stopping:
                        try:
                            await self._read_loop()
                            await self._idle()
                        except DatabaseUnavailable as exc:
                            await self._db_down(exc)
                    await self._finish_in_flight()
                    workers.cancel_scope.cancel()  # the workers are idle now
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._flush_final()
            self.finished.set()

    async def _worker(self) -> None:
        """Run jobs one after another; come back to life after a job's timeout.

        Timeouts are enforced by `_watch` cancelling this worker's scope, not by
        a cancel scope per job: that costs more than a small job itself.
        """
        while True:
            with trio.CancelScope() as scope:
                async for message in self._receive:
                    await self._process(message, scope)
                return  # the channel was closed
            # Only _watch cancels this scope: the job it names ran out of time.
            timed_out, self._timed_out = self._timed_out, None
            if timed_out is not None:
                message, started = timed_out
                try:
                    await self._retry(
                        message, f"timed out after {self.processor.timeout_s:g}s", started)
                finally:
                    self._job_done(message)

    async def _finish_in_flight(self) -> None:
        """Stopping: hand back what no worker has started, wait for the rest."""
        while True:
            try:
                message = self._receive.receive_nowait()
            except trio.WouldBlock:
                break
            del self._in_flight[message.msg_id]
            self._release.append(message.msg_id)
        while self._in_flight:
            await self._wait_signal(self.cfg.visibility_timeout_s, until_in_flight=0)

    async def _db_down(self, exc: DatabaseUnavailable) -> None:
        """Back off (capped, doubling) after a failed database call, then look again."""
        log.warning("database unavailable", queue=self.queue, error=str(exc),
                    retry_in_s=self._backoff)
        await self._wait_signal(self._backoff)
        self._backoff = min(self._backoff * 2, DB_BACKOFF_MAX_S)
        self._wake_pending = True

    async def _wait_signal(self, at_most_s: float, until_in_flight: int = 0) -> None:
        """Wait for a wake-up, stop, or in-flight jobs down to `until_in_flight`."""
        self._signal_at_in_flight = until_in_flight
        with trio.move_on_after(at_most_s):
            await self._signal.wait()
        self._signal = trio.Event()

    async def _idle(self) -> None:
        """Sleep until a wake-up, the next message becomes visible, or the poll."""
        if self._wake_pending or self._stopping:
            return
        timeout = self.cfg.poll_interval_s
        due = await self.db.run(lambda c: queues.next_visible_in(c, self.queue))
        if due is not None:
            timeout = min(timeout, max(due, MIN_IDLE_S))
        await self._wait_signal(timeout)
        if not self._stopping:
            self._wake_pending = True  # woken, due, or poll: look again

    async def _read_loop(self) -> None:
        """Read and dispatch until the queue is empty and every job has finished."""
        batch = self.cfg.batch_size
        threshold = min(batch, self.max_in_flight - 1)  # read whole batches
        empty = False
        while not self._stopping:
            if empty and not self._wake_pending:
                if not self._in_flight:
                    await self._flush()
                    return
                # Archive what finished at least every FLUSH_EVERY_S while the rest run.
                await self._wait_signal(FLUSH_EVERY_S, until_in_flight=0)
                try:
                    await self._flush()
                except DatabaseUnavailable as exc:
                    await self._db_down(exc)
                continue
            free = self.max_in_flight - len(self._in_flight)
            if free < threshold:
                await self._wait_signal(FLUSH_EVERY_S,
                                        until_in_flight=self.max_in_flight - threshold)
                continue
            self._wake_pending = False
            try:
                messages = await self._archive_then_read(min(batch, free))
            except DatabaseUnavailable as exc:
                await self._db_down(exc)  # in-flight jobs carry on meanwhile
                continue
            self._backoff = DB_BACKOFF_START_S
            empty = not messages
            if len(messages) > 1:
                messages.sort(key=lambda m: (-m.priority, m.msg_id))  # FIFO within a priority
            now = trio.current_time()
            for message in messages:
                self._in_flight[message.msg_id] = (message, now)
                self._send.send_nowait(message)  # room is guaranteed by max_in_flight
            await trio.lowlevel.checkpoint()

    async def _archive_then_read(self, qty: int) -> list[Message]:
        done, self._done = self._done, []
        try:
            return await self.db.run(lambda c: queues.archive_then_read(
                c, self.queue, done, self.cfg.visibility_timeout_s, qty))
        except BaseException:
            self._done[:0] = done  # archived next time (archive is idempotent)
            raise

    async def _flush(self) -> None:
        if self._done:
            done, self._done = self._done, []
            try:
                await self.db.run(lambda c: queues.archive_fast(c, self.queue, done))
            except BaseException:
                self._done[:0] = done
                raise

    async def _flush_final(self) -> None:
        """On the way out: archive what succeeded, release what was cancelled."""
        release, self._release = self._release, []
        try:
            await self._flush()
            if release:
                await self.db.run(lambda c: queues.set_vt(c, self.queue, release, 0))
        except (DatabaseUnavailable, trio.Cancelled) as exc:
            # The messages reappear when their visibility timeout ends; effects are idempotent.
            log.warning("could not record final state", queue=self.queue, error=str(exc))

    # -- one job ---------------------------------------------------------------------
    async def _process(self, message: Message, worker: trio.CancelScope) -> None:
        started = trio.current_time()
        bus = self.bus
        msg_id = message.msg_id
        finished = True
        try:
            bus.publish("job.started", self.queue, msg_id, message.attempt)
            self._deadlines[msg_id] = (started + self.processor.timeout_s, worker, started)
            try:
                try:
                    if message.attempt > self.max_deliveries:
                        raise PermanentError(
                            f"delivered {message.attempt} times without an outcome; "
                            "it may crash its worker")
                    await self.processor.handle(self.processor.parse(message))
                finally:
                    self._deadlines.pop(msg_id, None)  # from here on, no timeout applies
            except PermanentError as exc:
                await self._dead_letter(message, str(exc), started)
            except RetryLater as exc:
                await self._retry(message, str(exc), started, exc.delay_s, counts=False)
            except RetryableError as exc:
                await self._retry(message, describe_error(exc), started, exc.delay_s,
                                  outage=exc.outage)
            except DatabaseUnavailable as exc:
                await self._retry(message, describe_error(exc), started, outage=True)
            except Exception as exc:
                await self._retry(message, describe_error(exc), started)
            else:
                self._done.append(msg_id)
                bus.publish("job.succeeded", self.queue, msg_id, message.attempt, _ms(started))
        except trio.Cancelled:
            if self._timed_out is not None and self._timed_out[0] is message:
                finished = False  # the worker records the retry, then finishes it
            else:
                self._release.append(msg_id)  # shutting down: visible again at once
            raise
        finally:
            if finished:
                self._job_done(message)

    def _job_done(self, message: Message) -> None:
        del self._in_flight[message.msg_id]
        if len(self._in_flight) <= self._signal_at_in_flight:
            self._signal.set()

    async def _retry(self, message: Message, error: str, started: float,
                     delay_s: int | None = None, *, outage: bool = False,
                     counts: bool = True) -> None:
        policy = self.cfg.policy
        if counts and policy.exhausted(message.attempt, outage=outage):
            await self._dead_letter(message, f"{error} (gave up after {message.attempt} "
                                    "attempts)", started)
            return
        delay = delay_s if delay_s is not None else policy.delay_s(message.attempt)
        # If the database is down, it reappears when its visibility timeout ends.
        with contextlib.suppress(DatabaseUnavailable):
            await self.db.run(lambda c: queues.set_vt(c, self.queue, [message.msg_id], delay))
        self.bus.publish("job.retrying", self.queue, message.msg_id, message.attempt,
                         _ms(started), error, retry_in_s=delay)

    async def _dead_letter(self, message: Message, error: str, started: float) -> None:
        try:
            await self.db.run(lambda c: queues.dead_letter(c, message, error))
        except DatabaseUnavailable as exc:
            log.warning("could not dead-letter; it will be delivered again", queue=self.queue,
                        msg_id=message.msg_id, error=str(exc))
            return
        self.bus.publish("job.dead_lettered", self.queue, message.msg_id, message.attempt,
                         _ms(started), error)

    async def _watch(self) -> None:
        """Cancel jobs past their timeout; extend the leases of long ones.

        Extending the visibility timeout of a job that runs long keeps a second
        worker (or replica) from being handed the same message.
        """
        vt = self.cfg.visibility_timeout_s
        lease_every = max(0.5, vt / 3)
        tick = min(lease_every, max(0.05, self.processor.timeout_s / 5))
        next_lease = trio.current_time() + lease_every
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            for msg_id, (deadline, worker, started) in list(self._deadlines.items()):
                if now >= deadline and self._timed_out is None:
                    self._timed_out = (self._in_flight[msg_id][0], started)
                    del self._deadlines[msg_id]
                    worker.cancel()
            if now < next_lease:
                continue
            next_lease = now + lease_every
            ids = [i for i, (_, t0) in self._in_flight.items() if now - t0 >= lease_every]
            if ids:
                try:
                    await self.db.run(partial(queues.set_vt, queue=self.queue, ids=ids, seconds=vt))
                except DatabaseUnavailable as exc:
                    log.warning("could not extend leases", queue=self.queue, error=str(exc))


def _ms(started: float) -> float:
    return round((trio.current_time() - started) * 1000, 3)
