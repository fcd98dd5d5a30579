"""Live feed (websocket), /metrics, /healthz, the dashboard API and `reactor watch`;
who may read them (Origin, Host, token behind a proxy, masking) and the history
they tell from the database."""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import HandshakeError, open_websocket_url

from reactor.clinic.app import build
from reactor.clinic.settings import ConfigError
from reactor.engine.events import EventBus
from reactor.engine.feed import Access, serve_feed
from reactor.engine.pgcluster import PgCluster
from reactor.engine.runtime import Reactor
from reactor.engine.watch import format_event
from tests.harness import (
    eventually,
    of_type,
    post_raw,
    reactor_command,
    read_line,
    running_reactor,
    scripted_processor,
    send,
    settings_for,
    sql,
    wait_for,
)


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
        started, succeeded = await next_events(ws, 2, within_s=20)  # well under the 60 s poll
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


def raw_request(port: int, head: str) -> bytes:
    """Send a raw HTTP request head (any Host, any header) and return the response head."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        response_head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in response_head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length and (chunk := sock.recv(4096)):
            body += chunk
        return response_head + b"\r\n\r\n" + body


def ws_handshake(port: int, *, host: str = "127.0.0.1", path: str = "/events",
                 extra: str = "") -> str:
    """A websocket handshake with headers of our choosing; returns the status line."""
    head = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}")
    return raw_request(port, head).split(b"\r\n", 1)[0].decode()


async def handshake(port: int, **kwargs: Any) -> str:
    return await trio.to_thread.run_sync(lambda: ws_handshake(port, **kwargs))


async def test_the_feed_refuses_a_page_of_another_origin(database_url: str) -> None:
    async with running_reactor(database_url) as reactor, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        port = reactor.feed_port
        # Cross-site websocket hijacking: a stranger's page, opened on this machine.
        assert " 403 " in await handshake(port, extra="Origin: http://evil.example\r\n")
        # A page of this machine but another origin (another local web app) neither.
        assert " 403 " in await handshake(port, extra="Origin: http://127.0.0.1:1\r\n")
        # The dashboard's own page gets a one-use ticket bound to its origin.
        own = f"http://127.0.0.1:{reactor.http_port}"
        assert (await http.post("/api/ticket", headers={"Origin": "http://evil.example"})
                ).status_code == 403
        grant = (await http.post("/api/ticket", headers={"Origin": own})).json()
        assert grant["feed_port"] == port
        ticket = f"/events?ticket={grant['ticket']}"
        # A ticket is for its origin only...
        assert " 403 " in await handshake(port, path=ticket,
                                          extra="Origin: http://evil.example\r\n")
        assert " 101 " in await handshake(port, path=ticket, extra=f"Origin: {own}\r\n")
        # ...and opens one connection.
        assert " 403 " in await handshake(port, path=ticket, extra=f"Origin: {own}\r\n")
        # Tools send no Origin and keep working (no token set: loopback only).
        assert " 101 " in await handshake(port)


async def test_a_rebinding_host_is_refused(database_url: str) -> None:
    async with running_reactor(database_url) as reactor:
        for path in ("/api/overview", "/", "/metrics", "/api/config"):
            request = (f"GET {path} HTTP/1.1\r\nHost: rebind.attacker.example:"
                       f"{reactor.http_port}\r\nConnection: close\r\n")
            response = await trio.to_thread.run_sync(raw_request, reactor.http_port, request)
            assert response.startswith(b"HTTP/1.1 421"), (path, response)
        assert "FEED_ALLOWED_HOSTS" in response.decode()
        assert " 421 " in await handshake(reactor.feed_port,
                                          host=f"rebind.attacker.example:{reactor.feed_port}")
        # The names of this machine are fine, /healthz answers any name (containers probe it).
        async with httpx.AsyncClient(base_url=f"http://localhost:{reactor.http_port}") as http:
            assert (await http.get("/api/overview")).status_code == 200
            assert (await http.get("/healthz", headers={"Host": "pod-10-0-0-7"})
                    ).status_code == 200
        assert " 101 " in await handshake(reactor.feed_port, host=f"localhost:{reactor.feed_port}")


async def test_behind_a_proxy_a_token_is_required(database_url: str) -> None:
    forwarded = {"X-Forwarded-For": "203.0.113.9"}
    async with running_reactor(database_url) as reactor, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        # No FEED_TOKEN: every request of a proxy comes from 127.0.0.1, but says so.
        refused = await http.get("/api/overview", headers=forwarded)
        assert refused.status_code == 403
        assert "set FEED_TOKEN" in refused.json()["error"]
        assert (await http.get("/", headers={"Forwarded": "for=203.0.113.9"})).status_code == 403
        assert " 403 " in await handshake(reactor.feed_port,
                                          extra="X-Forwarded-For: 203.0.113.9\r\n")
        assert (await http.get("/api/overview")).status_code == 200  # direct: fine
    async with running_reactor(database_url, FEED_TOKEN="t0ken-123") as reactor, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        assert (await http.get("/api/overview", headers=forwarded)).status_code == 401
        bearer = {**forwarded, "Authorization": "Bearer t0ken-123"}
        assert (await http.get("/api/overview", headers=bearer)).status_code == 200
        assert (await http.get("/metrics", headers=forwarded)).status_code == 401
        assert (await http.get("/metrics", headers=bearer)).status_code == 200
        assert (await http.get("/metrics")).status_code == 200  # a direct scrape
        assert " 101 " in await handshake(
            reactor.feed_port, extra="X-Forwarded-For: 203.0.113.9\r\n"
                                     "Authorization: Bearer t0ken-123\r\n")


# trio-websocket's client leaves its socket to the GC when the server rejects the handshake.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_token_is_required_when_set_and_never_in_a_url(database_url: str) -> None:
    async with running_reactor(database_url, FEED_TOKEN="t0ken-123") as reactor:
        for query in ("", "?token=wrong", "?token=t0ken-123"):
            with pytest.raises(HandshakeError):
                async with open_websocket_url(url(reactor, query)):
                    pass
        gc.collect()  # those sockets are in cycles: collected here, under this test's filter
        assert " 400 " in await handshake(reactor.feed_port, path="/events?token=t0ken-123",
                                          extra="Authorization: Bearer t0ken-123\r\n")
        headers = [(b"Authorization", b"Bearer t0ken-123")]
        async with open_websocket_url(url(reactor), extra_headers=headers) as ws:
            reactor.bus.publish("job.succeeded", "email_queue", 7, 1, 1.0)
            [event] = await next_events(ws, 1)
            assert event["queue"] == "email_queue"
        own = f"http://127.0.0.1:{reactor.http_port}"
        async with httpx.AsyncClient(base_url=own) as http:
            assert (await http.get("/api/overview")).status_code == 401
            assert (await http.get("/api/overview?token=t0ken-123")).status_code == 401
            assert (await http.post("/api/ticket", headers={"Origin": own})).status_code == 401
            assert (await http.get("/api/config")).json()["signed_in"] is False
            # The dashboard signs in once: an HttpOnly, SameSite=Strict cookie, no token in URLs.
            wrong = await http.post("/api/session", json={"token": "nope"},
                                    headers={"Origin": own})
            assert wrong.status_code == 401
            assert (await http.post("/api/session", json={"token": "t0ken-123"},
                                    headers={"Origin": "http://evil.example"})).status_code == 403
            ok = await http.post("/api/session", json={"token": "t0ken-123"},
                                 headers={"Origin": own})
            assert ok.status_code == 200
            cookie = ok.headers["set-cookie"]
            assert "HttpOnly" in cookie
            assert "SameSite=strict" in cookie
            assert "t0ken-123" not in cookie
            assert (await http.get("/api/config")).json()["signed_in"] is True
            assert (await http.get("/api/overview")).status_code == 200
            grant = (await http.post("/api/ticket", headers={"Origin": own})).json()
        assert " 101 " in await handshake(reactor.feed_port,
                                          path=f"/events?ticket={grant['ticket']}",
                                          extra=f"Origin: {own}\r\n")


async def test_feed_closes_unfinished_handshakes_and_caps_connections() -> None:
    bus = EventBus()
    access = Access(handshake_timeout_s=3, max_connections=2)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_feed, bus, "127.0.0.1", 0, None, access)

        def idle() -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", port), timeout=20)
            sock.sendall(b"GET /events HTTP/1.1\r\n")  # and never finishes the handshake
            return sock

        first = await trio.to_thread.run_sync(idle)
        second = await trio.to_thread.run_sync(idle)
        try:
            # Over the cap: answered at once with a 503, not held.
            over = await trio.to_thread.run_sync(lambda: raw_request(port, "GET /events HTTP/1.1"))
            assert over.startswith(b"HTTP/1.1 503"), over
            # The unfinished handshakes are closed by the server (recv sees EOF, not a timeout).
            assert await trio.to_thread.run_sync(lambda: first.recv(100)) == b""
            assert await trio.to_thread.run_sync(lambda: second.recv(100)) == b""
        finally:
            first.close()
            second.close()
        # Their slots are free again.
        assert " 101 " in await handshake(port)
        nursery.cancel_scope.cancel()


async def test_the_http_port_closes_unfinished_requests(database_url: str) -> None:
    async with running_reactor(database_url) as reactor:
        def unfinished(data: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", reactor.http_port), timeout=60) as sock:
                sock.sendall(data)
                return sock.recv(100)  # EOF when the server gives up on it

        answers: dict[str, bytes] = {}

        async def probe(name: str, data: bytes) -> None:
            answers[name] = await trio.to_thread.run_sync(unfinished, data)

        async with trio.open_nursery() as nursery:  # both at once: one timeout's wait
            nursery.start_soon(probe, "silent", b"")
            nursery.start_soon(probe, "partial", b"GET / HTTP/1.1\r\nHost: x\r\n")
        assert answers == {"silent": b"", "partial": b""}


def test_access_settings_reach_the_rules(database_url: str) -> None:
    with pytest.raises(ConfigError, match=r"FEED_ALLOWED_HOSTS names ops\.example\.com"):
        settings_for(database_url, FEED_ALLOWED_HOSTS="ops.example.com")
    with pytest.raises(ConfigError, match="FEED_ALLOWED_ORIGINS entry"):
        settings_for(database_url, FEED_ALLOWED_ORIGINS="ops.example.com")
    access = Access.from_settings(settings_for(
        database_url, FEED_TOKEN="x" * 32, FEED_ALLOWED_HOSTS="Ops.Example.com, 10.0.0.5",
        FEED_ALLOWED_ORIGINS="https://ops.example.com", FEED_MAX_CONNECTIONS=7))
    assert access.host_refusal({"host": "ops.example.com:443"}) is None
    assert access.host_refusal({"host": "10.0.0.5:8766"}) is None
    assert access.host_refusal({"host": "[::1]:8766"}) is None
    refusal = access.host_refusal({"host": "evil.example"})
    assert refusal is not None
    assert refusal.status == 421
    assert access.origin_allowed("https://ops.example.com/")
    assert not access.origin_allowed("http://ops.example.com")
    assert access.max_connections == 7


async def test_the_replay_ring_keeps_jobs_not_depth_ticks(database_url: str) -> None:
    async with running_reactor(database_url) as reactor:
        with reactor.bus.subscribe() as sub:
            msg_id = await send(database_url, "analytics_queue", {"event": "kept"})
            await wait_for(sub, of_type("job.succeeded", msg_id))
        # A queue of its own: the reactor's real depth ticks (every 5 s) never overwrite it.
        for i in range(3 * reactor.bus.ring_size):  # hours of idle depth ticks
            reactor.bus.publish("queue.depth", "ticker_test_queue", depth=i % 3, oldest_age_s=0)
            reactor.bus.publish("wakeup", "ticker_test_queue")
        reactor.bus.publish("queue.depth", "ticker_test_queue", depth=5, oldest_age_s=12)
        assert not any(e["type"] in ("queue.depth", "wakeup") for e in reactor.bus.recent)
        async with open_websocket_url(url(reactor, "?replay=200")) as ws:
            events: list[dict[str, Any]] = []
            with trio.fail_after(30):
                while not any(e["type"] == "job.succeeded" for e in events):
                    events.append(json.loads(await ws.get_message()))
    depths = [e for e in events if e["type"] == "queue.depth"]
    # Depth is state: one current value per queue, sent first.
    assert next(e for e in depths if e["queue"] == "ticker_test_queue")["depth"] == 5
    assert len(depths) == len({e["queue"] for e in depths})
    assert events.index(depths[-1]) < events.index(
        next(e for e in events if e["type"] == "job.succeeded"))
    assert any(e["msg_id"] == msg_id for e in events if e["type"] == "job.succeeded")


def test_feed_refuses_a_public_address_without_a_token(database_url: str) -> None:
    with pytest.raises(ConfigError, match=r"FEED_HOST=0\.0\.0\.0 would expose"):
        Reactor(build(settings_for(database_url, FEED_HOST="0.0.0.0")))
    Reactor(build(settings_for(database_url, FEED_HOST="0.0.0.0", FEED_TOKEN="x" * 32)))


def stalled_client(port: int) -> socket.socket:
    """A websocket client that completes the handshake and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)  # every read here has a deadline
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


