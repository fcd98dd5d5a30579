"""`reactor run` in-process: wake-ups, the failure policy, leases, shutdown, replicas."""

from __future__ import annotations

import gc
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from typing import Any

import psycopg
import trio

from reactor.clinic.analytics import AnalyticsProcessor
from reactor.clinic.app import build
from reactor.engine.db import Database
from reactor.engine.events import Event
from reactor.engine.processor import Processor
from reactor.engine.queues import Message
from reactor.engine.runtime import Reactor
from tests.harness import (
    eventually,
    of_type,
    processor_context,
    running_reactor,
    scripted_processor,
    send,
    settings_for,
    sql,
    wait_for,
)


async def test_message_is_handled_at_once_with_the_poll_at_60s(database_url: str) -> None:
    async with running_reactor(database_url) as reactor:
        with reactor.bus.subscribe() as sub:
            msg_id = await send(database_url, "analytics_queue", {"event": "signup"})
            # The fallback poll is 60 s: only the NOTIFY can make this happen in time.
            await wait_for(sub, of_type("job.succeeded", msg_id), within_s=20)
    rows = await sql(database_url, "SELECT event, source_msg_id FROM public.analytics_events")
    assert rows == [("signup", msg_id)]
    archived = await sql(database_url, "SELECT msg_id FROM pgmq.a_analytics_queue")
    assert archived == [(msg_id,)]


async def test_a_long_running_reactor_keeps_its_startup_heap_out_of_full_collections(
        database_url: str) -> None:
    """`reactor run` (freeze_heap): once started, a full garbage collection walks only
    what was allocated since, not the ~100k objects of the startup heap (a full
    collection of those stopped the process for ~60 ms, and a wake-up with it)."""
    reactor = Reactor(build(settings_for(database_url)), freeze_heap=True)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(reactor.run, handle_signals=False))
            frozen, walked = gc.get_freeze_count(), len(gc.get_objects())
            with reactor.bus.subscribe() as sub:  # and it works on as before
                msg_id = await send(database_url, "analytics_queue", {"event": "signup"})
                await wait_for(sub, of_type("job.succeeded", msg_id), within_s=20)
            reactor.stop()
    finally:
        gc.unfreeze()  # this test process builds many reactors
    assert frozen > 50_000, frozen
    assert walked < frozen / 5, (frozen, walked)


async def test_without_notifications_the_poll_still_drains(database_url: str) -> None:
    async with running_reactor(database_url, WORKER_INTERVAL_MS=300) as reactor:
        with reactor.bus.subscribe() as sub:
            ids = [await send(database_url, "analytics_queue", {"event": "quiet"}, notify=False)
                   for _ in range(3)]
            seen: list[Event] = []

            def succeeded(event: Event) -> bool:
                seen.append(event)
                return bool(event["type"] == "job.succeeded")
            done = await wait_for(sub, succeeded, count=3, within_s=15)
    assert sorted(e["msg_id"] for e in done) == ids
    assert [e for e in seen if e["type"] == "wakeup"] == []  # no NOTIFY: the poll found them
    assert await sql(database_url, "SELECT source_msg_id FROM public.analytics_events "
                                   "ORDER BY source_msg_id") == [(i,) for i in ids]


async def test_transient_failure_is_retried_with_backoff_then_succeeds(database_url: str) -> None:
    processor = scripted_processor()
    async with running_reactor(database_url, {processor.queue: processor}) as reactor:
        with reactor.bus.subscribe() as sub:
            msg_id = await send(database_url, processor.queue, {"fail_times": 2})
            retries = await wait_for(sub, of_type("job.retrying", msg_id), count=2, within_s=30)
            [done] = await wait_for(sub, of_type("job.succeeded", msg_id), within_s=30)
    assert [e["attempt"] for e in retries] == [1, 2]
    assert "scripted failure 1" in retries[0]["error"]
    # Exponential: base 1 s then 2 s (jitter ±20 %, whole seconds).
    assert retries[0]["retry_in_s"] == 1
    assert retries[1]["retry_in_s"] == 2
    assert done["attempt"] == 3
    assert processor.seen == [(msg_id, 1), (msg_id, 2), (msg_id, 3)]


async def test_permanent_error_goes_to_the_dlq_at_once_with_its_reason(database_url: str) -> None:
    async with running_reactor(database_url) as reactor:
        with reactor.bus.subscribe() as sub:
            msg_id = await send(database_url, "analytics_queue", {"user_id": "not-a-uuid"})
            [event] = await wait_for(sub, of_type("job.dead_lettered", msg_id))
    assert event["attempt"] == 1
    assert "event: Field required" in event["error"]
    [(letter,)] = await sql(database_url, "SELECT message FROM pgmq.q_analytics_queue_dlq")
    assert letter["original"] == {"user_id": "not-a-uuid"}
    assert letter["source_msg_id"] == msg_id
    assert letter["attempts"] == 1
    assert "user_id" in letter["error"]
    assert letter["failed_at"]
    assert await sql(database_url, "SELECT count(*) FROM pgmq.q_analytics_queue") == [(0,)]
    assert await sql(database_url, "SELECT msg_id FROM pgmq.a_analytics_queue") == [(msg_id,)]


