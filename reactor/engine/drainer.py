"""One drainer per queue: read a batch, run the handlers, record the outcomes,
repeat until the queue is empty; then sleep until a wake-up, the next visible
message, or the fallback poll.

Reads and the bookkeeping of finished jobs are batched and share trips to a
worker thread, so a burst of notifications costs a few reads, not one read
per notification. Failures follow the policy of DESIGN.md: permanent → dead
letter now; "not yet" (RetryLater) → the same body again later as a new
message; "not now" from the other side (Deferred) → the same, announced as
`job.deferred`, not as a failure; anything else → retry with backoff through
pgmq.set_vt, dead letter after MAX_ATTEMPTS deliveries.

Two rules keep it standing:
- A job's outcome is *settled* exactly once, synchronously, by whoever sees it
  first (its worker, the timeout, the shutdown): settling only appends to the
  drainer's lists, and the read loop writes them to the database. A job that
  finishes after its timeout (a shielded SMTP conversation) is therefore
  counted once, whatever order things happen in. `job.succeeded`,
  `job.retrying` and `job.dead_lettered` are published once the database has
  the outcome (the archive, the retry, the dead letter), so a success announced
  is archived and a dead letter announced is one `reactor dlq` can see.
- No database error of the drainer's own bookkeeping ends it: each is reported
  to Health (logged once, published, shown on /healthz), waited out with
  capped backoff, and the bookkeeping is kept until the database takes it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timezone, tzinfo
from functools import partial
from typing import Any, TypeVar

import psycopg
import structlog
import trio

from reactor.engine import queues
from reactor.engine.db import Database, DatabaseUnavailable, describe_db_error
from reactor.engine.events import EventBus, Succeeded
from reactor.engine.health import Health
from reactor.engine.processor import (
    Deferred,
    PermanentError,
    Processor,
    RetryableError,
    RetryLater,
)
from reactor.engine.queues import Message, Outcome
from reactor.engine.retry import RetryPolicy

__all__ = ["DrainSettings", "Drainer"]

log = structlog.get_logger("reactor.drainer")

T = TypeVar("T")

# After a failed database call the drainer waits this long, doubling, up to the cap.
DB_BACKOFF_START_S = 0.1
DB_BACKOFF_MAX_S = 10.0
# When another replica holds the visible rows for an instant, do not spin.
MIN_IDLE_S = 0.05
# Finished messages are archived at least this often while others still run.
FLUSH_EVERY_S = 1.0
# A worker runs up to this many waiting jobs in a row before it yields to the scheduler.
WORKER_RUN = 16
# On the way out, the last bookkeeping may take this long before it is given up
# (what it would have recorded is redelivered later: effects are idempotent).
FINAL_FLUSH_S = 5.0


@dataclass(frozen=True)
class DrainSettings:
    batch_size: int
    visibility_timeout_s: int
    poll_interval_s: float
    policy: RetryPolicy
    # Deliveries that ended with no outcome (the worker crashed or was killed while it
    # held the message) after which a message is dead-lettered as a likely crasher.
    max_lost_deliveries: int = 3


# An error text is stored (dead letters, job_failures) and shown: bounded and clean.
MAX_ERROR_CHARS = 2000


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def clean_error(text: str) -> str:
    """What Postgres can store: no NUL, no lone surrogate (they may come from a provider's
    answer or a message body quoted in the reason), and not unbounded."""
    text = text.replace("\x00", "\\0").encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 1] + "…"


@dataclass(eq=False, slots=True)
class _Job:
    """One delivery, from the read until its outcome is settled."""

    message: Message
    read_at: float
    started: float | None = None
    # A first delivery: how long it waited from enqueue to start (the number families
    # feel); None for a retry, whose wait includes its backoff.
    wait_ms: float | None = None
    deadline: float = math.inf
    worker: trio.CancelScope | None = None
    timed_out: bool = False
    settled: bool = False
    # Its worker's scope was cancelled (a timeout, an orphan): after it, the worker passes
    # a checkpoint (the cancellation ends that scope) before it takes another job.
    cancelled: bool = False
    # A success: how long its handler ran, ms (not rounded), for its job.succeeded.
    duration_ms: float = 0.0


class Drainer:
    """Drains one queue with one processor. Owned by the Reactor's nursery.

    `concurrency` long-lived workers take jobs from a queue (`_ready`) that the
    read loop fills, highest priority first. Up to two batches beyond the busy
    workers may wait there (prefetched, their leases kept alive): priority
    decides what runs next even when every worker is busy, and the next batch
    is read while the workers still have one to work on, so a busy queue never
    waits for the database's round trip.
    """

    def __init__(self, processor: Processor[Any], db: Database, bus: EventBus,
                 settings: DrainSettings, health: Health | None = None) -> None:
        self.processor = processor
        self.queue = processor.queue
        self.db = db
        self.bus = bus
        self.health = health or Health()
        self.cfg = settings
        self.concurrency = max(1, processor.concurrency)
        self.max_in_flight = self.concurrency + 2 * settings.batch_size
        # Read, not started yet, in the order they run; bounded by max_in_flight (the read
        # loop reads no more than that many in flight).
        self._ready: deque[_Job] = deque()
        # Workers with nothing to do, and whether one of them was woken and has not yet
        # looked at `_ready` (see _worker).
        self._parked = trio.lowlevel.ParkingLot()
        self._waking = False
        # The run's clock (trio.current_time without its two calls of lookup); set in run().
        self._now: Callable[[], float] = trio.current_time
        # Read and not yet settled, by msg_id.
        self._jobs: dict[int, _Job] = {}
        # Settled, waiting to be written: archive / retry or release / dead-letter / requeue.
        # Succeeded, to be archived; each one's job.succeeded is published once its
        # archive committed.
        self._done: list[_Job] = []
        self._outcomes: list[Outcome] = []
        self._letters: list[Outcome] = []
        self._requeues: list[Outcome] = []
        self._wake_pending = True  # drain once at start
        self._signal = trio.Event()
        # A settled job signals the read loop only when in-flight falls to this level,
        # so a burst does not wake the read loop once per message.
        self._signal_at_in_flight = 0
        self._stopping = False
        self._workers_scope: trio.CancelScope | None = None
        self._take_scope: trio.CancelScope | None = None  # around a take, while it runs
        self._cancel_jobs = False
        self._backoff = DB_BACKOFF_START_S
        self._degraded = False
        self._take: queues.Take | None = None  # queues.take_statement, composed at first use
        self._source = f"drainer:{self.queue}"
        self.finished = trio.Event()
        self.idle = False  # waiting for a wake-up (tests and the dashboard may look)

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
        """Grace is over: cancel in-flight jobs (their messages become visible at once),
        and a take still waiting for the database (a lock, a slow server): it is
        cancelled on the server before anything is released."""
        self._cancel_jobs = True
        if self._workers_scope is not None:
            self._workers_scope.cancel()
        if self._take_scope is not None:
            self._take_scope.cancel()

    # -- the loop --------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drain until stopped; survives database outages, read-only spells and poolers."""
        self._now = trio.lowlevel.current_clock().current_time
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch)
                await nursery.start(self._run_workers)
                task_status.started()
                while not self._stopping:
                    try:
                        await self._read_loop()
                        await self._idle()
                    except DatabaseUnavailable as exc:
                        await self._db_down(exc)
                await self._finish_in_flight()
                nursery.cancel_scope.cancel()  # the workers are idle now; and _watch
        finally:
            with trio.CancelScope(shield=True) as final:
                final.deadline = trio.current_time() + FINAL_FLUSH_S
                await self._flush_final()
            self.finished.set()

    async def _run_workers(self, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The workers, in a nursery of their own: `cancel_jobs` cancels them and only
        them. The read loop and its bookkeeping are never cut by it (an abandoned read
        would still take messages in the database after their release was written)."""
        async with trio.open_nursery() as workers:
            self._workers_scope = workers.cancel_scope
            if self._cancel_jobs:
                workers.cancel_scope.cancel()
            for _ in range(self.concurrency):
                workers.start_soon(self._worker)
            task_status.started()

    async def _worker(self) -> None:
        """Run jobs one after another; come back to life after a job's timeout.

        Timeouts are enforced by `_watch` cancelling this worker's scope, not by
        a cancel scope per job: that costs more than a small job itself.

        Jobs wait in `_ready`, not in a memory channel: a channel hands each job
        to a parked receiver, one round of trio's scheduler per job (here ~12 us,
        more than a small job costs). Instead one parked worker at a time is
        woken (`_wake_one`): it takes the next job, wakes another while more
        wait, and runs up to WORKER_RUN jobs in a row before it yields. Jobs that
        await (real I/O) still start side by side, one more with each round of
        the scheduler; jobs that do not are run without a round each. A worker
        whose scope was cancelled (its job timed out or was orphaned) takes its
        next job in a fresh scope; at the end of the grace (cancel_jobs) the
        workers take no more.
        """
        ready, parked = self._ready, self._parked
        while True:
            with trio.CancelScope() as scope:
                run = 0
                while True:
                    if not ready:
                        await parked.park()
                        self._waking = False  # only a _wake_one unparks
                        run = 0
                        continue
                    if run >= WORKER_RUN:
                        await trio.lowlevel.checkpoint()  # let the others run
                        run = 0
                        continue
                    job = ready.popleft()
                    if ready:
                        self._wake_one()
                    if job.settled:  # orphaned before it started (see _orphan)
                        continue
                    job.worker = scope
                    run += 1
                    await self._process(job)
                    if job.cancelled or self._cancel_jobs:
                        await trio.lowlevel.checkpoint_if_cancelled()
            # Only _watch and _orphan cancel this scope, and its job has settled.

    def _wake_one(self) -> None:
        """Jobs wait: wake a parked worker, unless one was woken and has not run yet."""
        if not self._waking and self._parked.unpark():
            self._waking = True

    async def _finish_in_flight(self) -> None:
        """Stopping: hand back what no worker has started, wait for the rest."""
        ready = self._ready
        while ready:
            self._settle_release(ready.popleft())
        while self._jobs:
            await self._wait_signal(self.cfg.visibility_timeout_s, until_in_flight=0)

    async def _db(self, fn: Any) -> Any:
        """Run a bookkeeping statement; every database error becomes DatabaseUnavailable.

        The drainer's own statements are known good, so any error is a condition
        of the database (read-only, a pooler, a dropped pgmq, permissions):
        waited out, never allowed to end the process.
        """
        return await self._db_call(self.db.run(fn))

    async def _db_call(self, call: Awaitable[T], *, recovers: bool = True) -> T:
        """`_db` for any database call: `Database.run` in a thread, or `Database.fetch` on
        a trio-native connection (the hot statement). A success ends an outage
        (health cleared, backoff reset) unless `recovers` is False: a read that
        works on a database that refuses writes proves nothing."""
        try:
            result = await call
        except psycopg.Error as exc:
            raise DatabaseUnavailable(describe_db_error(exc, self.db.url),
                                      "database_error") from exc
        if self._degraded and recovers:
            self._degraded = False
            self._backoff = DB_BACKOFF_START_S
            self.health.clear(self._source)
        return result

    async def _db_down(self, exc: DatabaseUnavailable) -> None:
        """Report, back off (capped, doubling), then look again."""
        self._degraded = True
        self._take = None  # composed again: the queue (or pgmq) may have been recreated
        self.health.report(self._source, exc.reason, str(exc))
        log.debug("database unavailable", queue=self.queue, error=str(exc),
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
        due = await self._db(lambda c: queues.next_visible_in(c, self.queue))
        if due is not None:
            timeout = min(timeout, max(due, MIN_IDLE_S))
        self.idle = True  # nothing more will be read until a wake-up, a due message, the poll
        try:
            await self._wait_signal(timeout)
        finally:
            self.idle = False
        if not self._stopping:
            self._wake_pending = True  # woken, due, or poll: look again

    async def _read_loop(self) -> None:
        """Read and dispatch until the queue is empty and every job has settled."""
        batch = self.cfg.batch_size
        threshold = min(batch, self.max_in_flight - 1)  # read whole batches
        empty = False
        while not self._stopping:
            if empty and not self._wake_pending:
                if not self._jobs:
                    await self._flush()
                    return
                # Record what finished at least every FLUSH_EVERY_S while the rest run.
                await self._wait_signal(FLUSH_EVERY_S, until_in_flight=0)
                await self._flush()
                continue
            free = self.max_in_flight - len(self._jobs)
            if free < threshold:
                await self._wait_signal(FLUSH_EVERY_S,
                                        until_in_flight=self.max_in_flight - threshold)
                continue
            self._wake_pending = False
            messages = await self._flush(read=min(batch, free))
            empty = not messages
            self._dispatch(messages)
            await trio.lowlevel.checkpoint()

    def _dispatch(self, messages: list[Message]) -> None:
        """Hand new messages to the workers: together with those read earlier that no
        worker has started yet, highest priority first (FIFO within a priority)."""
        if not messages:
            return
        now = self._now()
        jobs = []
        for message in messages:
            held = self._jobs.get(message.msg_id)
            if held is not None:
                if held.message.enqueued_at == message.enqueued_at:
                    # Its lease ran out while the database was away and we read it again:
                    # the job that holds it here settles it. Keep the new lease, and count
                    # this delivery as accounted for (it is not a crash).
                    self._outcomes.append(Outcome(message, self.cfg.visibility_timeout_s,
                                                  None))
                    continue
                self._orphan(held)
            job = _Job(message, now)
            self._jobs[message.msg_id] = job
            jobs.append(job)
        ready = self._ready  # no await from here on: no worker sees a partial state
        if ready:  # (less those orphaned meanwhile: every job left there is in _jobs)
            jobs.extend(job for job in ready if not job.settled)
            ready.clear()
        if len(jobs) > 1:
            jobs.sort(key=lambda j: (-j.message.priority, j.message.msg_id))
        ready.extend(jobs)  # bounded: the read loop keeps in flight under max_in_flight
        self._wake_one()

    def _orphan(self, job: _Job) -> None:
        """The queue was dropped and recreated under this job (pgmq numbers messages from 1
        again, and a new message came with its id): its message is gone with the old
        queue, and nothing recorded for it may touch the new one. Stopped, never settled."""
        log.warning("queue recreated under a running job: that job is stopped (its "
                    "message went with the old queue)", queue=self.queue,
                    msg_id=job.message.msg_id)
        job.settled = True
        del self._jobs[job.message.msg_id]
        if job.started is not None and job.worker is not None:
            job.cancelled = True
            job.worker.cancel()

    async def _flush(self, read: int = 0) -> list[Message]:
        """Write what settled (and read up to `read` more messages in the same trip).

        Each list is emptied only after the database took it, so an outage loses
        nothing: the next flush writes it (every write here is idempotent).
        After an outage the leases of running jobs are renewed first: they may
        have run out meanwhile, and the read must not hand them out again.
        """
        if self._degraded and self._jobs:
            ids = list(self._jobs)
            vt = self.cfg.visibility_timeout_s
            await self._db(partial(queues.set_vt, queue=self.queue, ids=ids, seconds=vt))
        if self._outcomes:
            outcomes = self._outcomes[:]
            await self._db(lambda c: queues.record_outcomes(c, self.queue, outcomes))
            del self._outcomes[:len(outcomes)]
            for o in outcomes:
                if o.error is not None:  # a release at shutdown is not news
                    self._publish_retry(o)
        while self._letters:
            letter = self._letters[0]
            stamp = self.processor.dead_letter_stamp(letter.message)
            dlq_msg_id = await self._db(partial(queues.dead_letter, msg=letter.message,
                                                error=letter.error or "", stamp=stamp))
            self._letters.pop(0)
            self.bus.publish("job.dead_lettered", self.queue, letter.message.msg_id,
                             letter.message.attempt, _r3(letter.duration_ms), letter.error,
                             dlq_msg_id=dlq_msg_id, wait_ms=_r3(letter.wait_ms),
                             settle_ms=_since(letter.started, trio.current_time()))
        while self._requeues:
            again = self._requeues[0]
            new_id = await self._db(partial(queues.requeue, msg=again.message,
                                            delay_s=again.delay_s, stamp=again.stamp,
                                            deferred=again.deferred))
            self._requeues.pop(0)
            if again.deferred:
                self.bus.publish("job.deferred", self.queue, again.message.msg_id,
                                 again.message.attempt, _r3(again.duration_ms), again.error,
                                 retry_in_s=again.delay_s, requeued_as=new_id,
                                 wait_ms=_r3(again.wait_ms),
                                 settle_ms=_since(again.started, trio.current_time()))
            else:
                self._publish_retry(again)
        if self._stopping:
            read = 0  # what was just released (set visible) must not be read back in
        done, self._done = self._done, []
        ids = [job.message.msg_id for job in done]
        try:
            if read:
                vt = self.cfg.visibility_timeout_s
                if self._take is None:
                    # Composing it reads the catalog: that it works says nothing of the
                    # take (a read-only database), so it does not count as recovery.
                    self._take = await self._db_call(self.db.run(partial(
                        queues.take_statement, queue=self.queue, vt=vt,
                        batch=self.cfg.batch_size)), recovers=False)
                scope = self._take_scope = trio.CancelScope()
                try:
                    with scope:
                        taken = await self._db_call(queues.archive_then_read(
                            self.db, self._take, self.queue, ids, vt, read))
                        self._publish_succeeded(done)
                        return taken
                finally:
                    self._take_scope = None
                # Cut at the end of the grace (cancel_jobs), cancelled on the server.
                self._done[:0] = done
                return []
            if ids:
                await self._db_call(queues.archive_fast(self.db, self.queue, ids))
            self._publish_succeeded(done)
            return []
        except BaseException:
            self._done[:0] = done  # archived next time (archive is idempotent)
            raise

    def _publish_succeeded(self, succeeded: list[_Job]) -> None:
        """job.succeeded for the jobs of one archive: one call for the batch (the bus
        builds an event per job only when someone would see it)."""
        if not succeeded:
            return
        now = self._now()
        self.bus.publish_succeeded(self.queue, [
            Succeeded(j.message.msg_id, j.message.attempt, j.duration_ms, j.wait_ms,
                      (now - _started(j)) * 1000)
            for j in succeeded])

    async def _flush_final(self) -> None:
        """On the way out: record what settled, release what never started."""
        try:
            await self._flush()
        except (DatabaseUnavailable, trio.Cancelled) as exc:
            # The messages reappear when their visibility timeout ends; effects are idempotent.
            log.warning("could not record final state; those messages will be delivered "
                        "again", queue=self.queue, error=str(exc) or "timed out")

    # -- one job ---------------------------------------------------------------------
    async def _process(self, job: _Job) -> None:
        """Run the job's handler and settle its outcome, whatever form its end takes.

        One coroutine per job (not one for the job and one for its handling): each
        level costs a coroutine and a frame per job.
        """
        message = job.message
        job.started = started = self._now()
        if message.attempt == 1:
            # Two clocks (the database's enqueue time, ours now): never below zero.
            # (Rounded only where an event is built: round(x, 3) costs ~1 us.)
            job.wait_ms = max(0.0, time.time() - _epoch_s(message.enqueued_at)) * 1000
            lost = 0  # (a first delivery has none: no property call)
        else:
            lost = message.lost_deliveries
        job.deadline = started + self.processor.timeout_s
        if self.bus.wanted("job.started"):  # nobody counts it: skipped when unseen
            self.bus.publish("job.started", self.queue, message.msg_id, message.attempt)
        try:
            if message.decode_error is not None:
                self._settle_dead(job, message.decode_error)
                return
            if lost >= self.cfg.max_lost_deliveries:
                self._settle_dead(job, f"{lost} deliveries ended with no outcome (the worker "
                                  "crashed or was killed): it may crash its worker")
                return
            try:
                await self.processor.handle(self.processor.parse(message))
            except PermanentError as exc:
                self._settle_dead(job, str(exc))
            except RetryLater as exc:
                self._settle_requeue(job, str(exc), exc.delay_s or 1, exc.stamp,
                                     deferred=isinstance(exc, Deferred))
            except RetryableError as exc:
                self._settle_failure(job, describe_error(exc), exc.delay_s, outage=exc.outage)
            except DatabaseUnavailable as exc:
                self._settle_failure(job, describe_error(exc), outage=True)
            except Exception as exc:
                self._settle_failure(job, describe_error(exc))
            else:
                if self._settle(job):
                    job.duration_ms = self._ms(job)
                    self._done.append(job)
        except BaseException:
            # Cancelled, or a group of them from a nursery inside the handler (httpx's
            # connect has one): whatever form the cancellation takes, the job settles.
            if job.timed_out:
                self._settle_failure(job, f"timed out after {self.processor.timeout_s:g}s")
            else:
                self._settle_release(job)  # shutting down: visible again at once
            raise

    # -- settling: synchronous, exactly once per delivery ---------------------------------
    def _settle(self, job: _Job) -> bool:
        """Claim the right to record this job's outcome; False if it was settled already."""
        if job.settled:
            return False
        job.settled = True
        if self._jobs.get(job.message.msg_id) is job:
            del self._jobs[job.message.msg_id]
        if len(self._jobs) <= self._signal_at_in_flight:
            self._signal.set()
        return True

    def _settle_failure(self, job: _Job, error: str, delay_s: int | None = None, *,
                        outage: bool = False) -> None:
        message = job.message
        policy = self.cfg.policy
        if policy.exhausted(message.attempt, outage=outage):
            self._settle_dead(job, f"{error} (gave up after {message.attempt} attempts)")
            return
        if not self._settle(job):
            return
        delay = delay_s if delay_s is not None else policy.delay_s(message.attempt)
        self._outcomes.append(Outcome(message, delay, clean_error(error), self._ms(job),
                                      wait_ms=job.wait_ms, started=_started(job)))

    def _settle_requeue(self, job: _Job, reason: str, delay_s: int,
                        stamp: dict[str, Any] | None = None, *, deferred: bool = False) -> None:
        if self._settle(job):
            self._requeues.append(Outcome(job.message, delay_s, clean_error(reason), self._ms(job),
                                          stamp, deferred, wait_ms=job.wait_ms,
                                          started=_started(job)))

    def _settle_dead(self, job: _Job, error: str) -> None:
        if self._settle(job):
            self._letters.append(Outcome(job.message, 0, clean_error(error), self._ms(job),
                                         wait_ms=job.wait_ms, started=_started(job)))

    def _publish_retry(self, o: Outcome) -> None:
        self.bus.publish("job.retrying", self.queue, o.message.msg_id, o.message.attempt,
                         _r3(o.duration_ms), o.error, retry_in_s=o.delay_s,
                         wait_ms=_r3(o.wait_ms),
                         settle_ms=_since(o.started, trio.current_time()))

    def _settle_release(self, job: _Job) -> None:
        """Shutting down: the message is visible again at once; not a failure."""
        if self._settle(job):
            self._outcomes.append(Outcome(job.message, 0, None))

    def _ms(self, job: _Job) -> float:
        """How long the delivery has run, ms (not rounded: see _r3)."""
        return (self._now() - _started(job)) * 1000

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
            for job in list(self._jobs.values()):
                if not job.timed_out and now >= job.deadline and job.worker is not None:
                    job.timed_out = job.cancelled = True
                    job.worker.cancel()  # the job settles itself as a retry
            if now < next_lease:
                continue
            next_lease = now + lease_every
            ids = [msg_id for msg_id, job in self._jobs.items() if now - job.read_at >= lease_every]
            if ids:
                try:
                    await self._db(partial(queues.set_vt, queue=self.queue, ids=ids, seconds=vt))
                except DatabaseUnavailable as exc:
                    self._degraded = True
                    self.health.report(self._source, exc.reason, str(exc))


