"""The listener and drainers survive a killed connection and a Postgres restart (what the
listener's own connection reads is in test_listener.py)."""

from __future__ import annotations

import os
import signal

import trio

from reactor.engine.pgcluster import PgCluster
from tests.harness import (
    eventually,
    listener_held_down,
    of_type,
    running_reactor,
    scripted_processor,
    send,
    sql,
    wait_for,
)


async def test_terminated_listener_reconnects_and_drains(database_url: str) -> None:
    async with running_reactor(database_url, LISTENER_PROBE_S=1) as reactor:
        with reactor.bus.subscribe() as sub:
            await sql(database_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                    "WHERE application_name = 'reactor listener'")
            await wait_for(sub, of_type("listener.lost"))
            await wait_for(sub, of_type("listener.connected"))
            msg_id = await send(database_url, "analytics_queue", {"event": "after"})
            await wait_for(sub, of_type("job.succeeded", msg_id), within_s=20)
    assert await sql(database_url, "SELECT event FROM public.analytics_events") == [("after",)]


async def test_message_committed_while_listener_was_down_is_drained(database_url: str) -> None:
    # The poll is 60 s: only the drain after the reconnect can find the message in time.
    async with running_reactor(database_url) as reactor:
        with reactor.bus.subscribe() as sub:
            with listener_held_down(reactor):
                await sql(database_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                        "WHERE application_name = 'reactor listener'")
                await wait_for(sub, of_type("listener.lost"))
                # The drainer has finished what the listener's start woke it for, and sleeps
                # on the 60 s poll: only a wake-up can make it read now.
                await eventually(lambda: reactor.drainers["analytics_queue"].idle)
                # Its NOTIFY reaches nobody: nothing listens now.
                msg_id = await send(database_url, "analytics_queue", {"event": "gap"})
                assert not reactor.listener.connected

                async def nobody_listens() -> bool:  # the killed backend may take a moment
                    return await sql(database_url, "SELECT count(*) FROM pg_stat_activity WHERE "
                                                   "application_name = 'reactor listener'"
                                     ) == [(0,)]
                await eventually(nobody_listens, within_s=30)
                assert not reactor.listener.connected
            events = await wait_for(sub, lambda e: e["type"] in ("listener.connected",
                                                                 "job.succeeded"),
                                    count=2, within_s=60)
    assert [e["type"] for e in events] == ["listener.connected", "job.succeeded"]
    assert events[1]["msg_id"] == msg_id


async def test_a_listener_that_died_silently_is_caught_by_its_probe(database_url: str) -> None:
    """Its server process is frozen (SIGSTOP): the socket stays open, no error ever comes,
    notifications just stop. The probe after a quiet second notices, and the listener
    reconnects; wake-ups are instant again (the poll is 60 s)."""
    async with running_reactor(database_url, LISTENER_PROBE_S=1) as reactor:
        with reactor.bus.subscribe() as sub:
            [(pid,)] = await sql(database_url, "SELECT pid FROM pg_stat_activity "
                                               "WHERE application_name = 'reactor listener'")
            os.kill(pid, signal.SIGSTOP)
            try:
                [lost] = await wait_for(sub, of_type("listener.lost"), within_s=30)
                await wait_for(sub, of_type("listener.connected"), within_s=30)
            finally:
                os.kill(pid, signal.SIGCONT)
            msg_id = await send(database_url, "analytics_queue", {"event": "after"})
            await wait_for(sub, of_type("job.succeeded", msg_id), within_s=20)
    assert "the probe notification did not come back" in lost["error"]


async def test_postgres_restart_is_survived_without_restarting_the_reactor(
        private_cluster: PgCluster) -> None:
    url = private_cluster.url()
    async with running_reactor(url, LISTENER_PROBE_S=1) as reactor:
        with reactor.bus.subscribe() as sub:
            first = await send(url, "analytics_queue", {"event": "before"})
            await wait_for(sub, of_type("job.succeeded", first))
            await trio.to_thread.run_sync(private_cluster.restart)
            await wait_for(sub, of_type("listener.lost"), within_s=30)
            await wait_for(sub, of_type("listener.connected"), within_s=20)
            second = await send(url, "analytics_queue", {"event": "after"})
            await wait_for(sub, of_type("job.succeeded", second), within_s=30)
    rows = await sql(url, "SELECT event FROM public.analytics_events ORDER BY occurred_at")
    assert rows == [("before",), ("after",)]


async def test_postgres_down_for_a_while_loses_nothing(private_cluster: PgCluster) -> None:
    """Jobs in flight and messages waiting when Postgres stops are all handled, once each,
    after it comes back; nothing is dead-lettered."""
    url = private_cluster.url()
    total = 20
    processor = scripted_processor(concurrency=2)
    async with running_reactor(url, {processor.queue: processor}, LISTENER_PROBE_S=1,
                               WORKER_INTERVAL_MS=500) as reactor:
        with reactor.bus.subscribe() as sub:
            await sql(url, "SELECT public.enqueue('analytics_queue', jsonb_build_object("
                           "'sleep_s', 0.3, 'n', i)) FROM generate_series(1, %s) AS i", (total,))
            await wait_for(sub, of_type("job.succeeded"))
            await trio.to_thread.run_sync(private_cluster.stop)
            await wait_for(sub, of_type("listener.lost"), within_s=30)
            # The drainer meets the outage too (a job settles or it reads again): reported.
            await eventually(lambda: any(f.source == "drainer:analytics_queue"
                                         for f in reactor.health.faults), within_s=30)
            assert len(processor.finished) < total  # the outage came mid-burst
            await trio.to_thread.run_sync(private_cluster.start)
            await wait_for(sub, of_type("listener.connected"), within_s=30)
            # At least once: a job that finished while the archive could not be written
            # may run again; each message is handled, none is lost.
            await eventually(lambda: len(set(processor.finished)) == total, within_s=60)
            await eventually(lambda: not reactor.health.faults, within_s=30)
    assert sorted(set(processor.finished)) == list(range(1, total + 1))
    assert await sql(url, "SELECT count(*) FROM pgmq.q_analytics_queue") == [(0,)]
    assert await sql(url, "SELECT count(DISTINCT msg_id) FROM pgmq.a_analytics_queue") == [(total,)]
    assert await sql(url, "SELECT count(*) FROM pgmq.q_analytics_queue_dlq") == [(0,)]
