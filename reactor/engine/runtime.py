"""The Reactor: one nursery tree that owns the listener, the drainers and the
periodic queue-depth report, and a two-phase shutdown.

Shutdown: stop reading, give in-flight jobs `SHUTDOWN_GRACE_S`, then cancel
them; the drainers make cancelled messages visible again at once.
"""

from __future__ import annotations

import gc
import signal
from collections.abc import Mapping
from contextlib import AsyncExitStack
from typing import Any

import psycopg
import structlog
import trio

from reactor.engine import queries, queues
from reactor.engine.app import App
from reactor.engine.db import Database, DatabaseUnavailable
from reactor.engine.drainer import Drainer, DrainSettings
from reactor.engine.events import EventBus
from reactor.engine.feed import Access, check_feed_exposure, serve_feed
from reactor.engine.health import Health
from reactor.engine.listener import Listener
from reactor.engine.metrics import Metrics
from reactor.engine.migrate import pending_migrations
from reactor.engine.processor import Context, Processor
from reactor.engine.retry import RetryPolicy
from reactor.engine.startup import wait_for_database
from reactor.engine.waits import WAITS_EVERY_S, WaitRecorder
from reactor.engine.web import WebContext, create_app, serve_http

__all__ = ["Reactor", "SchemaNotReady"]

log = structlog.get_logger("reactor")

DEPTH_EVERY_S = 5.0
# The last write of the wait times, on the way out, gives up after this long.
FINAL_WAITS_WRITE_S = 2.0


def _freeze_startup_heap() -> None:
    """Move everything built at startup (modules, settings, templates, fonts) out of
    the garbage collector's reach: a full collection walks every tracked object
    and, on this heap, stops the process for ~60 ms (measured here) — a wake-up
    that lands in it waits as long. After the freeze a full collection walks only
    what was allocated since (jobs, events): 0.4 ms. Frozen objects are still freed
    when their last reference goes; only a cycle among them would never be."""
    gc.collect()
    gc.freeze()


class SchemaNotReady(Exception):
    """The database is not migrated; the message names the command that fixes it."""


