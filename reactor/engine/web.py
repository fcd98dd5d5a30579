"""The reactor's HTTP port (METRICS_PORT): dashboard, /metrics, /healthz, the
dashboard's small JSON API and provider webhooks.

Starlette (ASGI) served by Hypercorn's trio worker, inside the reactor's
nursery: no hand-parsed HTTP.

Exposed on purpose only (reactor.engine.auth.Access holds the rules): every route but
/healthz and the provider webhooks answers only to the allowed `Host` names
(DNS rebinding); with FEED_TOKEN set the API needs the token (an
`Authorization: Bearer` header, or the dashboard's sign-in cookie, HttpOnly and
SameSite=Strict) and without one it serves direct loopback callers only, never
a request that came through a proxy. The page opens the feed with a one-use
ticket, so the token is never in a URL. Everything returned is masked like the
logs; /healthz tells anyone only "ok"/"unhealthy" and reason classes.

Hand-written here though a library seems to cover it (each docstring says more):
`read_body`, not Starlette's `RequestBodyLimitMiddleware` (it has no deadline for
a body that trickles in, answers in plain text, and binds the limit to the Route,
not the read); `DrainUnreadBody`, which no library does; `LogRouteErrors`, because
Starlette's `ServerErrorMiddleware` sends the 500 before anything is logged; the
Host allowlist, not `TrustedHostMiddleware` (reactor.engine.auth says why).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import structlog
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from reactor.engine import dead_letters, queries, status, waits
from reactor.engine.auth import SESSION_TTL_S, Access, Refusal, origin_host, token_ok
from reactor.engine.db import Database, DatabaseUnavailable, describe_db_error
from reactor.engine.events import EventBus
from reactor.engine.health import Health
from reactor.engine.logs import masked
from reactor.engine.metrics import Metrics

__all__ = ["SESSION_COOKIE", "BodyRefused", "WebContext", "create_app", "masked", "read_body",
           "serve_http"]

log = structlog.get_logger("reactor.engine.web")

# The dashboard page ships inside the package (the wheel carries it).
DASHBOARD = Path(__file__).resolve().parent / "dashboard" / "index.html"
HEALTH_DB_TIMEOUT_S = 2.0
SESSION_COOKIE = "reactor_session"
# The page is ours alone: no framing (clickjacking), no referrer, its own script only.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                               "style-src 'self' 'unsafe-inline'; connect-src 'self' ws: wss:; "
                               "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
                               "form-action 'self'",
    "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store",
}
API_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
# A sign-in body is {"token": "..."}: anything longer is not one.
SESSION_MAX_BYTES = 4096
# An action on dead letters is {"queue", "dlq_id", "reason", "note", "expected_total"}.
ACTION_MAX_BYTES = 8192
# A request body must have arrived this long after its head (read_body).
BODY_DEADLINE_S = 10.0
Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class WebContext:
    """What the HTTP handlers need from the running reactor."""

    db: Database
    metrics: Metrics
    token: str | None
    feed_port: Callable[[], int]
    listener_connected: Callable[[], bool]
    extra_routes: tuple[Route, ...] = ()
    # The reactor's fault registry (reactor.engine.health): /healthz reports from it.
    health: Health | None = None
    # FEED_ALLOWED_HOSTS/ORIGINS and limits; None: loopback names and `token` only.
    access: Access | None = None
    # Where the dashboard's actions on dead letters are published (the feed, the log).
    bus: EventBus | None = None


class BodyRefused(Exception):
    """A request body not read: over its limit (413) or too slow to arrive (408)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message}, status_code=self.status)


