"""Live feed (websocket), /metrics, /healthz, the dashboard API and `reactor watch`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import HandshakeError, open_websocket_url

from reactor.config import ConfigError
from reactor.core.app import Reactor
from reactor.pgcluster import PgCluster
from reactor.watch import format_event
from tests.harness import eventually, of_type, running_reactor, send, settings_for, wait_for


def url(reactor: Reactor, query: str = "") -> str:
    return f"ws://127.0.0.1:{reactor.feed_port}/events{query}"


async def next_events(ws: Any, count: int, within_s: float = 5) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    with trio.fail_after(within_s):
        while len(events) < count:
            events.append(json.loads(await ws.get_message()))
    return events


async def test_a_client_sees_a_job_start_and_succeed_right_after_commit(
        database_url: str) -> None:
    async with (running_reactor(database_url) as reactor,
                open_websocket_url(url(reactor, "?type=job.")) as ws):
        msg_id = await send(database_url, "analytics_queue", {"event": "live"})
        started, succeeded = await next_events(ws, 2, within_s=1)
    assert (started["type"], started["msg_id"]) == ("job.started", msg_id)
    assert (succeeded["type"], succeeded["msg_id"]) == ("job.succeeded", msg_id)
    assert set(succeeded) >= {"id", "ts", "type", "queue", "msg_id", "attempt", "duration_ms",
                              "error"}


async def test_filters_and_replay(database_url: str) -> None:
    async with running_reactor(database_url) as reactor:
        with reactor.bus.subscribe() as sub:
            first = await send(database_url, "analytics_queue", {"event": "a"})
            await wait_for(sub, of_type("job.succeeded", first))
        # The ring remembers: replay the last two job.succeeded... of analytics_queue.
        async with open_websocket_url(
                url(reactor, "?queue=analytics_queue&type=job.succ&replay=5")) as ws:
            [replayed] = await next_events(ws, 1)
            assert replayed["msg_id"] == first
            reactor.bus.publish("job.succeeded", "email_queue", 999, 1, 1.0)  # filtered out
            second = await send(database_url, "analytics_queue", {"event": "b"})
            [live] = await next_events(ws, 1)
    assert (live["type"], live["queue"], live["msg_id"]) == (
        "job.succeeded", "analytics_queue", second)


# trio-websocket's client leaves its socket to the GC when the server rejects the handshake.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_token_is_required_when_set(database_url: str) -> None:
    async with running_reactor(database_url, FEED_TOKEN="t0ken-123") as reactor:
        for query in ("", "?token=wrong"):
            with pytest.raises(HandshakeError):
                async with open_websocket_url(url(reactor, query)):
                    pass
        async with open_websocket_url(url(reactor, "?token=t0ken-123")) as ws:
            reactor.bus.publish("wakeup", "analytics_queue")
            [event] = await next_events(ws, 1)
            assert event["type"] == "wakeup"
        headers = [(b"Authorization", b"Bearer t0ken-123")]
        async with open_websocket_url(url(reactor), extra_headers=headers) as ws:
            reactor.bus.publish("wakeup", "email_queue")
            [event] = await next_events(ws, 1)
            assert event["queue"] == "email_queue"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
            assert (await http.get("/api/overview")).status_code == 401
            assert (await http.get("/api/overview?token=t0ken-123")).status_code == 200


def test_feed_refuses_a_public_address_without_a_token(database_url: str) -> None:
    with pytest.raises(ConfigError, match=r"FEED_HOST=0\.0\.0\.0 would expose"):
        Reactor(settings_for(database_url, FEED_HOST="0.0.0.0"))
    Reactor(settings_for(database_url, FEED_HOST="0.0.0.0", FEED_TOKEN="x" * 32))


def stalled_client(port: int) -> socket.socket:
    """A websocket client that completes the handshake and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 101")
    return sock


