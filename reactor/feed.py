"""The live event feed: `ws://FEED_HOST:FEED_PORT/events`, one JSON event per frame.

Filters: `?queue=email_queue`, `?type=job.` (a prefix); `?replay=N` first sends
the last N matching events from the bus's ring. With FEED_TOKEN set, a client
must present it (`Authorization: Bearer …` or `?token=…`); without one the
feed only binds to loopback. A client that cannot keep up is dropped, told
why, and never slows the reactor: the bus hands it events without waiting.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from reactor.config import ConfigError
from reactor.core.events import Event, EventBus, Subscription

__all__ = ["FeedFilter", "check_feed_exposure", "serve_feed", "token_ok"]

log = structlog.get_logger("reactor.feed")

CLIENT_BUFFER = 1000    # events a client may lag behind before it is dropped
PING_EVERY_S = 15.0
MAX_REPLAY = 1000


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_feed_exposure(host: str, token: str | None) -> None:
    """Without a token the feed (and the dashboard's API) stays on loopback.

    Raises:
        ConfigError: naming FEED_HOST and FEED_TOKEN.
    """
    if not token and not is_loopback(host):
        raise ConfigError(f"FEED_HOST={host} would expose the event feed without a token: "
                          "set FEED_TOKEN, or keep FEED_HOST=127.0.0.1")


def token_ok(expected: str | None, headers: dict[str, str], query: dict[str, str]) -> bool:
    """Bearer header or ?token=, compared in constant time."""
    if not expected:
        return True
    given = query.get("token", "")
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return hmac.compare_digest(given.encode(), expected.encode())


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


async def serve_feed(bus: EventBus, host: str, port: int, token: str | None, *,
                     task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the feed until cancelled; started() with the bound port."""
    check_feed_exposure(host, token)

    async def handler(request: WebSocketRequest) -> None:
        path, query = _query(request.path)
        if path.rstrip("/") != "/events":
            await request.reject(404, body=b"not found: the feed is at /events")
            return
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        if not token_ok(token, headers, query):
            await request.reject(401, body=b"missing or wrong token")
            return
        try:
            replay = max(0, min(int(query.get("replay", "0")), MAX_REPLAY))
        except ValueError:
            await request.reject(400, body=b"replay must be a number")
            return
        ws = await request.accept()
        try:
            await stream(ws, bus, FeedFilter(query.get("queue"), query.get("type")), replay)
        except* Exception as group:
            # One client's trouble must never take the feed (or the reactor) down.
            log.warning("feed client failed", error=repr(group.exceptions[0]))

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, host, port, None)
        task_status.started(server.port)


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
                    backlog = [e for e in bus.recent if accept(e)][-replay:] if replay else []
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