async def test_dashboard_api_tells_history_from_the_database_masked(
        database_url: str, smtp_server: Any) -> None:
    server = smtp_server(reject=["anna.petrova@gmail.com"])
    env = {"EMAIL_PROVIDER": "smtp", "SMTP_HOST": "127.0.0.1", "SMTP_PORT": server.port,
           "SMTP_SECURITY": "none", "SMTP_FROM": "noreply@family.example", "MAX_ATTEMPTS": 1}
    mail = {"subject": "Hi", "template": "checkup_completed",
            "variables": {"full_name": "Anna", "assessment_id": "a1"}, "locale": "en"}
    async with running_reactor(database_url, **env) as reactor:
        with reactor.bus.subscribe() as sub:
            ok = await send(database_url, "email_queue", {**mail, "to": "ivan@example.com"})
            bad = await send(database_url, "email_queue",
                             {**mail, "to": "anna.petrova@gmail.com"})
            outcomes = await wait_for(sub, lambda e: (e["type"], e["msg_id"]) in {
                ("job.succeeded", ok), ("job.dead_lettered", bad)}, count=2)
    [event] = [e for e in outcomes if e["type"] == "job.dead_lettered"]
    assert "a***@gmail.com" in event["error"]
    # A new reactor, a page opened later: the story is in the database.
    async with running_reactor(database_url) as reactor, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        page = await http.get("/")
        assert page.status_code == 200
        assert "<canvas id=\"chart\"" in page.text
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert (await http.get("/api/config")).json() == {
            "feed_port": reactor.feed_port, "token_required": False, "signed_in": True}
        response = await http.get("/api/overview")
    assert "anna.petrova" not in response.text
    data = response.json()
    email = next(q for q in data["queues"] if q["queue"] == "email_queue")
    assert (email["done_1h"], email["dead_lettered_1h"], email["dead_letters"]) == (1, 1, 1)
    assert (email["done_24h"], email["dead_lettered_24h"]) == (1, 1)
    assert sum(email["throughput"].values()) == 1  # the chart counts finished jobs only
    [failure] = [f for f in data["failures"] if f["queue"] == "email_queue"]
    assert (failure["msg_id"], failure["outcome"], failure["attempt"]) == (
        bad, "dead_lettered", 1)
    assert "a***@gmail.com" in failure["error"]
    [letter] = data["dead_letters"]
    assert letter["msg_id"] == bad
    assert failure["dlq_msg_id"] == letter["dlq_msg_id"]
    assert "a***@gmail.com" in letter["error"]
    assert data["cron"] is None  # pg_cron lives in another database of this cluster


