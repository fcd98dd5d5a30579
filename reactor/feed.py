"""The live event feed: `ws://FEED_HOST:FEED_PORT/events`, one JSON event per frame.

Filters: `?queue=email_queue`, `?type=job.` (a prefix); `?replay=N` first sends
the current depth of each queue, then the last N matching events of the
bus's ring (job events, not depth ticks).

Who may connect (the same rules guard the HTTP port, see `Access`):
- the `Host` header must name this machine's loopback, FEED_HOST or one of
  FEED_ALLOWED_HOSTS (a DNS-rebinding page sends its own name and is refused);
- a browser (it always sends `Origin`) needs a one-use ticket that the
  dashboard fetched from its own origin (`POST /api/ticket`), or an origin of
  FEED_ALLOWED_ORIGINS; a page of another site gets neither;
- a tool (no `Origin`, e.g. `reactor watch`) presents FEED_TOKEN in an
  `Authorization: Bearer` header when one is set. Without FEED_TOKEN only
  direct loopback connections are served: a request that came through a
  proxy (forwarding headers) or from another address is refused.
Handshakes that do not finish within FEED_HANDSHAKE_TIMEOUT_S are closed, and
at most FEED_MAX_CONNECTIONS connections are open at once. A client that
cannot keep up is dropped, told why, and never slows the reactor.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import structlog
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    wrap_server_stream,
)

from reactor.config import ConfigError
from reactor.core.events import Event, EventBus, Subscription

if TYPE_CHECKING:
    from reactor.config import Settings

__all__ = ["Access", "FeedFilter", "Refusal", "check_feed_exposure", "serve_feed", "token_ok"]

log = structlog.get_logger("reactor.feed")

CLIENT_BUFFER = 1000    # events a client may lag behind before it is dropped
PING_EVERY_S = 15.0
MAX_REPLAY = 1000
TICKET_TTL_S = 30.0     # a dashboard ticket opens one websocket within this time
SESSION_TTL_S = 12 * 3600.0
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# Any of these means a proxy forwarded the request: "loopback" no longer means "local".
FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
                      "x-real-ip", "via")


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in ("localhost", "localhost."):
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


def token_ok(expected: str | None, headers: Mapping[str, str]) -> bool:
    """`Authorization: Bearer …`, compared in constant time (never from the URL)."""
    if not expected:
        return True
    auth = headers.get("authorization", "")
    given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    return hmac.compare_digest(given.encode(), expected.encode())


def host_name(host_header: str) -> str:
    """`Host: Example.org:8766` → `example.org`; `[::1]:8766` → `::1`."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def origin_host(origin: str) -> str:
    """`http://127.0.0.1:8766` → `127.0.0.1:8766` (what that page sends as Host)."""
    return urlsplit(origin).netloc.lower()


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: an HTTP status and one line naming the fix."""

    status: int
    message: str


@dataclass
class _TicketBook:
    """Used ticket nonces until they expire: a ticket opens one connection."""

    used: dict[str, float] = field(default_factory=dict)

    def spend(self, nonce: str, expires: float) -> bool:
        now = time.time()
        for key in [k for k, exp in self.used.items() if exp < now]:
            del self.used[key]
        if nonce in self.used:
            return False
        self.used[nonce] = expires
        return True


# Tickets live seconds and never leave this process: a per-process key is enough.
_TICKET_KEY = secrets.token_bytes(32)
_TICKETS = _TicketBook()


def _sign(key: bytes, text: str) -> str:
    mac = hmac.new(key, text.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


@dataclass(frozen=True)
class Access:
    """Who may use the feed and the HTTP port (see the module docstring)."""

    token: str | None = None
    hosts: frozenset[str] = LOOPBACK_NAMES
    origins: frozenset[str] = frozenset()
    max_connections: int = 100
    handshake_timeout_s: float = 5.0

    @classmethod
    def default(cls, host: str, token: str | None) -> Access:
        """Loopback names and the bound host (when it is a name, not a wildcard)."""
        return cls(token=token, hosts=LOOPBACK_NAMES | _bound_host(host))

    @classmethod
    def from_settings(cls, settings: Settings) -> Access:
        token = settings.feed_token.get_secret_value() if settings.feed_token else None
        return cls(token=token,
                   hosts=LOOPBACK_NAMES | _bound_host(settings.feed_host)
                   | frozenset(settings.feed_allowed_hosts_list),
                   origins=frozenset(settings.feed_allowed_origins_list),
                   max_connections=settings.feed_max_connections,
                   handshake_timeout_s=settings.feed_handshake_timeout_s)

    # -- the checks ------------------------------------------------------------------
    def host_refusal(self, headers: Mapping[str, str]) -> Refusal | None:
        """A Host this service does not answer to (DNS rebinding, a stray proxy)."""
        host = headers.get("host")
        if not host:
            return Refusal(400, "the request has no Host header")
        name = host_name(host)
        if name in self.hosts:
            return None
        return Refusal(421, f"Host {name!r} is not one of this reactor's names: "
                            "add it to FEED_ALLOWED_HOSTS (and set FEED_TOKEN)")

    @staticmethod
    def proxied(headers: Mapping[str, str], peer: str | None) -> bool:
        """Came through a proxy or from another machine: loopback trust does not apply."""
        if any(h in headers for h in FORWARDING_HEADERS):
            return True
        return peer is not None and not is_loopback(peer)

    def needs_token(self, headers: Mapping[str, str], peer: str | None) -> bool:
        return bool(self.token) or self.proxied(headers, peer)

    def tool_refusal(self, headers: Mapping[str, str], peer: str | None) -> Refusal | None:
        """A caller that is not a browser page: FEED_TOKEN when set, else direct loopback."""
        if self.token:
            if token_ok(self.token, headers):
                return None
            return Refusal(401, "missing or wrong token: send FEED_TOKEN as "
                                "'Authorization: Bearer <token>'")
        if self.proxied(headers, peer):
            return Refusal(403, "this request came through a proxy or from another host: "
                                "set FEED_TOKEN on the reactor and present it")
        return None

    def origin_allowed(self, origin: str) -> bool:
        return origin.rstrip("/").lower() in {o.rstrip("/").lower() for o in self.origins}

    # -- tickets (feed) and sessions (dashboard cookie) ----------------------------------
    def issue_ticket(self, origin: str) -> str:
        """A one-use pass for one websocket from a page of `origin`."""
        expires = int(time.time() + TICKET_TTL_S)
        nonce = secrets.token_urlsafe(12)
        payload = f"{expires}.{nonce}"
        return f"{payload}.{_sign(_TICKET_KEY, payload + '|' + origin.lower())}"

    def spend_ticket(self, ticket: str, origin: str) -> bool:
        """Valid, unexpired, issued to this origin, and not used before."""
        try:
            expires_s, nonce, mac = ticket.split(".")
            expires = int(expires_s)
        except ValueError:
            return False
        if expires < time.time():
            return False
        expected = _sign(_TICKET_KEY, f"{expires_s}.{nonce}|{origin.lower()}")
        if not hmac.compare_digest(mac.encode(), expected.encode()):
            return False
        return _TICKETS.spend(nonce, expires)

    def _session_key(self) -> bytes:
        # Derived from the token: sessions survive a restart and die when the token changes.
        return hashlib.sha256(b"reactor-dashboard-session|" + (self.token or "").encode()).digest()

    def issue_session(self) -> str:
        expires = str(int(time.time() + SESSION_TTL_S))
        return f"{expires}.{_sign(self._session_key(), expires)}"

    def session_ok(self, cookie: str | None) -> bool:
        if not cookie or not self.token:
            return False
        expires, _, mac = cookie.partition(".")
        if not expires.isdigit() or int(expires) < time.time():
            return False
        return hmac.compare_digest(mac.encode(), _sign(self._session_key(), expires).encode())

    # -- the feed handshake -----------------------------------------------------------------
    def feed_refusal(self, headers: Mapping[str, str], query: Mapping[str, str],
                     peer: str | None) -> Refusal | None:
        """Everything a websocket handshake on the feed port must pass."""
        if "token" in query:
            return Refusal(400, "the token does not belong in the URL: send it as "
                                "'Authorization: Bearer <token>' (reactor watch does)")
        refusal = self.host_refusal(headers)
        if refusal is not None:
            return refusal
        origin = headers.get("origin")
        if origin is None:
            return self.tool_refusal(headers, peer)
        # A browser. The dashboard's page brings a ticket bound to its own origin.
        ticket = query.get("ticket")
        if ticket is not None:
            if self.spend_ticket(ticket, origin):
                return None
            return Refusal(403, "the ticket is expired, used or not for this page: "
                                "reload the dashboard")
        if self.origin_allowed(origin) and not self.needs_token(headers, peer):
            return None
        return Refusal(403, f"pages of origin {origin!r} may not read the feed: open the "
                            "reactor's dashboard, or add the origin to FEED_ALLOWED_ORIGINS")


def _bound_host(host: str) -> frozenset[str]:
    name = host.strip("[]").lower()
    try:
        if ipaddress.ip_address(name).is_unspecified:
            return frozenset()
    except ValueError:
        pass
    return frozenset({name}) if name else frozenset()


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
