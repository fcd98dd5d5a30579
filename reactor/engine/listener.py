"""The listener: LISTEN reactor_wakeup on a dedicated connection and wake the
drainer of the queue named in each notification.

NOTIFY is a hint, the poll is the guarantee. At start the listener sends
itself a probe; if it does not come back (a transaction pooler swallows
notifications) it says so once and the reactor runs on the poll alone (the
connections are pooler-safe from the start: reactor.engine.db). A probe after every
quiet period catches a listener that died silently. On loss it reconnects
with capped backoff, re-LISTENs, and wakes every drainer once. Nothing the
database does ends the listener: every fault is reported to Health and
waited out.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping

import psycopg
import structlog
import trio

from reactor.engine import queries
from reactor.engine.db import Database, DatabaseUnavailable, ListenConnection, describe_db_error
from reactor.engine.events import EventBus
from reactor.engine.health import Health

__all__ = ["Listener"]

log = structlog.get_logger("reactor.listener")

PROBE_PREFIX = "probe:"
RECONNECT_START_S = 0.1
RECONNECT_MAX_S = 10.0
POOLER_ADVICE = (
    "notifications do not arrive: DATABASE_URL probably goes through a transaction pooler "
    "(PgBouncer/Supavisor in transaction mode, e.g. Supabase port 6543); running on the "
    "fallback poll alone (WORKER_INTERVAL_MS). For instant "
    "wake-ups use a direct connection (port 5432 of the database) or session mode")


class Listener:
    def __init__(self, url: str, db: Database, bus: EventBus,
                 wake: Mapping[str, Callable[[], None]], *, probe_every_s: float = 30.0,
                 probe_timeout_s: float = 2.0, health: Health | None = None) -> None:
        self.url = url
        self.db = db
        self.bus = bus
        self.health = health or Health()
        self.wake = wake
        self.probe_every_s = probe_every_s
        self.probe_timeout_s = probe_timeout_s
        self.connected = False
        self.notifications_work = False
        self._probe_token: str | None = None
        self._probe_seen = trio.Event()
        self._quiet_deadline = 0.0

    def _wake_all(self) -> None:
        for wake in self.wake.values():
            wake()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen forever; reconnect on loss. started() after the first attempt."""
        backoff = RECONNECT_START_S
        started = False
        while True:
            conn: ListenConnection | None = None
            try:
                conn = await ListenConnection.open(self.url)
                self.connected = True
                backoff = RECONNECT_START_S
                self.bus.publish("listener.connected")
                self.health.clear("listener")
                self._wake_all()  # anything committed while we were away
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._receive, conn)
                    arrived = await self._probe()
                    if arrived is False:
                        self._notifications_lost()
                    elif arrived:
                        self.notifications_work = True
                    if not started:
                        started = True
                        task_status.started()
                    await self._probe_loop()
            except* (DatabaseUnavailable, psycopg.Error) as group:
                exc = group.exceptions[0]
                detail = (str(exc) if isinstance(exc, DatabaseUnavailable)
                          else describe_db_error(exc, self.url))
                if self.connected:
                    self.bus.publish("listener.lost", error=detail)
                self.health.report("listener", "listener_down", detail)
                self.connected = False
                if not started:
                    started = True
                    task_status.started()
                await trio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_MAX_S)
            finally:
                self.connected = False
                if conn is not None:
                    conn.close()

    async def _receive(self, conn: ListenConnection) -> None:
        while True:
            payloads = await conn.wait()
            for payload in payloads:
                if payload.startswith(PROBE_PREFIX):
                    if payload == f"{PROBE_PREFIX}{self._probe_token}":
                        self._probe_seen.set()
                    continue
                wake = self.wake.get(payload)
                if wake is not None:
                    wake()
                    self.bus.publish("wakeup", payload)
            self._quiet_deadline = trio.current_time() + self.probe_every_s

    def _notifications_lost(self) -> None:
        """Said once per change: the reactor now runs on the poll."""
        self.notifications_work = False
        self.health.report("notifications", "pooler", POOLER_ADVICE)

    async def _probe(self) -> bool | None:
        """NOTIFY ourselves through the pool: True if it arrives on the listener in time,
        False if not, None if it could not be sent (the database is down or read-only:
        the drainers report that; nothing is concluded about notifications)."""
        self._probe_token = secrets.token_hex(8)
        self._probe_seen = trio.Event()
        payload = f"{PROBE_PREFIX}{self._probe_token}"
        try:
            await self.db.run(lambda c: c.execute(queries.NOTIFY_PROBE, (payload,)))
        except (DatabaseUnavailable, psycopg.Error) as exc:
            log.debug("could not send the listener probe", error=str(exc))
            return None
        with trio.move_on_after(self.probe_timeout_s):
            await self._probe_seen.wait()
        if self._probe_seen.is_set():
            self.health.clear("notifications")
            return True
        return False

    async def _probe_loop(self) -> None:
        """After each quiet period, check that notifications still arrive."""
        self._quiet_deadline = trio.current_time() + self.probe_every_s
        while True:
            await trio.sleep_until(self._quiet_deadline)
            if trio.current_time() < self._quiet_deadline:
                continue  # something arrived meanwhile: the connection is alive
            arrived = await self._probe()
            if arrived is False and self.notifications_work:
                raise DatabaseUnavailable("the probe notification did not come back")
            if arrived and not self.notifications_work:
                log.info("notifications arrive now; wake-ups are instant again")
                self.notifications_work = True
            if arrived is False and not self.notifications_work:
                self._notifications_lost()
            self._quiet_deadline = trio.current_time() + self.probe_every_s