async def read_body(request: Request, limit: int, *,
                    within_s: float | None = None) -> bytes:
    """The request's body, read up to `limit` bytes and within `within_s` (default
    BODY_DEADLINE_S).

    Hypercorn bounds a request's head, not its body, and Starlette's `body()` /
    `json()` keep whatever arrives: one client could fill the memory, or hold a
    connection for ever by sending a byte a minute. Every route that reads a body
    reads it here.

    Written here, not Starlette's `Route(max_body_size=...)` (its
    `RequestBodyLimitMiddleware`, 1.6+), which does the 413 part only: a body that
    trickles in stays welcome for ever (the 408 deadline is what no library here
    does: Hypercorn's keep-alive timer stops once a request's head is in, and its
    `read_timeout` bounds each read, which a byte a second resets); its refusal is a
    plain-text "Content Too Large" raised from inside `receive` as a private
    exception class, which a route cannot turn into the JSON error naming the limit
    that every route here answers; and its limit is declared on the Route, where
    here it is given at the read, so an app's route (the clinic's webhook) that
    reads through `read_body` is bounded whether or not its Route says so. The
    size check is the four lines of the loop below.

    Raises:
        BodyRefused: over the limit (declared or sent: 413) or not there in time (408).
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BodyRefused(413, f"body too large: at most {limit} bytes")
    body = bytearray()
    with trio.move_on_after(BODY_DEADLINE_S if within_s is None else within_s):
        try:
            async with aclosing(request.stream()) as chunks:  # closed, not left to the GC
                async for chunk in chunks:
                    body += chunk
                    if len(body) > limit:
                        raise BodyRefused(413, f"body too large: at most {limit} bytes")
        except ClientDisconnect:
            # Gone mid-body: nobody reads the answer, and it is no error of ours to log.
            raise BodyRefused(400, "the client went away before the body was whole") from None
        return bytes(body)
    raise BodyRefused(408, "the request body did not arrive in time")


class LogRouteErrors:
    """ASGI middleware: a route that raised is logged *before* its 500 is sent.

    Starlette's ServerErrorMiddleware sends the 500 (or the app's own handler's answer)
    and then re-raises for the server to log ("Error in ASGI Framework"); the client has
    its answer by then, and a shutdown (or a cancelled request) in between lost the line.
    Here, inside that middleware, the traceback is written first and the exception goes
    on (so an app's own error handler still answers); the server's second line for the
    same exception is dropped (_LoggedAlready), so it is logged exactly once.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            log.exception("http route failed", path=scope.get("path"),
                          method=scope.get("method"))
            exc.__dict__[_LOGGED] = True
            raise


_LOGGED = "reactor_logged"


class _LoggedAlready(logging.Filter):
    """Drops the server's record of an exception LogRouteErrors has logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and exc.__dict__.get(_LOGGED))


class DrainUnreadBody:
    """ASGI middleware: a route that answers without reading the request's body (a GET
    with a body, a refusal) must not leave its connection open for ever.

    Hypercorn hands the app at most `max_app_queue_size` body chunks; past them its
    protocol task waits for the app to take one, and the app's last `send` waits to
    queue `http.disconnect` behind them: neither moves again, the socket stays open
    and no timer applies (it is not idle). So while the last part of a response is
    being sent, whatever the client still sends is read and dropped, until
    Hypercorn says the request is over; then the connection closes as usual.
    Neither Hypercorn (0.18: no option drains or discards an unread body) nor
    Starlette (its middlewares read a body only for the route) does this.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_then_drain(message: Any) -> None:
            if message["type"] != "http.response.body" or message.get("more_body", False):
                await send(message)
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_drop_until_disconnect, receive)
                await send(message)
                # The request is over now (http.disconnect follows at once); bounded anyway.
                nursery.cancel_scope.deadline = trio.current_time() + BODY_DEADLINE_S

        await self.app(scope, receive, send_then_drain)


async def _drop_until_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _json(content: Any, status_code: int = 200) -> JSONResponse:
    return JSONResponse(masked(content), status_code=status_code, headers=API_HEADERS)


def _refused(refusal: Refusal) -> JSONResponse:
    return _json({"error": refusal.message}, refusal.status)


def _headers(request: Request) -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items()}


def _peer(request: Request) -> str | None:
    return request.client.host if request.client else None


# An address as the audit row records it: an IP (v6 at most 45 characters), with a port.
_CLIENT_PART_CHARS = 64


def _address(text: str) -> str:
    """One forwarded address as recorded: an IP address (with its port, if a proxy added
    one) as it is; anything else marked as such, cut short and without control
    characters (a client wrote it)."""
    text = text.strip()
    bare = text
    if bare.startswith("[") and "]" in bare:  # [v6]:port
        bare = bare[1:bare.index("]")]
    elif bare.count(":") == 1:  # v4:port
        bare = bare.split(":", 1)[0]
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        shown = "".join(ch if ch.isprintable() else "?" for ch in text)
        return f"unparsed {shown[:_CLIENT_PART_CHARS]!r}"
    return text[:_CLIENT_PART_CHARS]


