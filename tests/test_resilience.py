"""The listener and drainers survive a killed connection and a Postgres restart."""

from __future__ import annotations

import trio

from reactor.pgcluster import PgCluster
from tests.harness import of_type, running_reactor, send, sql, wait_for


async def test_terminated_listener_reconnects_and_drains(database_url: str) -> None:
    async with running_reactor(database_url, LISTENER_PROBE_S=1) as reactor:
        with reactor.bus.subscribe() as sub:
            await sql(database_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                    "WHERE application_name = 'reactor listener'")
            await wait_for(sub, of_type("listener.lost"))
            await wait_for(sub, of_type("listener.connected"))
            msg_id = await send(database_url, "analytics_queue", {"event": "after"})
            await wait_for(sub, of_type("job.succeeded", msg_id), within_s=3)
    assert await sql(database_url, "SELECT event FROM public.analytics_events") == [("after",)]


async def test_message_committed_while_listener_was_down_is_drained(database_url: str) -> None:
    async with running_reactor(database_url) as reactor:
        with reactor.bus.subscribe() as sub:
            await sql(database_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                    "WHERE application_name = 'reactor listener'")
            # The NOTIFY of this one may reach nobody; the drain after reconnect finds it.
            msg_id = await send(database_url, "analytics_queue", {"event": "gap"})
            await wait_for(sub, of_type("job.succeeded", msg_id), within_s=5)


async def test_postgres_restart_is_survived_without_restarting_the_reactor(
        private_cluster: PgCluster) -> None:
    url = private_cluster.url()
    async with running_reactor(url, LISTENER_PROBE_S=1) as reactor:
        with reactor.bus.subscribe() as sub:
            first = await send(url, "analytics_queue", {"event": "before"})
            await wait_for(sub, of_type("job.succeeded", first))
            await trio.to_thread.run_sync(private_cluster.restart)
            await wait_for(sub, of_type("listener.lost"), within_s=10)
            await wait_for(sub, of_type("listener.connected"), within_s=20)
            second = await send(url, "analytics_queue", {"event": "after"})
            await wait_for(sub, of_type("job.succeeded", second), within_s=10)
    rows = await sql(url, "SELECT event FROM public.analytics_events ORDER BY occurred_at")
    assert rows == [("before",), ("after",)]


async def test_postgres_down_for_a_while_loses_nothing(private_cluster: PgCluster) -> None:
    url = private_cluster.url()
    async with running_reactor(url, LISTENER_PROBE_S=1, WORKER_INTERVAL_MS=500) as reactor:
        with reactor.bus.subscribe() as sub:
            await trio.to_thread.run_sync(private_cluster.stop)
            await wait_for(sub, of_type("listener.lost"), within_s=10)
            await trio.sleep(1.5)  # the drainers and the listener retry meanwhile
            await trio.to_thread.run_sync(private_cluster.start)
            await wait_for(sub, of_type("listener.connected"), within_s=20)
            msg_id = await send(url, "analytics_queue", {"event": "back"})
            await wait_for(sub, of_type("job.succeeded", msg_id), within_s=10)