# Time zones whose offset never changed: a datetime in one is a fixed distance from the
# epoch expressed in the same zone, and two datetimes that share a tzinfo subtract
# without asking it for offsets (0.4 us against 1.7 for datetime.timestamp() here, a
# cost every first delivery paid). The connections' zone is the server's TimeZone,
# UTC unless configured otherwise; any other zone takes timestamp().
_FIXED_ZONES = frozenset({"UTC", "Etc/UTC", "Etc/UCT", "Etc/Universal", "Etc/Zulu", "UCT",
                          "Universal", "Zulu", "GMT", "Etc/GMT"})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_epochs: dict[tzinfo, datetime] = {}


def _epoch_s(at: datetime) -> float:
    """`at.timestamp()`, faster where `at`'s zone has a fixed offset."""
    zone = at.tzinfo
    if zone is None:
        return at.timestamp()
    epoch = _epochs.get(zone)
    if epoch is None:
        fixed = isinstance(zone, timezone) or getattr(zone, "key", None) in _FIXED_ZONES
        if not fixed:
            return at.timestamp()
        epoch = _epochs[zone] = _EPOCH.astimezone(zone)
    return (at - epoch).total_seconds()


def _started(job: _Job) -> float:
    return job.started if job.started is not None else job.read_at


def _since(started: float | None, now: float) -> float | None:
    """Start to settle: from the handler's start until the outcome was in the database."""
    return None if started is None else round((now - started) * 1000, 3)


def _r3(ms: float | None) -> float | None:
    """A duration as events carry it (rounded to the microsecond)."""
    return None if ms is None else round(ms, 3)
