"""`Database`: bounded pools of connections, used from trio, each call within a deadline.

Two kinds of connection (why: the package docstring, reactor.engine.db), one
limiter over both:
- sync connections for most statements (`Database.run`): they run in worker
  threads (`trio.to_thread.run_sync`);
- trio-native connections (`TrioConnection`) for the drainers' hot statement
  (`Database.fetch`, `Database.fetch_prepared`): no thread hop.
The statement timeout is enforced from this side (a deadline per call; past it
the query is cancelled on the server and the call fails), never with
`SET statement_timeout`, which a transaction pooler would lose or leak. A broken
or interrupted connection is never reused. `in_worker_thread` runs CPU-bound work
(a PDF) on a worker thread too: this package is the one place that touches threads.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, TypeVar

import psycopg
import structlog
import trio
from psycopg import errors as pgerrors
from psycopg import pq
from psycopg.abc import QueryNoTemplate
from psycopg.adapt import Transformer
from psycopg.conninfo import make_conninfo

from reactor.engine.db.connection import (
    CONNECT,
    ISO_DATES,
    Prepared,
    TrioConnection,
    _needs_iso_dates,
    _rows_of,
    _simple_rows,
    connect_sync,
)
from reactor.engine.db.errors import (
    DatabaseUnavailable,
    _stuck_read_only,
    describe_db_error,
    reason_of,
)

__all__ = ["CANCEL_WAIT_S", "STATEMENT_TIMEOUT_S", "Database", "in_worker_thread"]

log = structlog.get_logger("reactor.engine.db")

T = TypeVar("T")

# No single statement of the reactor's may run longer than this (client-side deadline).
STATEMENT_TIMEOUT_S = 30.0
# Asking the server to stop an interrupted statement may take this long (a thread).
CANCEL_WAIT_S = 5.0


ConnT = TypeVar("ConnT", psycopg.Connection, TrioConnection)


@dataclass(eq=False)
class _Lease(Generic[ConnT]):
    """A connection lent to one worker thread; the thread hands it back here.

    If the caller is cancelled while the thread still runs (deadline passed, or
    shutdown), the call is abandoned: the thread closes the connection when it
    ends, and it never returns to the pool.
    """

    conn: ConnT | None
    lock: threading.Lock = field(default_factory=threading.Lock)
    abandoned: bool = False
    finished: bool = False


class Database:
    """A bounded pool of sync connections used from trio through worker threads.

    A broken connection is dropped and replaced on next use, so a database
    restart costs the callers one error each, never a dead pool.
    """

    def __init__(self, url: str, size: int = 4, *,
                 statement_timeout_s: float = STATEMENT_TIMEOUT_S) -> None:
        self.url = url
        self.size = size
        self.statement_timeout_s = statement_timeout_s
        self._idle: list[psycopg.Connection] = []
        # The trio-native connections of `fetch` (one per drainer in practice).
        self._native_idle: list[TrioConnection] = []
        self._limiter = trio.CapacityLimiter(size)
        self._closed = False
        # Off once a prepared statement went missing between two of our statements: the
        # server connection changes under us (a transaction pooler).
        self.prepared_statements = True

    async def run(self, fn: Callable[[psycopg.Connection], T]) -> T:
        """Run `fn(conn)` in a worker thread on a pooled connection, within the deadline.

        Raises:
            DatabaseUnavailable: the database cannot serve us now (unreachable,
                read-only, too slow, a pooler mix-up): the caller retries later.
            psycopg.Error: any other database error, as raised.
        """
        async with self._limiter:
            # The worker thread takes an idle connection itself: if the thread never
            # starts (cancelled before it was scheduled), no connection is left behind.
            lease: _Lease[psycopg.Connection] = _Lease(None)
            try:
                with trio.move_on_after(self.statement_timeout_s) as deadline:
                    return await trio.to_thread.run_sync(self._call, lease, fn,
                                                         abandon_on_cancel=True)
                raise DatabaseUnavailable(
                    f"the database did not answer within {self.statement_timeout_s:g}s",
                    "database_unreachable")
            except psycopg.Error as exc:
                if _stuck_read_only(exc):
                    self._forget_idle()
                reason = reason_of(exc)
                if reason is None:
                    raise
                raise DatabaseUnavailable(describe_db_error(exc, self.url), reason) from exc
            finally:
                self._give_back(lease, timed_out=deadline.cancelled_caught)

    def _give_back(self, lease: _Lease[psycopg.Connection], *, timed_out: bool) -> None:
        with lease.lock:
            if not lease.finished:
                # Still running in its thread (we were cancelled): the thread closes it.
                lease.abandoned = True
                conn = lease.conn
                if timed_out and conn is not None:
                    _cancel_in_background(partial(conn.cancel_safe, timeout=CANCEL_WAIT_S))
                return
        conn = lease.conn
        if conn is None:
            return
        if self._closed or conn.closed:
            conn.close()
        else:
            self._idle.append(conn)

    def _call(self, lease: _Lease[psycopg.Connection], fn: Callable[[psycopg.Connection], T]) -> T:
        # In the worker thread: connect lazily, and never hand back a broken connection.
        try:
            try:
                lease.conn = self._idle.pop()  # atomic under the GIL
            except IndexError:
                lease.conn = None
            conn = lease.conn
            if conn is None or conn.closed:
                lease.conn = None
                conn = lease.conn = connect_sync(self.url)
            try:
                return fn(conn)
            except BaseException as exc:
                idle = conn.info.transaction_status == pq.TransactionStatus.IDLE
                if conn.broken or conn.closed or not idle or _stuck_read_only(exc):
                    conn.close()
                    lease.conn = None
                raise
        finally:
            with lease.lock:
                lease.finished = True
                if lease.abandoned and lease.conn is not None:
                    lease.conn.close()

    async def fetch(self, query: QueryNoTemplate, params: Mapping[str, Any] | None = None
                    ) -> list[tuple[Any, ...]]:
        """Run one statement on a trio-native connection (no thread hop); its rows.

        For the hot path only: a statement that the server answers quickly and
        whose result is small (the drainers' archive-and-read). The rules are
        those of `run`: the same deadline, the same errors, a broken or
        interrupted connection is never reused.

        Raises:
            DatabaseUnavailable: as `run`.
            psycopg.Error: any other database error, as raised.
        """
        return await self._on_native(partial(_rows_of, query=query, params=params))

    async def fetch_prepared(self, statement: Prepared) -> list[tuple[Any, ...]]:
        """`fetch` for a statement run prepared (prepared on first use on each connection).

        Where the statement vanished between two of our statements (a transaction
        pooler moved us to another server connection), or went stale (its table
        changed: a pooler's server session would keep the stale one under its
        name), it runs unprepared, now and from then on (`_stop_preparing`). A
        connection on which running it failed otherwise is closed, not kept.

        Raises:
            DatabaseUnavailable: as `run`.
            psycopg.Error: any other database error, as raised.
        """
        if not self.prepared_statements:
            return await self.fetch(statement.text)
        return await self._on_native(partial(self._run_prepared, statement))

    async def _run_prepared(self, statement: Prepared, conn: TrioConnection
                            ) -> list[tuple[Any, ...]]:
        try:
            if statement.name not in conn.prepared_names:
                # A server connection that has it already has this very text (by its name).
                with suppress(pgerrors.DuplicatePreparedStatement):
                    await conn.execute(statement.prepare)
                conn.prepared_names.add(statement.name)
            try:
                return await _simple_rows(conn, statement.execute)
            except (pgerrors.InvalidSqlStatementName, pgerrors.FeatureNotSupported) as exc:
                self._stop_preparing(exc)
                conn.prepared_names.clear()
                return await _simple_rows(conn, statement.text)
        except psycopg.Error:
            conn.pgconn.finish()  # see fetch_prepared
            raise

    def _stop_preparing(self, exc: psycopg.Error) -> None:
        """Run prepared statements unprepared from now on, and say why once.

        InvalidSqlStatementName: ours went missing between two of our statements (a
        transaction pooler ran them on different server connections).
        FeatureNotSupported: "cached plan must not change result type": the table
        changed under it, and behind a pooler that server session outlives our
        connection, so preparing it again would find the stale one under its name.
        """
        if not self.prepared_statements:
            return  # another drainer's take found it first and said so
        self.prepared_statements = False
        if isinstance(exc, pgerrors.InvalidSqlStatementName):
            why = ("prepared statements do not last between statements on this database "
                   "connection (a transaction pooler?)")
        else:
            why = ("the prepared wake-up take went stale (its queue table changed); "
                   "restart the reactor to prepare it again")
        log.info(f"{why}: the wake-up take is planned at every call from now on",
                 error=describe_db_error(exc, self.url))

    async def _on_native(self, run: Callable[[TrioConnection], Awaitable[list[tuple[Any, ...]]]]
                         ) -> list[tuple[Any, ...]]:
        """Run `run(conn)` on an idle trio-native connection, within the deadline (fetch)."""
        # A free token is taken without first yielding to the scheduler (which `async with`
        # would): one scheduling round less on every wake-up; the statement's own waits
        # are the checkpoints.
        try:
            self._limiter.acquire_nowait()
        except trio.WouldBlock:
            await self._limiter.acquire()
        try:
            conn: TrioConnection | None = None
            cut = True  # until the server has answered (rows or an error)
            stale = False  # a session that keeps refusing what a new one may accept
            try:
                with trio.move_on_after(self.statement_timeout_s):
                    conn = await self._native()
                    rows = await run(conn)
                    cut = False
                    return rows
                raise DatabaseUnavailable(
                    f"the database did not answer within {self.statement_timeout_s:g}s",
                    "database_unreachable")
            except psycopg.Error as exc:
                cut = False  # an answer; whether the connection still works is checked below
                stale = _stuck_read_only(exc)
                if stale:
                    self._forget_idle()
                reason = reason_of(exc)
                if reason is None:
                    raise
                raise DatabaseUnavailable(describe_db_error(exc, self.url), reason) from exc
            finally:
                if conn is not None:
                    await self._give_back_native(conn, interrupted=cut, reusable=not stale)
        finally:
            self._limiter.release()

    async def _native(self) -> TrioConnection:
        """An idle trio-native connection, or a new one (connected in a worker thread:
        libpq resolves host names with a blocking call)."""
        while self._native_idle:
            conn = self._native_idle.pop()
            if not conn.closed:
                return conn
        lease: _Lease[TrioConnection] = _Lease(None)
        handed_over = False
        try:
            conn = await trio.to_thread.run_sync(self._connect_native, lease,
                                                 abandon_on_cancel=True)
            handed_over = True
            return conn
        finally:
            with lease.lock:
                if not lease.finished:
                    lease.abandoned = True  # the thread closes what it opens
                elif not handed_over and lease.conn is not None:
                    # Connected just as the caller was cancelled: nobody else will close it.
                    lease.conn.pgconn.finish()

    def _connect_native(self, lease: _Lease[TrioConnection]) -> TrioConnection:
        # In a worker thread. The connection keeps the settings of connect_sync.
        try:
            conninfo = make_conninfo(self.url, application_name="reactor", **CONNECT)
            pgconn = pq.PGconn.connect(conninfo.encode())
            if pgconn.status != pq.ConnStatus.OK:
                message = pgconn.get_error_message()
                pgconn.finish()
                raise psycopg.OperationalError(f"connection failed: {message}")
            if _needs_iso_dates(pgconn):  # (blocking: this is a worker thread)
                result = pgconn.exec_(ISO_DATES)
                if result.status != pq.ExecStatus.COMMAND_OK:
                    message = pgconn.get_error_message()
                    pgconn.finish()
                    raise psycopg.OperationalError(f"could not set DateStyle ISO: {message}")
            pgconn.nonblocking = 1
            conn = lease.conn = TrioConnection(pgconn)
            conn._autocommit = True  # idle and fresh: no statement needed to say so
            conn.prepared_names = set()
            conn.loader = Transformer(conn)
            conn.prepare_threshold = None  # poolers (see reactor.engine.db's docstring)
            return conn
        finally:
            with lease.lock:
                lease.finished = True
                if lease.abandoned and lease.conn is not None:
                    lease.conn.pgconn.finish()

    async def _give_back_native(self, conn: TrioConnection, *, interrupted: bool,
                                reusable: bool = True) -> None:
        """Keep a connection that is idle, sound and `reusable`; otherwise close it.

        One cut off mid-statement (deadline, shutdown) is cancelled on the server
        first, and that is waited for (shielded, at most CANCEL_WAIT_S): when the
        caller goes on, the statement is no longer running, so it cannot take
        messages the caller releases next.
        """
        idle = conn.info.transaction_status == pq.TransactionStatus.IDLE
        if reusable and not (self._closed or conn.closed or conn.broken or not idle
                             or interrupted):
            self._native_idle.append(conn)
            return
        if conn.closed:
            return
        try:
            if conn.info.transaction_status == pq.TransactionStatus.ACTIVE:
                with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_WAIT_S):
                    await trio.to_thread.run_sync(_cancel_quietly, conn.cancel,
                                                  abandon_on_cancel=True)
        finally:
            conn.pgconn.finish()

    def _forget_idle(self) -> None:
        """Close every idle connection of both pools: their sessions may be stuck as they
        were opened (read-only, see errors._stuck_read_only); the next calls open fresh ones."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        native, self._native_idle = self._native_idle, []
        for trio_conn in native:
            trio_conn.pgconn.finish()

    async def aclose(self) -> None:
        self._closed = True
        self._forget_idle()

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[Database]:
        try:
            yield self
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()


def _cancel_in_background(cancel_query: Callable[[], None]) -> None:
    """Ask the server to stop the query of an abandoned call (a thread: it is network I/O)."""
    threading.Thread(target=_cancel_quietly, args=(cancel_query,), name="reactor-db-cancel",
                     daemon=True).start()


def _cancel_quietly(cancel_query: Callable[[], None]) -> None:
    """Ask the server to stop a statement (blocking: run it in a thread)."""
    try:
        cancel_query()
    except Exception as exc:  # the connection may be gone already; nothing else to do
        log.debug("could not cancel an interrupted statement", error=type(exc).__name__)


async def in_worker_thread(fn: Callable[..., T], *args: Any, abandon_on_cancel: bool = False) -> T:
    """Run CPU-bound work (rendering a PDF) off the trio thread, so nothing else stalls.

    With `abandon_on_cancel`, a cancelled caller (job timeout, shutdown) returns at
    once and the thread's result is thrown away: use it for pure computations only.
    """
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=abandon_on_cancel)