def reactor_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return reactor_command(*args, DATABASE_URL=database_url)


async def test_status_separates_done_dead_lettered_and_retrying(database_url: str) -> None:
    scripted = scripted_processor()
    async with running_reactor(database_url, {"analytics_queue": scripted},
                               RETRY_BASE_S=600) as reactor:
        with reactor.bus.subscribe() as sub:
            for body in ({}, {}, {"permanent": True}, {"fail_times": 100}):
                await send(database_url, "analytics_queue", body)
            outcomes = await wait_for(  # in whatever order they are recorded
                sub, lambda e: e["type"] in ("job.succeeded", "job.dead_lettered",
                                             "job.retrying"), count=4)
    assert sorted(e["type"] for e in outcomes) == [
        "job.dead_lettered", "job.retrying", "job.succeeded", "job.succeeded"]
    result = await trio.to_thread.run_sync(lambda: reactor_cli(database_url, "status"))
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split()[:9] == ["queue", "depth", "retrying", "oldest", "done", "1h", "dead",
                                  "1h", "done"]
    line = next(r for r in rows if r.startswith("analytics_queue"))
    depth, retrying, _oldest, done_1h, dead_1h, done_24h, dead_24h, dlq = line.split()[1:9]
    assert (depth, retrying, done_1h, dead_1h, done_24h, dead_24h, dlq) == (
        "1", "1", "2", "1", "2", "1", "1")
    as_json = await trio.to_thread.run_sync(lambda: reactor_cli(database_url, "status",
                                                                "--json"))
    analytics = next(q for q in json.loads(as_json.stdout)["queues"]
                     if q["queue"] == "analytics_queue")
    assert (analytics["done_1h"], analytics["dead_lettered_1h"], analytics["retrying"]) == (
        2, 1, 1)