async def test_a_stalled_client_is_dropped_and_the_reactor_keeps_its_pace(
        database_url: str) -> None:
    async with running_reactor(database_url) as reactor:
        sock = await trio.to_thread.run_sync(stalled_client, reactor.feed_port)
        try:
            async with open_websocket_url(url(reactor, "?type=job.succeeded")) as healthy:
                await eventually(lambda: reactor.bus.subscriber_count >= 2)
                # Far more than a client's buffer and the socket buffers can hold.
                for _ in range(5000):
                    reactor.bus.publish("wakeup", "analytics_queue", error="x" * 5000)
                    await trio.lowlevel.checkpoint()
                await eventually(lambda: reactor.bus.subscriber_count == 1, within_s=20)
                assert reactor.bus.dropped_count == 1
                msg_id = await send(database_url, "analytics_queue", {"event": "still here"})
                with trio.fail_after(5):
                    while True:
                        event = json.loads(await healthy.get_message())
                        if event["msg_id"] == msg_id:
                            break
        finally:
            sock.close()


async def test_metrics_move_and_health_reports_the_listener(
        private_cluster: PgCluster) -> None:
    db_url = private_cluster.url()
    async with running_reactor(db_url, LISTENER_PROBE_S=1) as reactor, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        with reactor.bus.subscribe() as sub:
            msg_id = await send(db_url, "analytics_queue", {"event": "counted"})
            await wait_for(sub, of_type("job.succeeded", msg_id))
        metrics = (await http.get("/metrics")).text
        assert 'reactor_jobs_total{outcome="succeeded",queue="analytics_queue"} 1.0' in metrics
        assert "reactor_listener_connected 1.0" in metrics
        assert "reactor_job_duration_seconds_count" in metrics
        health = await http.get("/healthz")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})

        with reactor.bus.subscribe() as sub:
            await trio.to_thread.run_sync(private_cluster.stop)
            await wait_for(sub, of_type("listener.lost"), within_s=10)
        health = await http.get("/healthz")
        assert health.status_code == 503
        assert "LISTEN connection is down" in health.json()["reason"]
        assert "reactor_listener_connected 0.0" in (await http.get("/metrics")).text
        await trio.to_thread.run_sync(private_cluster.start)


async def test_dashboard_page_and_overview_api(database_url: str) -> None:
    async with running_reactor(database_url) as reactor, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        page = await http.get("/")
        assert page.status_code == 200
        assert "<canvas id=\"chart\"" in page.text
        assert (await http.get("/api/config")).json() == {"feed_port": reactor.feed_port,
                                                          "token_required": False}
        await send(database_url, "analytics_queue", {"no_event": True})
        for _ in range(100):
            data = (await http.get("/api/overview")).json()
            if data["dead_letters"]:
                break
            await trio.sleep(0.05)
    assert data["queues"][0]["queue"] == "email_queue"
    assert data["cron"] is None  # pg_cron lives in another database of this cluster
    assert "event: Field required" in data["dead_letters"][0]["error"]


async def test_watch_prints_events_as_json_lines(database_url: str) -> None:
    async with running_reactor(database_url) as reactor:
        proc = subprocess.Popen(  # noqa: ASYNC220 - read in a thread below
            [sys.executable, "-m", "reactor", "watch", "--json", "--type", "job.succeeded",
             "--port", str(reactor.feed_port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={"PATH": os.environ["PATH"]})
        try:
            await eventually(lambda: reactor.bus.subscriber_count >= 1)
            msg_id = await send(database_url, "analytics_queue", {"event": "watched"})
            assert proc.stdout is not None
            line = await trio.to_thread.run_sync(proc.stdout.readline)
        finally:
            proc.terminate()
            proc.communicate()
    event = json.loads(line)
    assert (event["type"], event["msg_id"]) == ("job.succeeded", msg_id)


def test_watch_explains_an_unreachable_feed() -> None:
    from reactor.pgcluster import free_port

    result = subprocess.run([sys.executable, "-m", "reactor", "watch", "--port",
                             str(free_port())], capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"]}, timeout=30, check=False)
    assert result.returncode == 1
    assert "cannot reach the feed" in result.stderr
    assert "FEED_PORT" in result.stderr


def test_watch_line_format() -> None:
    line = format_event({"ts": 1795680000.25, "type": "job.retrying", "queue": "email_queue",
                         "msg_id": 42, "attempt": 2, "duration_ms": 12.34,
                         "error": "SMTP timed out"}, color=False)
    assert "email_queue" in line
    assert "job.retrying" in line
    assert "#42" in line
    assert "try 2" in line
    assert "12.3 ms" in line
    assert line.endswith("SMTP timed out")
    assert format_event({"type": "job.succeeded"}, color=True).startswith("\x1b[32m")