async def test_missing_row_is_permanent(database_url: str) -> None:
    async with running_reactor(database_url) as reactor:
        with reactor.bus.subscribe() as sub:
            msg_id = await send(database_url, "analytics_queue", {
                "event": "x", "user_id": "00000000-0000-0000-0000-00000000dead"})
            [event] = await wait_for(sub, of_type("job.dead_lettered", msg_id))
    assert "does not exist in public.profiles" in event["error"]


async def test_a_burst_of_events_shares_commits_and_a_missing_user_fails_its_job_alone(
        database_url: str) -> None:
    """The analytics rows of the jobs running at one moment go in one INSERT (rows of one
    statement share their xmin); a row whose user is not in public.profiles is left
    out and only its job is dead-lettered; every other event is recorded once."""
    ghost = "00000000-0000-0000-0000-00000000dead"

    async def all_recorded() -> bool:
        return await sql(database_url, "SELECT count(*) FROM public.analytics_events") \
            == [(199,)]

    async with running_reactor(database_url) as reactor:
        with reactor.bus.subscribe() as sub:
            await sql(database_url, "SELECT public.enqueue('analytics_queue', CASE WHEN "
                      "i = 77 THEN jsonb_build_object('event', 'burst', 'user_id', %s::text) "
                      "ELSE jsonb_build_object('event', 'burst', 'properties', "
                      "jsonb_build_object('n', i)) END) FROM generate_series(1, 200) AS i",
                      (ghost,))
            [dead] = await wait_for(sub, of_type("job.dead_lettered"))
            await eventually(all_recorded)
    assert "does not exist in public.profiles" in dead["error"]
    [(rows, commits, distinct_n)] = await sql(
        database_url, "SELECT count(*), count(DISTINCT xmin::text), "
        "count(DISTINCT properties->>'n') FROM public.analytics_events")
    assert (rows, distinct_n) == (199, 199)
    assert commits < rows, "each event was committed on its own"
    assert await sql(database_url, "SELECT count(*) FROM pgmq.q_analytics_queue") == [(0,)]
    assert await sql(database_url, "SELECT count(*) FROM pgmq.q_analytics_queue_dlq") == [(1,)]


async def test_an_event_the_database_refuses_fails_alone_not_its_batch(
        database_url: str) -> None:
    """A number jsonb keeps but JSON cannot carry (1e400 + 0.5: Python reads inf, which
    jsonb refuses) fails the batch's INSERT: its rows are then written one by one, so
    only that event is dead-lettered, at once; none of its neighbours even retries."""
    async with running_reactor(database_url, MAX_ATTEMPTS=2) as reactor:
        with reactor.bus.subscribe() as sub:
            await sql(database_url, "SELECT public.enqueue('analytics_queue', CASE WHEN "
                      "i = 77 THEN jsonb_build_object('event', 'poison', 'properties', "
                      "jsonb_build_object('v', 1e400 + 0.5)) ELSE jsonb_build_object("
                      "'event', 'burst', 'properties', jsonb_build_object('n', i)) END) "
                      "FROM generate_series(1, 200) AS i")

            async def all_recorded() -> bool:
                return await sql(database_url, "SELECT count(*) FROM "
                                 "public.analytics_events") == [(199,)]

            [dead] = await wait_for(sub, of_type("job.dead_lettered"))
            await eventually(all_recorded)
    assert "the database refused the event" in dead["error"]
    assert dead["attempt"] == 1
    # Every message, the poison one too, was delivered once: no neighbour retried.
    assert await sql(database_url, "SELECT count(*), max(read_ct) FROM "
                     "pgmq.a_analytics_queue") == [(200, 1)]
    assert await sql(database_url, "SELECT message->'original'->>'event' "
                     "FROM pgmq.q_analytics_queue_dlq") == [("poison",)]