async def test_dlq_list_shows_both_ids_and_replay_takes_the_message_id(
        database_url: str) -> None:
    async with running_reactor(database_url) as reactor:
        with reactor.bus.subscribe() as sub:
            for _ in range(2):
                await send(database_url, "analytics_queue", {"event": "ok"})
            bad = await send(database_url, "analytics_queue", {"no_event": True})
            await wait_for(sub, of_type("job.dead_lettered", bad))
    listed = await trio.to_thread.run_sync(lambda: reactor_cli(database_url, "dlq", "list",
                                                               "analytics_queue"))
    header, row, hint = listed.stdout.splitlines()
    assert header.split()[:4] == ["dlq", "id", "msg", "id"]
    dlq_id, msg_id = row.split()[:2]
    assert int(msg_id) == bad
    assert int(dlq_id) != bad  # two different ids, each in its own labelled column
    assert "event: Field required" in row
    assert "--msg-id" in hint
    unknown = await trio.to_thread.run_sync(lambda: reactor_cli(
        database_url, "dlq", "replay", "analytics_queue", "--msg-id", "999999"))
    assert unknown.returncode == 1
    assert "no replayable dead letter of message 999999" in unknown.stderr
    replayed = await trio.to_thread.run_sync(lambda: reactor_cli(
        database_url, "dlq", "replay", "analytics_queue", "--msg-id", str(bad)))
    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed dlq #{dlq_id} (msg #{bad}) onto analytics_queue as msg #" in replayed.stdout
    after = await trio.to_thread.run_sync(lambda: reactor_cli(database_url, "dlq", "list",
                                                              "analytics_queue"))
    assert after.stdout.strip() == "no dead letters in analytics_queue"