def _client(request: Request) -> str:
    """Who asked, for the audit row: the peer address, and the address the nearest proxy
    saw (the right-most X-Forwarded-For entry, which that proxy appended; X-Real-IP when
    it sends only that).

    Everything left of that entry came from the client, who can write anything there: it
    is never recorded (it would be forgeable, and its length could push the real address
    out of the row)."""
    peer = _peer(request) or "?"
    forwarded = [h for h in request.headers.getlist("x-forwarded-for") if h.strip()]
    nearest = forwarded[-1].rsplit(",", 1)[-1] if forwarded else (
        request.headers.get("x-real-ip") or "")
    return f"{_address(nearest)} via {peer}" if nearest.strip() else peer


def _database_error(what: str, exc: psycopg.Error, *, rolled_back: bool = False) -> Response:
    """A database error in a dead-letter route: logged, and answered in JSON (not a bare
    500) with what failed and, for an action, that its transaction rolled back."""
    log.error("dead letters: the database refused a statement", what=what,
              error=describe_db_error(exc))
    return _json({"error": f"{what} failed in the database ({type(exc).__name__}: "
                           f"{describe_db_error(exc)})"
                           + ("; the transaction was rolled back: nothing was done"
                              if rolled_back else "")}, 500)


def create_app(ctx: WebContext) -> Starlette:
    access = ctx.access or Access(token=ctx.token)

    def api_refusal(request: Request) -> Refusal | None:
        """Host first; then the token (header or sign-in cookie), or direct loopback."""
        headers = _headers(request)
        refusal = access.host_refusal(headers)
        if refusal is not None:
            return refusal
        if access.token:
            if token_ok(access.token, headers) or access.session_ok(
                    request.cookies.get(SESSION_COOKIE)):
                return None
            return Refusal(401, "sign in with FEED_TOKEN (the dashboard asks for it) or send "
                                "'Authorization: Bearer <token>'")
        if access.proxied(headers, _peer(request)):
            return Refusal(403, "this request came through a proxy or from another host: "
                                "set FEED_TOKEN on the reactor, then sign in")
        return None

    def page_refusal(request: Request) -> Refusal | None:
        """The page and /metrics: right Host; through a proxy only when a token guards the API."""
        headers = _headers(request)
        refusal = access.host_refusal(headers)
        if refusal is None and not access.token and access.proxied(headers, _peer(request)):
            refusal = Refusal(403, "this request came through a proxy or from another host: "
                                   "set FEED_TOKEN on the reactor")
        return refusal

    def metrics_refusal(request: Request) -> Refusal | None:
        """Direct scrapes stay open; through a proxy, /metrics needs the token like a tool."""
        headers = _headers(request)
        refusal = access.host_refusal(headers)
        if refusal is None and access.proxied(headers, _peer(request)):
            refusal = access.tool_refusal(headers, _peer(request))
        return refusal

    def guarded(check: Callable[[Request], Refusal | None], handler: Handler) -> Handler:
        async def wrapper(request: Request) -> Response:
            refusal = check(request)
            if refusal is not None:
                log.info("http request refused", path=request.url.path, status=refusal.status,
                         reason=refusal.message)
                return _refused(refusal)
            return await handler(request)
        return wrapper

    def same_origin(request: Request) -> bool:
        """A browser's POST names its page's origin: ours, or one of FEED_ALLOWED_ORIGINS."""
        origin = request.headers.get("origin")
        if origin is None:
            return True  # not a browser (browsers always send Origin on POST)
        return (origin_host(origin) == request.headers.get("host", "").lower()
                or access.origin_allowed(origin))

    async def dashboard(_: Request) -> Response:
        return FileResponse(DASHBOARD, media_type="text/html; charset=utf-8",
                            headers=PAGE_HEADERS)

    async def metrics(_: Request) -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    last_logged: list[str | None] = [None]

    async def healthz(request: Request) -> Response:
        faults = ctx.health.faults if ctx.health is not None else []
        reasons = {f.reason for f in faults}
        healthy = ctx.health.healthy if ctx.health is not None else True
        detail = None
        if not ctx.listener_connected():
            reasons.add("listener_down")
            healthy, detail = False, "the LISTEN connection is down"
        else:
            with trio.move_on_after(HEALTH_DB_TIMEOUT_S) as scope:
                try:
                    await ctx.db.run(lambda c: c.execute(queries.PING).fetchone())
                except DatabaseUnavailable as exc:
                    detail = f"the database does not answer: {exc}"
            if scope.cancelled_caught:
                detail = f"the database did not answer within {HEALTH_DB_TIMEOUT_S:g}s"
            if detail is not None:
                reasons.add("database_unreachable")
                healthy = False
        if detail != last_logged[0]:  # the detail goes to the log, once per change
            last_logged[0] = detail
            if detail is not None:
                log.warning("healthz: unhealthy", detail=detail)
        body: dict[str, Any] = {"status": "ok" if healthy else "unhealthy",
                                "reasons": sorted(reasons)}
        if access.token and token_ok(access.token, _headers(request)):
            body["faults"] = [{"source": f.source, "reason": f.reason, "detail": f.detail,
                               "since": f.since} for f in faults]
            if detail is not None:
                body["detail"] = detail
        return _json(body, 200 if healthy else 503)

    async def config(request: Request) -> Response:
        signed_in = api_refusal(request) is None
        return _json({"feed_port": ctx.feed_port(), "token_required": bool(access.token),
                      "signed_in": signed_in})

    async def session(request: Request) -> Response:
        """Sign in (POST {"token"}) or out (DELETE): an HttpOnly, SameSite=Strict cookie."""
        if not same_origin(request):
            return _json({"error": "sign in from the reactor's own dashboard page"}, 403)
        secure = (request.url.scheme == "https"
                  or request.headers.get("x-forwarded-proto", "").lower() == "https")
        if request.method == "DELETE":
            response = _json({"signed_in": False})
            response.delete_cookie(SESSION_COOKIE, path="/", secure=secure, httponly=True,
                                   samesite="strict")
            return response
        if not access.token:
            return _json({"error": "no FEED_TOKEN is set: there is nothing to sign in to"}, 400)
        try:
            given = json.loads(await read_body(request, SESSION_MAX_BYTES)).get("token", "")
        except BodyRefused as refused:
            return refused.response()
        except (ValueError, AttributeError):
            given = None
        if not isinstance(given, str) or not token_ok(access.token,
                                                      {"authorization": f"Bearer {given}"}):
            await trio.sleep(0.5)  # a guesser gets two tries a second per connection
            return _json({"error": "wrong token: use the value of FEED_TOKEN"}, 401)
        response = _json({"signed_in": True})
        response.set_cookie(SESSION_COOKIE, access.issue_session(), max_age=int(SESSION_TTL_S),
                            path="/", secure=secure, httponly=True, samesite="strict")
        return response

    async def ticket(request: Request) -> Response:
        """A one-use pass for the page's websocket: the token never goes into a URL."""
        origin = request.headers.get("origin")
        if origin is None or not same_origin(request):
            return _json({"error": "tickets are for the reactor's own dashboard page"}, 403)
        return _json({"ticket": access.issue_ticket(origin), "feed_port": ctx.feed_port()})

    async def overview(_: Request) -> Response:
        def read(conn: Any) -> dict[str, Any]:
            cron = status.cron_status(conn)
            return {
                "now": time.time(),
                "chart": {"bucket_s": status.CHART_BUCKET_S, "window_s": status.CHART_WINDOW_S},
                "queues": [q.as_dict() for q in status.queue_status(conn)],
                "cron": None if cron is None else [j.as_dict() for j in cron],
                "failures": status.recent_failures(conn),
                "dead_letters": status.recent_dead_letters(conn),
                # p50/p95 enqueue-to-start per queue over the last hour (reactor.queue_waits)
                "waits": waits.recent_percentiles(conn),
                "waits_window_s": waits.WINDOW_S,
            }
        try:
            return _json(await ctx.db.run(read))
        except DatabaseUnavailable as exc:
            log.warning("overview: the database does not answer", error=str(exc))
            return _json({"error": "the database does not answer (see the reactor's log)"},
                         503)

    # -- dead letters: the panel, the inspect view and the actions -----------------------
    def action_refusal(request: Request) -> Refusal | None:
        """An action changes state, so more than the API's sign-in: it must come from the
        dashboard's own page (or a tool), never from a page of another origin that the
        operator's browser happens to have open.

        - Origin, which browsers send on every POST, must be this page's own origin (or
          one of FEED_ALLOWED_ORIGINS); a request without one is a tool's and follows
          the tool rule (FEED_TOKEN in an `Authorization` header, never the cookie).
        - Sec-Fetch-Site, where the browser sends it, must say same-origin: a page on
          another port of 127.0.0.1 is "same-site" and would carry the cookie. So
          FEED_ALLOWED_ORIGINS lets no other page act: a page of an allowed origin
          that is not the dashboard's own is "same-site" or "cross-site" to its
          browser and is refused here (it may read the feed, never act). What the
          allowed origins are for is the dashboard's own page behind a proxy that
          rewrites `Host`: its browser still says "same-origin", and its Origin
          (not `Host`) is then the allowed one.
        - The body must be `application/json`: an HTML form cannot send that, and a
          cross-origin script cannot without a CORS preflight, which is never granted.
        """
        refusal = api_refusal(request)
        if refusal is not None:
            return refusal
        headers = _headers(request)
        origin = headers.get("origin")
        if origin is None:
            if "sec-fetch-site" in headers:
                return Refusal(403, "actions come from the reactor's own dashboard page")
            if access.token and not token_ok(access.token, headers):
                return Refusal(401, "a tool sends FEED_TOKEN as 'Authorization: Bearer "
                                    "<token>' for an action")
        elif not same_origin(request):
            return Refusal(403, "actions come from the reactor's own dashboard page, not "
                                f"from a page of {origin!r}")
        if headers.get("sec-fetch-site", "same-origin") != "same-origin":
            return Refusal(403, "actions come from the reactor's own dashboard page")
        content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            return Refusal(415, "an action's body is JSON (Content-Type: application/json)")
        return None

    async def queue_names() -> list[str]:
        return await ctx.db.run(status.queue_names)

    async def letters(request: Request) -> Response:
        """GET: per queue, its dead letters (ids, when, attempts, reason), `limit` of
        `total`; `?queue=` and `?reason=` filter."""
        only = request.query_params.get("queue")
        # Absent: no filter. Given but blank: refused (it is no filter, though it looks
        # like one); `total` and `letters` below apply the very same Selection.
        reason = request.query_params.get("reason")
        if reason is not None and not reason.strip():
            return _json({"error": "the reason filter is blank: give some text of the "
                                   "reason, or leave `reason` out for every dead letter"}, 400)
        try:
            limit = max(1, min(500, int(request.query_params.get("limit", "50"))))
        except ValueError:
            return _json({"error": "limit is a number"}, 400)

        def read(conn: Any) -> dict[str, Any]:
            names = status.queue_names(conn)
            if only is not None and only not in names:
                raise LookupError(only)
            panels = []
            for queue in [only] if only else names:
                selection = dead_letters.Selection(queue, reason=reason)
                panels.append({
                    "queue": queue, "total": dead_letters.count(conn, selection),
                    "letters": [d.summary() for d in dead_letters.select(conn, selection,
                                                                         limit)]})
            return {"reason": reason, "queues": panels,
                    "actions": dead_letters.history(conn, only, 20)}
        try:
            return _json(await ctx.db.run(read))
        except LookupError:
            return _json({"error": f"unknown queue {only!r}"}, 404)
        except DatabaseUnavailable as exc:
            log.warning("dead letters: the database does not answer", error=str(exc))
            return _json({"error": "the database does not answer (see the reactor's log)"},
                         503)
        except psycopg.Error as exc:
            return _database_error("listing the dead letters", exc)

    async def inspect(request: Request) -> Response:
        """GET: one dead letter, its original message and error, masked like the feed."""
        queue = request.path_params["queue"]
        try:
            dlq_id = dead_letters.check_id(int(request.path_params["dlq_id"]),
                                           "a dead letter's id")
        except ValueError as exc:
            return _json({"error": str(exc)}, 400)
        try:
            if queue not in await queue_names():
                return _json({"error": f"unknown queue {queue!r}"}, 404)
            letter = await ctx.db.run(lambda c: dead_letters.find(c, queue, dlq_id))
        except DatabaseUnavailable as exc:
            log.warning("dead letters: the database does not answer", error=str(exc))
            return _json({"error": "the database does not answer (see the reactor's log)"},
                         503)
        except psycopg.Error as exc:
            return _database_error(f"reading dead letter #{dlq_id} of {queue}", exc)
        if letter is None:
            return _json({"error": f"no dead letter #{dlq_id} in {queue}_dlq (replayed or "
                                   "discarded meanwhile?)"}, 404)
        return _json(letter.detail())

    async def act(request: Request) -> Response:
        """POST replay / discard: {"queue", "dlq_id" (one) or "reason" (all that match;
        neither: all of the queue), "note", "expected_total"}. The same code as `reactor
        dlq` (reactor.engine.dead_letters); recorded with the client's address and
        published.

        An action on all (or all matching a reason) must say how many dead letters its
        caller saw (`expected_total`: the listing's `total` for that queue and filter);
        when the queue holds another number by then, nothing is done (409): look again.
        A blank reason is refused (400): only no reason means every dead letter."""
        action = request.url.path.rsplit("/", 1)[1]
        try:
            body = json.loads(await read_body(request, ACTION_MAX_BYTES))
        except BodyRefused as refused:
            return refused.response()
        except ValueError:
            return _json({"error": "the body is not JSON"}, 400)
        if not isinstance(body, dict):
            return _json({"error": "the body is a JSON object"}, 400)
        queue, dlq_id = body.get("queue"), body.get("dlq_id")
        reason, note = body.get("reason"), body.get("note")
        expected = body.get("expected_total")
        if not isinstance(queue, str) or any(
                v is not None and (not isinstance(v, int) or isinstance(v, bool))
                for v in (dlq_id, expected)) \
                or not isinstance(reason, str | None) or not isinstance(note, str | None):
            return _json({"error": 'expected {"queue": str, "dlq_id": int | null, '
                                   '"reason": str | null, "note": str | null, '
                                   '"expected_total": int | null}'}, 400)
        try:
            if dlq_id is not None:
                dead_letters.check_id(dlq_id, "dlq_id")
            note = dead_letters.check_note(note)
        except ValueError as exc:
            return _json({"error": str(exc)}, 400)
        if reason is not None and not reason.strip():
            return _json({"error": "the reason is blank: give some text of the reason, or "
                                   "leave `reason` out to act on every dead letter"}, 400)
        if dlq_id is None and (expected is None or not 0 <= expected <= dead_letters.MAX_ID):
            return _json({"error": "an action on all dead letters (or all matching a reason) "
                                   "needs `expected_total`: how many the listing showed for "
                                   "that queue and filter"}, 400)
        if dlq_id is not None and expected is not None:
            return _json({"error": "expected_total is for an action on all (or all matching "
                                   "a reason), not on one dead letter"}, 400)
        if action == "discard" and note is None:
            return _json({"error": "a discard needs a note: say why these messages will "
                                   "never be sent"}, 400)
        what = (f"{action} of dlq #{dlq_id} of {queue}" if dlq_id is not None
                else f"{action} of the dead letters of {queue}"
                + (f" whose reason contains {reason!r}" if reason is not None else ""))
        started = False

        def run(conn: psycopg.Connection) -> dead_letters.ActionResult:
            nonlocal started
            started = True
            if action == "replay":
                return dead_letters.replay(conn, selection, client=client, note=note,
                                           expected_total=expected)
            return dead_letters.discard(conn, selection, client=client, note=note or "",
                                        expected_total=expected)

        try:
            if queue not in await queue_names():
                return _json({"error": f"unknown queue {queue!r}"}, 404)
            selection = dead_letters.Selection(
                queue, dlq_ids=None if dlq_id is None else (dlq_id,), reason=reason)
            client = _client(request)
            result = await ctx.db.run(run)
        except dead_letters.TotalChanged as changed:
            return _json({"error": f"not done: {queue} now has {changed.found} dead letter(s)"
                          + (f" whose reason contains {reason!r}" if reason is not None
                             else "")
                          + f", not the {changed.expected} you saw; look again and confirm "
                          "the new number", "total": changed.found,
                          "expected_total": changed.expected}, 409)
        except dead_letters.CommitUnknown as exc:
            log.error("dead letters: the connection was lost while an action committed",
                      action=what, error=str(exc))
            return _json({"error": f"{what}: the connection to the database was lost while "
                                   "it committed; the state is unknown: see the history "
                                   "(\"Actions on dead letters\", or `reactor dlq history "
                                   f"{queue}`) before you try again"}, 503)
        except DatabaseUnavailable as exc:
            log.warning("dead letters: the database does not answer", error=str(exc))
            if started and not isinstance(exc.__cause__, psycopg.Error):
                # The deadline passed while it ran: it may still commit in its thread.
                return _json({"error": f"{what}: the database did not answer in time; the "
                                       "state is unknown: see the history (\"Actions on "
                                       f"dead letters\", or `reactor dlq history {queue}`) "
                                       "before you try again"}, 503)
            return _json({"error": f"{what}: the database does not answer (see the "
                                   "reactor's log); the transaction was rolled back: "
                                   "nothing was done"}, 503)
        except psycopg.Error as exc:
            return _database_error(what, exc, rolled_back=True)
        except ValueError as exc:  # a selection the database layer refuses
            return _json({"error": str(exc)}, 400)
        if ctx.bus is not None:
            dead_letters.publish(ctx.bus, result)
        if not result.dlq_ids and result.skipped:
            return _json({**result.as_dict(), "error": f"not replayed: {result.skipped[0][1]}"},
                         409)
        if not result.dlq_ids:
            return _json({**result.as_dict(), "error": "no dead letter matched (replayed or "
                          "discarded meanwhile?)"}, 404)
        return _json(result.as_dict())

    routes = [
        Route("/", guarded(page_refusal, dashboard)),
        Route("/metrics", guarded(metrics_refusal, metrics)),
        Route("/healthz", healthz),
        Route("/api/config", guarded(page_refusal, config)),
        Route("/api/session", guarded(page_refusal, session), methods=["POST", "DELETE"]),
        Route("/api/ticket", guarded(api_refusal, ticket), methods=["POST"]),
        Route("/api/overview", guarded(api_refusal, overview)),
        Route("/api/dead-letters", guarded(api_refusal, letters)),
        Route("/api/dead-letters/{queue}/{dlq_id:int}", guarded(api_refusal, inspect)),
        Route("/api/dead-letters/replay", guarded(action_refusal, act), methods=["POST"]),
        Route("/api/dead-letters/discard", guarded(action_refusal, act), methods=["POST"]),
        *ctx.extra_routes,
    ]
    return Starlette(routes=routes, middleware=[Middleware(DrainUnreadBody)])


