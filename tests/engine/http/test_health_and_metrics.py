"""/metrics and /healthz: the counters move, strangers learn only the reason class, and
/healthz is 503 while the database does not answer."""

from __future__ import annotations

import os
import signal

import httpx
import trio

from reactor.engine.pgcluster import PgCluster
from tests.harness import (
    eventually,
    of_type,
    running_reactor,
    send,
    sql,
    wait_for,
)


async def test_metrics_move_and_health_tells_strangers_only_the_reason_class(
        private_cluster: PgCluster) -> None:
    db_url = private_cluster.url()
    async with running_reactor(db_url, LISTENER_PROBE_S=1, FEED_TOKEN="t0ken-123") as reactor, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        with reactor.bus.subscribe() as sub:
            msg_id = await send(db_url, "analytics_queue", {"event": "counted"})
            await wait_for(sub, of_type("job.succeeded", msg_id))
        metrics = (await http.get("/metrics")).text
        assert 'reactor_jobs_total{outcome="succeeded",queue="analytics_queue"} 1.0' in metrics
        assert "reactor_listener_connected 1.0" in metrics
        assert "reactor_job_duration_seconds_count" in metrics
        health = await http.get("/healthz")
        assert (health.status_code, health.json()) == (200, {"status": "ok", "reasons": []})

        with reactor.bus.subscribe() as sub:
            await trio.to_thread.run_sync(private_cluster.stop)
            await wait_for(sub, of_type("listener.lost"), within_s=30)
        health = await http.get("/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "unhealthy"
        assert "listener_down" in health.json()["reasons"]
        assert set(health.json()) == {"status", "reasons"}  # no database error for strangers
        detailed = (await http.get("/healthz", headers={"Authorization": "Bearer t0ken-123"}
                                   )).json()
        assert "LISTEN connection is down" in detailed["detail"]
        assert "reactor_listener_connected 0.0" in (await http.get("/metrics")).text
        await trio.to_thread.run_sync(private_cluster.start)


async def test_healthz_is_503_while_the_database_does_not_answer_and_ok_after(
        database_url: str) -> None:
    """The listener is connected, but the reactor's query connections hang (their server
    processes are stopped with SIGSTOP, and so is the postmaster: a connection opened
    meanwhile hangs too): /healthz answers 503 in bounded time, then 200 once they
    answer again."""
    async with running_reactor(database_url, FEED_TOKEN="t0ken-123") as reactor, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{reactor.http_port}",
                              timeout=30) as http:
        assert (await http.get("/healthz")).status_code == 200
        pids = [pid for (pid,) in await sql(
            database_url, "SELECT pid FROM pg_stat_activity WHERE application_name = 'reactor'")]
        assert pids
        stat = await trio.Path(f"/proc/{pids[0]}/stat").read_text(encoding="ascii")
        postmaster = int(stat.rsplit(")", 1)[1].split()[1])  # the backend's parent
        stopped = [postmaster, *pids]
        try:
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)
            health = await http.get("/healthz")
            detailed = (await http.get("/healthz", headers={
                "Authorization": "Bearer t0ken-123"})).json()
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
        assert reactor.listener.connected
        assert health.status_code == 503
        assert health.json() == {"status": "unhealthy", "reasons": ["database_unreachable"]}
        assert "the database did not answer within" in detailed["detail"]

        async def ok() -> bool:
            return (await http.get("/healthz")).status_code == 200
        await eventually(ok, within_s=60, every_s=0.1)