def watch_process(port: int, *args: str) -> subprocess.Popen[bytes]:
    """`reactor watch`; read its lines with `watch_line` (a read with a timeout)."""
    return subprocess.Popen(
        [sys.executable, "-m", "reactor", "watch", "--port", str(port), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"PATH": os.environ["PATH"]})


async def watch_line(proc: subprocess.Popen[bytes], within_s: float = 30) -> str:
    assert proc.stdout is not None
    return await trio.to_thread.run_sync(read_line, proc.stdout, within_s)


def stop_watch(proc: subprocess.Popen[bytes]) -> str:
    """Terminate it; its stderr."""
    if proc.poll() is None:
        proc.terminate()
    _, stderr = proc.communicate(timeout=30)
    return stderr.decode()


@pytest.mark.process
async def test_watch_prints_events_as_json_lines(database_url: str) -> None:
    async with running_reactor(database_url) as reactor:
        proc = watch_process(reactor.feed_port, "--json", "--type", "job.succeeded")
        try:
            await eventually(lambda: reactor.bus.subscriber_count >= 1)
            msg_id = await send(database_url, "analytics_queue", {"event": "watched"})
            line = await watch_line(proc)
        finally:
            stop_watch(proc)
    event = json.loads(line)
    assert (event["type"], event["msg_id"]) == ("job.succeeded", msg_id)