class Reactor:
    """Owns every long-running task of `reactor run`."""

    def __init__(self, app: App, *, bus: EventBus | None = None,
                 processors: Mapping[str, type[Processor[Any]]] | None = None,
                 freeze_heap: bool = False) -> None:
        """processors: drain only these (a test's or a benchmark's), not the app's queues.
        freeze_heap: once started, exempt the startup heap from garbage collection
        (see _freeze_startup_heap); for the process that runs one reactor until it
        exits (`reactor run`, `reactor dev`), not for one that builds many."""
        self.app = app
        self.settings = settings = app.settings
        self.freeze_heap = freeze_heap
        self.bus = bus or EventBus()
        self.health = Health(self.bus.publish)
        self.db = Database(settings.database_url, settings.db_pool_size,
                           statement_timeout_s=settings.db_statement_timeout_s)
        drain_settings = DrainSettings(
            batch_size=settings.max_tasks_per_cycle,
            visibility_timeout_s=settings.visibility_timeout_s,
            poll_interval_s=settings.poll_interval_s,
            policy=RetryPolicy(base_s=settings.retry_base_s, max_s=settings.retry_max_s,
                               max_attempts=settings.max_attempts,
                               outage_attempts=settings.outage_max_attempts),
            max_lost_deliveries=settings.max_lost_deliveries,
        )
        self.drainers = {
            queue: Drainer(self._processor(queue, cls), self.db, self.bus, drain_settings,
                           self.health)
            for queue, cls in (processors if processors is not None else app.processors).items()
        }
        self.listener = Listener(settings.database_url, self.db, self.bus,
                                 {q: d.wake for q, d in self.drainers.items()},
                                 probe_every_s=settings.listener_probe_s, health=self.health)
        self.token = settings.feed_token.get_secret_value() if settings.feed_token else None
        check_feed_exposure(settings.feed_host, self.token)
        self.access = Access.from_settings(settings)
        self.metrics = Metrics(lambda: self.bus.subscriber_count, app.event_kinds,
                               health=self.health)
        self.bus.add_sink(self.metrics.observe, self.metrics.observe_succeeded)
        self.metrics.watch_queues(sorted(self.drainers))
        self.waits = WaitRecorder()
        self.bus.add_sink(self.waits.observe, self.waits.observe_succeeded)
        self.feed_port = 0
        self.http_port = 0
        self._services: trio.Nursery | None = None
        self._stopping = False
        self._started = False
        self._finished = False  # run() has returned: stop() has nothing left to do

    def _processor(self, queue: str, cls: type[Processor[Any]]) -> Processor[Any]:
        # The app's declaration, unless a test or a bench drains the queue with another class.
        declared = next((q for q in self.app.queues
                         if q.name == queue and q.processor_class is cls), None)
        return cls(Context(queue=queue, db=self.db, bus=self.bus, health=self.health,
                           settings=self.settings,
                           concurrency=declared.concurrency if declared else None,
                           timeout_s=declared.timeout_s if declared else None))

    async def run(self, *, task_status: trio.TaskStatus[Reactor] = trio.TASK_STATUS_IGNORED,
                  handle_signals: bool = True) -> None:
        """Run until stop() (or SIGTERM/SIGINT when handle_signals)."""
        try:
            async with self.db.opened(), trio.open_nursery() as services, AsyncExitStack() as stack:
                self._services = services
                if handle_signals:
                    services.start_soon(self._watch_signals)
                await self._check_database()
                for drainer in self.drainers.values():
                    await stack.enter_async_context(drainer.processor.running())
                await services.start(self.listener.run)
                services.start_soon(self._report_depths)
                services.start_soon(self._record_waits)
                self.feed_port = await services.start(
                    serve_feed, self.bus, self.settings.feed_host, self.settings.feed_port,
                    self.token, self.access)
                self.http_port = await services.start(
                    serve_http, create_app(self._web_context()), self.settings.feed_host,
                    self.settings.metrics_port)
                async with trio.open_nursery() as workers:
                    for drainer in self.drainers.values():
                        await workers.start(drainer.run)
                    self._started = True
                    if self.freeze_heap:
                        _freeze_startup_heap()
                    self.bus.publish("reactor.started", queues=sorted(self.drainers))
                    task_status.started(self)
                services.cancel_scope.cancel()
        finally:
            self._finished = True

    def _web_context(self) -> WebContext:
        routes = tuple(route for drainer in self.drainers.values()
                       for route in drainer.processor.routes())
        return WebContext(db=self.db, metrics=self.metrics, token=self.token,
                          feed_port=lambda: self.feed_port,
                          listener_connected=lambda: self.listener.connected,
                          health=self.health, access=self.access,
                          extra_routes=routes, bus=self.bus)

    async def _check_database(self) -> None:
        """Wait for a database that is still starting (reported, with backoff); stop at
        once on what waiting cannot fix (startup.DatabaseRefused: wrong password, missing
        database or role, unknown host); refuse an unmigrated one."""
        await wait_for_database(self.settings.database_url)
        backoff = 0.5
        while True:
            try:
                pending, missing = await self.db.run(self._schema_gaps)
                break
            except DatabaseUnavailable as exc:
                log.warning("database unreachable; retrying (check DATABASE_URL and that "
                            "Postgres is running)", error=str(exc), retry_in_s=backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
        if pending:
            raise SchemaNotReady(
                f"the database lacks migrations {', '.join(pending)}: run `reactor migrate`")
        if missing:
            raise SchemaNotReady(
                f"the app drains {', '.join(missing)}, which the database has not registered: "
                f"add SELECT reactor.register_queue('{missing[0]}') to one of its migrations "
                "and run `reactor migrate`")

    def _schema_gaps(self, conn: psycopg.Connection) -> tuple[list[str], list[str]]:
        """Migrations not applied; queues drained here that the registry lacks."""
        pending = pending_migrations(conn, self.app.migrations)
        if pending:
            return pending, []
        rows = conn.execute(queries.UNREGISTERED_QUEUES, {"names": list(self.drainers)})
        return pending, [str(row[0]) for row in rows.fetchall()]

    def stop(self) -> None:
        """Begin the graceful shutdown (idempotent; a second call cancels at once)."""
        if self._stopping:
            for drainer in self.drainers.values():
                drainer.cancel_jobs()
            return
        self._stopping = True
        self.bus.publish("reactor.stopping", grace_s=self.settings.shutdown_grace_s)
        if not self._started and self._services is not None:
            self._services.cancel_scope.cancel()  # still waiting for the database: no jobs yet
            return
        for drainer in self.drainers.values():
            drainer.stop()
        if self._services is not None and not self._finished:
            self._services.start_soon(self._cancel_after_grace)

    async def _cancel_after_grace(self) -> None:
        with trio.move_on_after(self.settings.shutdown_grace_s):
            for drainer in self.drainers.values():
                await drainer.finished.wait()
        for drainer in self.drainers.values():
            drainer.cancel_jobs()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal received", signal=signal.Signals(signum).name)
                self.stop()

    async def _report_depths(self) -> None:
        """queue.depth events: depth and oldest message age per queue, and for the queues
        this reactor drains the age of the oldest *visible* message (one no worker holds)."""
        drained = sorted(self.drainers)

        def read(conn: psycopg.Connection) -> tuple[list[queues.QueueDepth],
                                                      dict[str, float | None]]:
            return queues.depths(conn), {q: queues.oldest_visible_age(conn, q) for q in drained}

        while True:
            try:
                depths, visible = await self.db.run(read)
                for depth in depths:
                    extra: dict[str, Any] = {}
                    if depth.queue in visible:
                        extra["oldest_visible_age_s"] = round(visible[depth.queue] or 0.0, 3)
                    self.bus.publish("queue.depth", depth.queue, depth=depth.depth,
                                     oldest_age_s=depth.oldest_age_s, **extra)
            except (DatabaseUnavailable, psycopg.Error):
                pass  # a periodic report: the listener and drainers report outages
            await trio.sleep(DEPTH_EVERY_S)

    async def _record_waits(self) -> None:
        """Write the wait times counted since the last write (reactor.engine.waits) every
        WAITS_EVERY_S, and once more on the way out, so the dashboard's percentiles
        survive a restart. What a write could not store is kept for the next one."""
        try:
            while True:
                await trio.sleep(WAITS_EVERY_S)
                await self.waits.write(self.db)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(FINAL_WAITS_WRITE_S):
                await self.waits.write(self.db)
