"""The reactor's HTTP port (METRICS_PORT): dashboard, /metrics, /healthz, the
dashboard's small JSON API and provider webhooks.

Starlette (ASGI) served by Hypercorn's trio worker, inside the reactor's
nursery: no hand-parsed HTTP.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from reactor import queries, status
from reactor.db import Database, DatabaseUnavailable
from reactor.feed import token_ok
from reactor.metrics import Metrics
from reactor.paths import TEMPLATES_DIR

__all__ = ["WebContext", "create_app", "serve_http"]

DASHBOARD = TEMPLATES_DIR / "dashboard" / "index.html"
HEALTH_DB_TIMEOUT_S = 2.0


@dataclass
class WebContext:
    """What the HTTP handlers need from the running reactor."""

    db: Database
    metrics: Metrics
    token: str | None
    feed_port: Callable[[], int]
    listener_connected: Callable[[], bool]
    extra_routes: tuple[Route, ...] = ()


def create_app(ctx: WebContext) -> Starlette:
    def authorized(request: Request) -> bool:
        return token_ok(ctx.token, {k.lower(): v for k, v in request.headers.items()},
                        dict(request.query_params))

    def guarded(handler: Callable[[Request], Awaitable[Response]]
                ) -> Callable[[Request], Awaitable[Response]]:
        async def wrapper(request: Request) -> Response:
            if not authorized(request):
                return JSONResponse({"error": "missing or wrong token"}, status_code=401)
            return await handler(request)
        return wrapper

    async def dashboard(_: Request) -> Response:
        return FileResponse(DASHBOARD, media_type="text/html; charset=utf-8")

    async def metrics(_: Request) -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def healthz(_: Request) -> Response:
        reason = None
        if not ctx.listener_connected():
            reason = "the LISTEN connection is down"
        else:
            with trio.move_on_after(HEALTH_DB_TIMEOUT_S) as scope:
                try:
                    await ctx.db.run(lambda c: c.execute(queries.PING).fetchone())
                except DatabaseUnavailable as exc:
                    reason = f"the database does not answer: {exc}"
            if scope.cancelled_caught:
                reason = f"the database did not answer within {HEALTH_DB_TIMEOUT_S:g}s"
        if reason:
            return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def config(_: Request) -> Response:
        return JSONResponse({"feed_port": ctx.feed_port(), "token_required": bool(ctx.token)})

    async def overview(_: Request) -> Response:
        def read(conn: Any) -> dict[str, Any]:
            cron = status.cron_status(conn)
            return {
                "queues": [q.as_dict() for q in status.queue_status(conn)],
                "cron": None if cron is None else [j.as_dict() for j in cron],
                "dead_letters": status.recent_dead_letters(conn),
            }
        try:
            return JSONResponse(await ctx.db.run(read))
        except DatabaseUnavailable as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)

    routes = [
        Route("/", dashboard),
        Route("/metrics", metrics),
        Route("/healthz", healthz),
        Route("/api/config", config),
        Route("/api/overview", guarded(overview)),
        *ctx.extra_routes,
    ]
    return Starlette(routes=routes)


async def serve_http(app: Starlette, host: str, port: int, *,
                     task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; started() with the bound port."""
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 1.0

    async with trio.open_nursery() as nursery:
        # Starlette is an ASGI app; hypercorn's types name the ASGI callable signature.
        binds: list[str] = await nursery.start(partial(serve, app, config))  # type: ignore[arg-type]
        task_status.started(int(binds[0].rsplit(":", 1)[1]))