async def test_an_event_dead_lettered_on_its_timeout_is_not_recorded_afterwards(
        database_url: str) -> None:
    """Jobs cut by their deadline while their rows wait to be written (the table locked)
    take their rows with them: once the lock goes, the next event's write does not
    record the dead-lettered ones (a replay would then record them twice)."""
    quick = type("QuickAnalytics", (AnalyticsProcessor,), {"timeout_s": 1.5})
    locker = await trio.to_thread.run_sync(lambda: psycopg.connect(database_url))
    try:
        await trio.to_thread.run_sync(
            locker.execute, "LOCK TABLE public.analytics_events IN ACCESS EXCLUSIVE MODE")
        async with running_reactor(database_url, {"analytics_queue": quick},
                                   MAX_ATTEMPTS=1) as reactor:
            with reactor.bus.subscribe() as sub:
                for n in range(5):
                    await send(database_url, "analytics_queue", {"event": f"e{n}"})
                await wait_for(sub, of_type("job.dead_lettered"), count=5, within_s=30)
                await trio.to_thread.run_sync(locker.rollback)  # the table is free again
                later = await send(database_url, "analytics_queue", {"event": "later"})
                await wait_for(sub, of_type("job.succeeded", later), within_s=30)
    finally:
        await trio.to_thread.run_sync(locker.close)
    assert await sql(database_url, "SELECT event FROM public.analytics_events") \
        == [("later",)]
    assert await sql(database_url, "SELECT count(*) FROM pgmq.q_analytics_queue_dlq") \
        == [(5,)]


async def test_max_attempts_then_dead_letter(database_url: str) -> None:
    processor = scripted_processor()
    async with running_reactor(database_url, {processor.queue: processor},
                               MAX_ATTEMPTS=2) as reactor:
        with reactor.bus.subscribe() as sub:
            msg_id = await send(database_url, processor.queue, {"fail_times": 99})
            [event] = await wait_for(sub, of_type("job.dead_lettered", msg_id), within_s=30)
    assert event["attempt"] == 2
    assert "gave up after 2 attempts" in event["error"]
    assert len(processor.seen) == 2
    [(letter,)] = await sql(database_url, "SELECT message FROM pgmq.q_analytics_queue_dlq")
    assert letter["attempts"] == 2


async def test_malformed_messages_never_stop_the_drainer(database_url: str) -> None:
    async with running_reactor(database_url) as reactor:
        with reactor.bus.subscribe() as sub:
            bad: list[Any] = ["just a string", [1, 2, 3], 42, None, {"event": ""}]
            bad_ids = [await send(database_url, "analytics_queue", b, notify=False) for b in bad]
            good = await send(database_url, "analytics_queue", {"event": "after_bad"})
            outcomes = await wait_for(
                sub, lambda e: e["type"] in ("job.dead_lettered", "job.succeeded"),
                count=len(bad) + 1)
    dead = [e for e in outcomes if e["type"] == "job.dead_lettered"]
    assert [e["msg_id"] for e in outcomes if e["type"] == "job.succeeded"] == [good]
    assert sorted(e["msg_id"] for e in dead) == sorted(bad_ids)
    assert any("not a JSON object" in e["error"] for e in dead)
    assert await sql(database_url, "SELECT event FROM public.analytics_events") == [("after_bad",)]


async def test_higher_priority_first_within_a_batch(database_url: str) -> None:
    processor = scripted_processor(concurrency=1)
    priorities = [0, 5, 1, 9, 5, 3]
    ids = [await send(database_url, processor.queue, {"priority": p}, notify=False)
           for p in priorities]
    async with running_reactor(database_url, {processor.queue: processor},
                               MAX_TASKS_PER_CYCLE=10) as reactor:
        with reactor.bus.subscribe() as sub:
            reactor.drainers[processor.queue].wake()
            await wait_for(sub, of_type("job.succeeded"), count=len(ids))
    by_id = dict(zip(ids, priorities, strict=True))
    handled = [by_id[msg_id] for msg_id, _ in processor.seen]
    assert handled == sorted(priorities, reverse=True)
    # FIFO within one priority.
    fives = [msg_id for msg_id, _ in processor.seen if by_id[msg_id] == 5]
    assert fives == sorted(fives)


async def test_long_job_keeps_its_lease_and_no_replica_takes_it(database_url: str) -> None:
    processor = scripted_processor()
    processors = {processor.queue: processor}
    # The job lasts 2.5 leases (6 s each, renewed every 2 s); the second replica polls
    # every 100 ms all the while. A renewal may come 4 s late before the lease lapses: a
    # 3 s lease lapsed once when a loaded machine starved this test's process for 2 s.
    async with running_reactor(database_url, processors, VISIBILITY_TIMEOUT_S=6,
                               WORKER_INTERVAL_MS=100) as first:
        with first.bus.subscribe() as sub:
            msg_id = await send(database_url, processor.queue, {"sleep_s": 15})
            await wait_for(sub, of_type("job.started", msg_id))
            async with running_reactor(database_url, processors, VISIBILITY_TIMEOUT_S=6,
                                       WORKER_INTERVAL_MS=100):
                await wait_for(sub, of_type("job.succeeded", msg_id), within_s=45)
    assert processor.seen == [(msg_id, 1)]  # the second replica never got it
    assert len(processor.per_instance) == 1