@pytest.mark.process
async def test_watch_queue_shows_only_that_queue(database_url: str) -> None:
    async with running_reactor(database_url) as reactor:
        proc = watch_process(reactor.feed_port, "--json", "--queue", "email_queue")
        try:
            await eventually(lambda: reactor.bus.subscriber_count >= 1)
            reactor.bus.publish("job.succeeded", "analytics_queue", 1, 1, 1.0)
            reactor.bus.publish("job.retrying", "payment_processing_queue", 2, 1, 1.0)
            reactor.bus.publish("job.succeeded", "email_queue", 3, 1, 1.0)
            first = json.loads(await watch_line(proc))
        finally:
            stop_watch(proc)
    # Published in order on one bus: had the others passed the filter, they came first.
    assert (first["queue"], first["msg_id"]) == ("email_queue", 3)


@pytest.mark.process
async def test_watch_replay_first_shows_the_last_events(database_url: str) -> None:
    async with running_reactor(database_url) as reactor:
        for n in range(1, 6):
            reactor.bus.publish("job.succeeded", "analytics_queue", n, 1, 1.0)
        proc = watch_process(reactor.feed_port, "--json", "--replay", "2", "--type", "job.")
        try:
            replayed = [json.loads(await watch_line(proc)) for _ in range(2)]
            await eventually(lambda: reactor.bus.subscriber_count >= 1)
            reactor.bus.publish("job.succeeded", "analytics_queue", 6, 1, 1.0)
            live = json.loads(await watch_line(proc))
        finally:
            stop_watch(proc)
    assert [e["msg_id"] for e in replayed] == [4, 5]  # the last two, oldest first
    assert live["msg_id"] == 6


@pytest.mark.process
async def test_watch_token_is_sent_in_a_header_and_a_wrong_one_is_named(
        database_url: str) -> None:
    async with running_reactor(database_url, FEED_TOKEN="t0ken-for-watch") as reactor:
        proc = watch_process(reactor.feed_port, "--json", "--token", "t0ken-for-watch")
        try:
            await eventually(lambda: reactor.bus.subscriber_count >= 1)
            reactor.bus.publish("job.succeeded", "email_queue", 7, 1, 1.0)
            event = json.loads(await watch_line(proc))
        finally:
            stop_watch(proc)
        wrong = await trio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "reactor", "watch", "--port", str(reactor.feed_port),
             "--token", "not-the-token"], capture_output=True, text=True,
            env={"PATH": os.environ["PATH"]}, timeout=60, check=False))
    assert event["msg_id"] == 7
    assert wrong.returncode != 0
    [line] = wrong.stderr.strip().splitlines()
    assert "token" in line.lower()
    assert "not-the-token" not in line


