"""psycopg under trio: the one module that touches threads (also for CPU-bound work).

psycopg's async API is asyncio-only, so the reactor uses sync connections:
queries run in worker threads (`trio.to_thread.run_sync`) on a small pool of
connections, and the LISTEN connection is awaited with
`trio.lowlevel.wait_readable(fileno)` and then drained without blocking.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, LiteralString, TypeVar

import psycopg
import trio
from psycopg import pq

from reactor import queries

__all__ = ["Database", "DatabaseUnavailable", "ListenConnection", "connect_sync",
           "in_worker_thread"]

T = TypeVar("T")

# TCP keepalives notice a dead peer in ~25 s even when nothing is being sent.
KEEPALIVE: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 10,
                             "keepalives_interval": 5, "keepalives_count": 3}


class DatabaseUnavailable(Exception):
    """The database cannot be reached right now; retried by the caller."""


def connect_sync(url: str, application_name: str = "reactor") -> psycopg.Connection:
    """Open an autocommit connection with keepalives and the reactor's timeouts."""
    conn = psycopg.connect(url, autocommit=True, connect_timeout=5,
                           application_name=application_name, **KEEPALIVE)
    conn.execute(queries.SESSION_SETUP)
    return conn


def describe_db_error(exc: BaseException) -> str:
    """One line for a connection error, without the password of the URL."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text


class Database:
    """A bounded pool of sync connections used from trio through worker threads.

    A broken connection is dropped and replaced on next use, so a database
    restart costs the callers one error each, never a dead pool.
    """

    def __init__(self, url: str, size: int = 4) -> None:
        self.url = url
        self.size = size
        self._idle: list[psycopg.Connection] = []
        self._limiter = trio.CapacityLimiter(size)
        self._closed = False

    async def run(self, fn: Callable[[psycopg.Connection], T]) -> T:
        """Run `fn(conn)` in a worker thread on a pooled connection.

        Raises:
            DatabaseUnavailable: the connection failed (the caller retries later).
            psycopg.Error: any other database error, as raised.
        """
        async with self._limiter:
            # The worker thread may replace or drop the connection: it hands it back here.
            slot: list[psycopg.Connection | None] = [self._idle.pop() if self._idle else None]
            try:
                return await trio.to_thread.run_sync(self._call, slot, fn)
            except psycopg.OperationalError as exc:
                raise DatabaseUnavailable(describe_db_error(exc)) from exc
            finally:
                conn = slot[0]
                if conn is not None:
                    if self._closed or conn.closed:
                        conn.close()
                    else:
                        self._idle.append(conn)

    def _call(self, slot: list[psycopg.Connection | None],
              fn: Callable[[psycopg.Connection], T]) -> T:
        # In the worker thread: connect lazily, and never hand back a broken connection.
        conn = slot[0]
        if conn is None or conn.closed:
            slot[0] = None
            conn = slot[0] = connect_sync(self.url)
        try:
            return fn(conn)
        except BaseException:
            idle = conn.info.transaction_status == pq.TransactionStatus.IDLE
            if conn.broken or conn.closed or not idle:
                conn.close()
                slot[0] = None
            raise

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[Database]:
        try:
            yield self
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()


class ListenConnection:
    """A dedicated autocommit connection that LISTENs and yields notifications."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    @classmethod
    async def open(cls, url: str, channel_sql: LiteralString = queries.LISTEN) -> ListenConnection:
        def _open() -> psycopg.Connection:
            conn = connect_sync(url, "reactor listener")
            conn.execute(channel_sql)
            return conn

        try:
            return cls(await trio.to_thread.run_sync(_open))
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(describe_db_error(exc)) from exc

    async def wait(self) -> list[str]:
        """Wait until the socket is readable; return the payloads that arrived.

        Raises:
            DatabaseUnavailable: the server closed the connection or it broke.
        """
        await trio.lowlevel.wait_readable(self.conn.fileno())
        return self.pending()

    def pending(self) -> list[str]:
        """Payloads already received, without blocking."""
        try:
            return [n.payload for n in self.conn.notifies(timeout=0)]
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(describe_db_error(exc)) from exc

    def close(self) -> None:
        self.conn.close()


async def in_worker_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run CPU-bound work (rendering a PDF) off the trio thread, so nothing else stalls."""
    return await trio.to_thread.run_sync(fn, *args)