async def test_stuck_job_is_cancelled_at_the_timeout_and_retried(database_url: str) -> None:
    processor = scripted_processor(timeout_s=0.5)
    async with running_reactor(database_url, {processor.queue: processor}) as reactor:
        with reactor.bus.subscribe() as sub:
            msg_id = await send(database_url, processor.queue, {"hang_first": True})
            [retry] = await wait_for(sub, of_type("job.retrying", msg_id))
            [done] = await wait_for(sub, of_type("job.succeeded", msg_id), within_s=30)
    assert retry["error"] == "timed out after 0.5s"
    assert done["attempt"] == 2


async def test_stop_lets_in_flight_jobs_finish_within_grace(database_url: str) -> None:
    processor = scripted_processor()
    async with running_reactor(database_url, {processor.queue: processor},
                               SHUTDOWN_GRACE_S=5) as reactor:
        with reactor.bus.subscribe() as sub:
            msg_id = await send(database_url, processor.queue, {"sleep_s": 0.5})
            await wait_for(sub, of_type("job.started", msg_id))
            reactor.stop()
            await wait_for(sub, of_type("job.succeeded", msg_id))
    assert processor.finished == [msg_id]
    assert await sql(database_url, "SELECT msg_id FROM pgmq.a_analytics_queue") == [(msg_id,)]


async def test_after_grace_jobs_are_cancelled_and_visible_again_at_once(
        database_url: str) -> None:
    processor = scripted_processor()
    async with running_reactor(database_url, {processor.queue: processor},
                               SHUTDOWN_GRACE_S=0.3, VISIBILITY_TIMEOUT_S=300) as reactor:
        with reactor.bus.subscribe() as sub:
            msg_id = await send(database_url, processor.queue, {"sleep_s": 60})
            await wait_for(sub, of_type("job.started", msg_id))
            reactor.stop()
    assert processor.finished == []
    [(read_ct, visible)] = await sql(
        database_url, "SELECT read_ct, vt <= clock_timestamp() FROM pgmq.q_analytics_queue")
    assert read_ct == 1
    assert visible  # not 300 s later: released on the way out


async def test_replicas_handle_every_message_once_at_its_first_attempt(
        database_url: str) -> None:
    """Three reactors drain one queue, each reading ahead: every message is handled exactly
    once, at its first attempt (none lost, none twice), the work is shared, and the queue
    ends empty with every message archived."""
    total = 3000
    processor = scripted_processor(concurrency=20, expected=total)
    processors: dict[str, type[Processor[Any]]] = {processor.queue: processor}
    async with (running_reactor(database_url, processors, MAX_TASKS_PER_CYCLE=25),
                running_reactor(database_url, processors, MAX_TASKS_PER_CYCLE=25),
                running_reactor(database_url, processors, MAX_TASKS_PER_CYCLE=25)):
        # All three are listening before the burst: its one NOTIFY wakes them together.
        ids = [int(msg_id) for (msg_id,) in await sql(
            database_url, "SELECT public.enqueue('analytics_queue', "
            "jsonb_build_object('n', i)) FROM generate_series(1, %s) AS i", (total,))]
        with trio.fail_after(120):
            await processor.all_done.wait()
    per_replica = list(processor.per_instance.values())
    assert sorted(processor.seen) == [(i, 1) for i in sorted(ids)]  # each once, at attempt 1
    assert sum(per_replica) == total
    assert sum(1 for n in per_replica if n > 0) >= 2, per_replica  # the work was shared
    assert await sql(database_url, "SELECT count(*) FROM pgmq.q_analytics_queue") == [(0,)]
    assert await sql(database_url, "SELECT count(*) FROM pgmq.a_analytics_queue") == [(total,)]


async def test_analytics_redelivery_adds_no_second_row(database_url: str) -> None:
    """A crash between the INSERT and the archive: the redelivered message adds nothing."""
    msg_id = await send(database_url, "analytics_queue", {"event": "once"}, notify=False)
    [(body,)] = await sql(database_url, "SELECT message FROM pgmq.q_analytics_queue")
    delivery = Message("analytics_queue", msg_id, 1, datetime.now(UTC), body)
    async with Database(database_url).opened() as db:
        processor = AnalyticsProcessor(
            processor_context("analytics_queue", db, settings_for(database_url)))
        await processor.handle(processor.parse(delivery))
        await processor.handle(processor.parse(replace(delivery, attempt=2)))  # redelivered
    assert await sql(database_url, "SELECT count(*) FROM public.analytics_events") == [(1,)]
