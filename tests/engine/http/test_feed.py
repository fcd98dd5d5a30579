"""The live feed (the websocket at /events): what a client sees right after a commit,
filters and replay, the replay ring, a stalled client dropped, unfinished handshakes
closed and connections capped. Who may open it is in test_access.py."""

from __future__ import annotations

import json
import socket
from typing import Any

import trio
from trio_websocket import open_websocket_url

from reactor.engine.events import EventBus
from reactor.engine.feed import Access, serve_feed
from reactor.testing import patience
from tests.engine.http.feed_client import (
    handshake,
    next_events,
    raw_request,
    stalled_client,
    url,
)
from tests.harness import (
    eventually,
    of_type,
    running_reactor,
    send,
    wait_for,
)


async def test_a_client_sees_a_job_start_and_succeed_right_after_commit(
        database_url: str) -> None:
    async with (running_reactor(database_url) as reactor,
                open_websocket_url(url(reactor, "?type=job.")) as ws):
        # The handshake ends before the feed subscribes: a job sent at once could start
        # before there is anyone to tell (a loaded machine).
        await eventually(lambda: reactor.bus.subscriber_count >= 1)
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
                with trio.fail_after(patience(5)):
                    while True:
                        event = json.loads(await healthy.get_message())
                        if event["msg_id"] == msg_id:
                            break
        finally:
            sock.close()


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
