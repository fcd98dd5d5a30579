"""The listener: LISTEN reactor_wakeup on a dedicated connection and wake the
drainer of the queue named in each notification.

NOTIFY is a hint, the poll is the guarantee. At start the listener sends
itself a probe; if it does not come back (a transaction pooler swallows
notifications) it warns and the reactor runs on the poll alone. A probe
after every quiet period catches a listener that died silently. On loss it
reconnects with capped backoff, re-LISTENs, and wakes every drainer once.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping

import structlog
import trio

from reactor import queries
from reactor.core.events import EventBus
from reactor.db import Database, DatabaseUnavailable, ListenConnection

__all__ = ["Listener"]

log = structlog.get_logger("reactor.listener")

PROBE_PREFIX = "probe:"
RECONNECT_START_S = 0.1
RECONNECT_MAX_S = 10.0


class Listener:
    def __init__(self, url: str, db: Database, bus: EventBus,
                 wake: Mapping[str, Callable[[], None]], *, probe_every_s: float = 30.0,
                 probe_timeout_s: float = 2.0) -> None:
        self.url = url
        self.db = db
        self.bus = bus
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
                self._wake_all()  # anything committed while we were away
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._receive, conn)
                    self.notifications_work = await self._check_probe()
                    if not self.notifications_work:
                        log.warning(
                            "notifications do not arrive: DATABASE_URL probably goes through a "
                            "transaction pooler; running on the fallback poll alone (use a "
                            "direct or session-mode connection for instant wake-ups)")
                    if not started:
                        started = True
                        task_status.started()
                    await self._probe_loop()
            except* DatabaseUnavailable as group:
                exc = group.exceptions[0]
                if self.connected:
                    self.bus.publish("listener.lost", error=str(exc))
                else:
                    log.warning("database unreachable; retrying", error=str(exc),
                                retry_in_s=backoff)
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

    async def _check_probe(self) -> bool:
        """NOTIFY ourselves through the pool; True if it arrives on the listener in time."""
        self._probe_token = secrets.token_hex(8)
        self._probe_seen = trio.Event()
        payload = f"{PROBE_PREFIX}{self._probe_token}"
        await self.db.run(lambda c: c.execute(queries.NOTIFY_PROBE, (payload,)))
        with trio.move_on_after(self.probe_timeout_s):
            await self._probe_seen.wait()
        return self._probe_seen.is_set()

    async def _probe_loop(self) -> None:
        """After each quiet period, check that notifications still arrive."""
        self._quiet_deadline = trio.current_time() + self.probe_every_s
        while True:
            await trio.sleep_until(self._quiet_deadline)
            if trio.current_time() < self._quiet_deadline:
                continue  # something arrived meanwhile: the connection is alive
            ok = await self._check_probe()
            if not ok and self.notifications_work:
                raise DatabaseUnavailable("the probe notification did not come back")
            if ok and not self.notifications_work:
                log.info("notifications arrive now; wake-ups are instant again")
            self.notifications_work = self.notifications_work or ok
            self._quiet_deadline = trio.current_time() + self.probe_every_s