@pytest.mark.process
async def test_watch_is_quiet_when_nothing_changes(database_url: str) -> None:
    async with running_reactor(database_url) as reactor:
        proc = watch_process(reactor.feed_port)
        try:
            await eventually(lambda: reactor.bus.subscriber_count >= 1)
            queue = "a_rather_long_queue_name_for_the_terminal"
            for depth in (0, 0, 0, 3, 3, 3, 0):
                reactor.bus.publish("queue.depth", queue, depth=depth, oldest_age_s=1)
            reactor.bus.publish("job.succeeded", queue, 41, 1, 2.0)
            lines: list[str] = []
            while not lines or "job.succeeded" not in lines[-1]:
                lines.append(await watch_line(proc))
        finally:
            stop_watch(proc)
    depth_lines = [line for line in lines if "queue.depth" in line]
    assert [line.split("depth ")[-1].split()[0] for line in depth_lines] == ["0", "3", "0"]
    assert all(queue + "  " in line for line in lines)  # the long name fits its column
    assert "msg #41" in lines[-1]


@pytest.mark.process
async def test_watch_exits_quietly_when_its_stdout_closes(database_url: str) -> None:
    async with running_reactor(database_url) as reactor:
        proc = watch_process(reactor.feed_port, "--json")
        try:
            await eventually(lambda: reactor.bus.subscriber_count >= 1)
            reactor.bus.publish("job.succeeded", "email_queue", 1, 1, 1.0)
            assert "job.succeeded" in await watch_line(proc)
            assert proc.stdout is not None
            proc.stdout.close()  # like `reactor watch | head -1`
            # Events keep coming until it notices (its next write fails) and leaves.
            n = 2
            while proc.poll() is None and n < 10_000:
                reactor.bus.publish("job.succeeded", "email_queue", n, 1, 1.0)
                n += 1
                await trio.sleep(0.01)
            code = await trio.to_thread.run_sync(lambda: proc.wait(timeout=30))
        finally:
            stderr = stop_watch(proc)
    assert code == 0
    assert stderr == ""


@pytest.mark.process
def test_watch_explains_an_unreachable_feed() -> None:
    with socket.socket() as closed:  # bound, never listened on: connections are refused
        closed.bind(("127.0.0.1", 0))
        result = subprocess.run([sys.executable, "-m", "reactor", "watch", "--port",
                                 str(closed.getsockname()[1])], capture_output=True, text=True,
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
    assert "msg #42" in line
    assert "try 2" in line
    assert "12.3 ms" in line
    assert line.endswith("SMTP timed out")
    assert format_event({"type": "job.succeeded"}, color=True).startswith("\x1b[32m")


async def test_a_body_too_big_or_too_slow_is_refused_before_it_is_read(
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sign-in route reads a body, so anyone who can reach the HTTP port can send one:
    a body declared or sent over its limit is refused at once (413), without waiting for
    the rest (a 10 GB body was read, into memory, to its end); one trickled a byte at a
    time is refused at the deadline (408) instead of holding the connection for ever."""
    monkeypatch.setattr("reactor.engine.web.BODY_DEADLINE_S", 1.0)
    async with running_reactor(database_url, FEED_TOKEN="t0ken-123") as reactor:
        port = reactor.http_port
        own = f"Origin: http://127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        with trio.fail_after(15):
            declared = await post_raw(port, "/api/session",
                                       own + "Content-Length: 10000000000\r\n",
                                       [b"x" * 65536] * 4)
            assert " 413 " in declared
            chunked = await post_raw(port, "/api/session",
                                      own + "Transfer-Encoding: chunked\r\n",
                                      [b"400\r\n" + b"x" * 1024 + b"\r\n"] * 1000)
            assert " 413 " in chunked
            trickled = await post_raw(port, "/api/session", own + "Content-Length: 40\r\n",
                                       [b"{"] + [b" "] * 38 + [b"}"], gap_s=0.2)
            assert " 408 " in trickled
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            ok = await http.post("/api/session", json={"token": "t0ken-123"},
                                 headers={"Origin": f"http://127.0.0.1:{port}"})
            assert ok.status_code == 200