async def serve_http(app: Starlette, host: str, port: int, *,
                     task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; started() with the bound port.

    Every Starlette app served here logs a route that raised before its 500 is sent
    (LogRouteErrors). A connection that has not sent a whole request head within 5 s (hypercorn's
    keep-alive timer, which runs until a request is complete) is closed.
    """
    middleware: set[Any] = {m.cls for m in app.user_middleware}
    if LogRouteErrors not in middleware and app.middleware_stack is None:
        # Inside Starlette's ServerErrorMiddleware, which would send the 500 first (an app
        # that has served already keeps its stack: Starlette allows no change then).
        app.add_middleware(LogRouteErrors)
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    # Hypercorn's own errors (a route that raised: "Error in ASGI Framework") go to the
    # log like every library's (reactor.engine.logs); with None it has no error log at all.
    config.errorlog = logging.getLogger("hypercorn.error")
    if not any(isinstance(f, _LoggedAlready) for f in config.errorlog.filters):
        config.errorlog.addFilter(_LoggedAlready())
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = 5.0

    async with trio.open_nursery() as nursery:
        # Starlette is an ASGI app; hypercorn's types name the ASGI callable signature.
        binds: list[str] = await nursery.start(partial(serve, app, config))  # type: ignore[arg-type]
        task_status.started(int(binds[0].rsplit(":", 1)[1]))
