"""The live event feed: `ws://FEED_HOST:FEED_PORT/events`, one JSON event per frame.

Filters: `?queue=email_queue`, `?type=job.` (a prefix); `?replay=N` first sends
the current depth of each queue, then the last N matching events of the
bus's ring (job events, not depth ticks).

Who may connect is decided by reactor.engine.auth (`Access`: Host, Origin,
one-use tickets, FEED_TOKEN); the same rules guard the HTTP port.
Handshakes that do not finish within FEED_HANDSHAKE_TIMEOUT_S are closed, and
at most FEED_MAX_CONNECTIONS connections are open at once. A client that
cannot keep up is dropped, told why, and never slows the reactor.

Served with `trio.serve_tcp` and trio-websocket's `wrap_server_stream`, not its
`serve_websocket`: that one bounds the handshake (`connect_timeout`) but has no
cap on open connections, and the cap must answer 503 before a handshake is
parsed, so the cap and the handshake deadline are both here (`connection`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    wrap_server_stream,
)

from reactor.engine.auth import Access, Refusal, check_feed_exposure, token_ok
from reactor.engine.events import Event, EventBus, Subscription

__all__ = ["Access", "FeedFilter", "Refusal", "check_feed_exposure", "serve_feed", "token_ok"]

log = structlog.get_logger("reactor.engine.feed")

CLIENT_BUFFER = 1000    # events a client may lag behind before it is dropped
PING_EVERY_S = 15.0
MAX_REPLAY = 1000


@dataclass(frozen=True)
class FeedFilter:
    queue: str | None = None
    type_prefix: str | None = None

    def __call__(self, event: Event) -> bool:
        if self.queue and event.get("queue") != self.queue:
            return False
        return not (self.type_prefix and not str(event.get("type", "")).startswith(
            self.type_prefix))


def _query(path: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(path)
    return parts.path, {k: v[-1] for k, v in parse_qs(parts.query).items()}


@dataclass
class _Connections:
    """Open connections (including unfinished handshakes), capped."""

    cap: int
    open: int = 0
    refused: int = 0

    def take(self) -> bool:
        if self.open >= self.cap:
            self.refused += 1
            if self.refused == 1 or self.refused % 100 == 0:
                log.warning("feed connection refused: too many open connections",
                            limit=self.cap, refused=self.refused,
                            fix="raise FEED_MAX_CONNECTIONS if this load is expected")
            return False
        self.open += 1
        return True


async def serve_feed(bus: EventBus, host: str, port: int, token: str | None,
                     access: Access | None = None, *,
                     task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the feed until cancelled; started() with the bound port.

    `access` carries FEED_ALLOWED_HOSTS/ORIGINS and the limits; without it the
    defaults for `host` and `token` apply.
    """
    check_feed_exposure(host, token)
    access = access or Access.default(host, token)

    async def handler(request: WebSocketRequest) -> None:
        path, query = _query(request.path)
        if path.rstrip("/") != "/events":
            await request.reject(404, body=b"not found: the feed is at /events")
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
        # wsproto takes Host out of the headers it hands on; trio-websocket has no accessor.
        host = getattr(getattr(request, "_event", None), "host", None)
        if isinstance(host, str):
            headers["host"] = host
        address = getattr(request.remote, "address", None)
        peer = None if address is None else str(address)
        refusal = access.feed_refusal(headers, query, peer)
        if refusal is not None:
            log.info("feed connection refused", status=refusal.status, reason=refusal.message)
            await request.reject(refusal.status, body=refusal.message.encode() + b"\n")
            return
        try:
            replay = max(0, min(int(query.get("replay", "0")), MAX_REPLAY))
        except ValueError:
            await request.reject(400, body=b"replay must be a number\n")
            return
        ws = await request.accept()
        try:
            await stream(ws, bus, FeedFilter(query.get("queue"), query.get("type")), replay)
        except* Exception as group:
            # One client's trouble must never take the feed (or the reactor) down.
            log.warning("feed client failed", error=repr(group.exceptions[0]))
        with trio.move_on_after(access.handshake_timeout_s):
            await ws.aclose()

    connections = _Connections(access.max_connections)

    async def connection(sock: trio.SocketStream) -> None:
        """One TCP connection: capped, and its handshake bounded in time."""
        if not connections.take():
            with trio.move_on_after(0.5):
                await sock.send_all(b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
                                    b"Content-Length: 21\r\n\r\ntoo many connections\n")
            await sock.aclose()
            return
        try:
            async with trio.open_nursery() as nursery:
                request = None
                with trio.move_on_after(access.handshake_timeout_s):
                    request = await wrap_server_stream(nursery, sock)
                if request is not None:
                    await handler(request)
                nursery.cancel_scope.cancel()
        except* Exception as group:
            # One connection's trouble must never take the feed (or the reactor) down.
            log.warning("feed connection failed", error=repr(group.exceptions[0]))
        finally:
            connections.open -= 1
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await sock.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, connection, port, host=host))
        task_status.started(listeners[0].socket.getsockname()[1])


async def stream(ws: WebSocketConnection, bus: EventBus, accept: FeedFilter,
                 replay: int) -> None:
    """Send matching events until the client leaves or is dropped."""
    with bus.subscribe(CLIENT_BUFFER, accept) as sub:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_ping, ws)
                with trio.CancelScope() as sending:
                    # A client that stops reading blocks send_message; the bus then
                    # drops it, and this cancels the stuck send.
                    nursery.start_soon(_cancel_when_gone, sub, sending)
                    backlog: list[Event] = []
                    if replay:
                        # State first (the current depth of each queue), then history.
                        backlog = [e for e in bus.depths.values() if accept(e)]
                        backlog += [e for e in bus.recent if accept(e)][-replay:]
                    for event in backlog:
                        await ws.send_message(_dumps(event))
                    async for event in sub.receive:
                        await ws.send_message(_dumps(event))
                if sub.dropped:
                    log.warning("feed client dropped", reason=sub.dropped)
                    with trio.move_on_after(1):
                        await ws.send_message(_dumps({"type": "feed.dropped",
                                                      "error": sub.dropped}))
                    with trio.move_on_after(1):
                        await ws.aclose(code=1008, reason="too slow")
                nursery.cancel_scope.cancel()
        except* ConnectionClosed:
            pass  # the client left


async def _cancel_when_gone(sub: Subscription, scope: trio.CancelScope) -> None:
    await sub.gone.wait()
    scope.cancel()


async def _ping(ws: WebSocketConnection) -> None:
    while True:
        await trio.sleep(PING_EVERY_S)
        await ws.ping()


def _dumps(event: dict[str, Any]) -> str:
    return json.dumps(event, ensure_ascii=False, default=str)
