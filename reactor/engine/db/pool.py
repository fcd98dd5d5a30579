"""`Database`: one bounded pool of connections used from trio, each call within a deadline.

One pool, one limiter: every connection of `Database` is a `_Session`, one libpq
connection with psycopg's two faces of it. `run(fn)` lends its sync face
(`psycopg.Connection`) to `fn` in a worker thread (`trio.to_thread.run_sync`);
`fetch`/`fetch_prepared`, the drainers' and the mail ledger's hot statements, use
its trio-native face (`TrioConnection`, made on the session's first such use): no
thread hop. A session serves one caller at a time, whichever face; idle ones wait
in one list; at most DB_POOL_SIZE are lent at once (one `trio.CapacityLimiter`),
so the reactor holds DB_POOL_SIZE connections and the listener's.
The statement timeout is enforced from this side (a deadline per call; past it
the query is cancelled on the server and the call fails), never with
`SET statement_timeout`, which a transaction pooler would lose or leak. A broken
or interrupted session is never reused; one that met a read-only database is
closed with every idle one (`_forget_idle`). `in_worker_thread` runs CPU-bound
work (a PDF) on a worker thread too: this package is the one place that touches
threads.

Why the pool is written here (issue 26), and is not:
- psycopg_pool's `ConnectionPool` (in the lock because pgmq asks for psycopg[pool];
  unused): its `getconn`/`putconn` wait on a `threading.Condition`, so the
  trio-native hot path would either block the trio thread while the pool opens
  a connection, or hop to a thread for every take, which is what `fetch` exists
  to avoid (~0.6 ms of a ~2 ms wake-up, docs/design-notes.md). Kept for `run`
  only, it would be a second holder of connections with its own bound beside
  the trio-native ones (up to twice DB_POOL_SIZE, as before this change), and
  its deadline, cancel-on-abandon and read-only reset would still be ours.
  `AsyncConnectionPool` is asyncio's: it does not run under trio.
- trio-native only (no worker thread for `run`): `run(fn)` hands `fn` a sync
  `psycopg.Connection`; that is the engine's API to its apps (28 `db.run`
  callers in the engine, the clinic and examples/webhooks), and the ~38
  functions they pass (queues, dead_letters, status, waits, migrate) are the
  very ones the sync CLI runs (`with_db`). Making them async would fork each
  into a sync and an async copy, or move the CLI onto trio: not done here. The
  sessions are shared instead, so `run` costs a thread hop, never a connection.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import psycopg
import structlog
import trio
from psycopg import errors as pgerrors
from psycopg import pq
from psycopg.abc import QueryNoTemplate
from psycopg.adapt import Transformer

from reactor.engine.db.connection import (
    Prepared,
    TrioConnection,
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


@dataclass(eq=False)
class _Session:
    """One connection of the pool: a libpq connection and psycopg's two faces of it.

    `conn` connects (`connect_sync`: the settings every connection of the reactor's
    has) and serves `run` in a worker thread; `native`, made on the trio thread at
    the first `fetch`, wraps the same libpq connection. Both are autocommit and
    never prepare on their own; closing either closes the session.
    """

    conn: psycopg.Connection
    native: TrioConnection | None = None

    @property
    def closed(self) -> bool:
        return self.conn.closed

    def reusable(self) -> bool:
        """Open, sound, idle (no transaction left open, no statement running) and in
        autocommit, as every caller of either face expects it."""
        conn = self.conn
        return not (conn.closed or conn.broken) and conn.autocommit and (
            conn.info.transaction_status == pq.TransactionStatus.IDLE)

    def close(self) -> None:
        self.conn.close()

    async def trio_face(self) -> TrioConnection:
        """The trio-native face of this session (made once; no I/O)."""
        if self.native is None:
            native = TrioConnection(self.conn.pgconn)
            await native.set_autocommit(True)  # a check of the state only: nothing is sent
            native.prepare_threshold = None  # poolers (see reactor.engine.db's docstring)
            native.prepared_names = set()
            native.loader = Transformer(native)
            self.native = native
        return self.native


@dataclass(eq=False)
class _Lease:
    """A session lent to one worker thread; the thread hands it back here.

    If the caller is cancelled while the thread still runs (deadline passed, or
    shutdown), the call is abandoned: the thread closes the session when it
    ends, and it never returns to the pool.
    """

    session: _Session | None
    lock: threading.Lock = field(default_factory=threading.Lock)
    abandoned: bool = False
    finished: bool = False


class Database:
    """One bounded pool of connections, used from trio (see the module docstring).

    A broken connection is dropped and replaced on next use, so a database
    restart costs the callers one error each, never a dead pool.
    """

    def __init__(self, url: str, size: int = 4, *,
                 statement_timeout_s: float = STATEMENT_TIMEOUT_S) -> None:
        self.url = url
        self.size = size
        self.statement_timeout_s = statement_timeout_s
        # Idle sessions. Popped by the trio thread (fetch) and by worker threads (run):
        # list.pop and list.append are atomic.
        self._idle: list[_Session] = []
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
            # The worker thread takes an idle session itself: if the thread never
            # starts (cancelled before it was scheduled), no session is left behind.
            lease = _Lease(None)
            try:
                with trio.move_on_after(self.statement_timeout_s):
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
                self._give_back(lease)

    def _give_back(self, lease: _Lease) -> None:
        with lease.lock:
            if not lease.finished:
                # Still running in its thread (we were cancelled: our deadline, the
                # caller's own, or shutdown): the server is asked to stop the statement
                # whoever cut it, so the thread ends soon and closes the session; left
                # to run, abandoned threads held connections beyond DB_POOL_SIZE (review).
                lease.abandoned = True
                session = lease.session
                if session is not None:
                    _cancel_in_background(partial(session.conn.cancel_safe,
                                                  timeout=CANCEL_WAIT_S))
                return
        session = lease.session
        if session is None:
            return
        if self._closed or session.closed:
            session.close()
        else:
            self._idle.append(session)

    def _call(self, lease: _Lease, fn: Callable[[psycopg.Connection], T]) -> T:
        # In the worker thread: connect lazily, and never hand back a broken connection.
        try:
            session = lease.session = self._pop_idle()
            if session is None:
                session = lease.session = _Session(connect_sync(self.url))
            try:
                result = fn(session.conn)
            except BaseException as exc:
                if not session.reusable() or _stuck_read_only(exc):
                    session.close()
                    lease.session = None
                raise
            if not session.reusable():
                # `fn` left a transaction open (or autocommit off): lent on, the next
                # caller's statements would run inside it and be rolled back unseen.
                session.close()
                lease.session = None
            return result
        finally:
            with lease.lock:
                lease.finished = True
                if lease.abandoned and lease.session is not None:
                    lease.session.close()

    def _pop_idle(self) -> _Session | None:
        """An idle session that is still open (from any thread), or None."""
        while True:
            try:
                session = self._idle.pop()
            except IndexError:
                return None
            if not session.closed:
                return session

    async def fetch(self, query: QueryNoTemplate, params: Mapping[str, Any] | None = None,
                    *, finish_within_s: float | None = None) -> list[tuple[Any, ...]]:
        """Run one statement on a session's trio-native face (no thread hop); its rows.

        For the hot path only: a statement that the server answers quickly and
        whose result is small (the drainers' archive-and-read). The rules are
        those of `run`: the same deadline, the same errors, a broken or
        interrupted connection is never reused.

        finish_within_s: once the statement is sent, wait for its answer even if the
        caller is cancelled (shutdown, a job's deadline), for at most this long (then
        it is cut like any statement past its deadline): for a write whose commit
        the caller must know about (a mail's ledger claim). The wait for a
        connection stays cancellable.

        Raises:
            DatabaseUnavailable: as `run`.
            psycopg.Error: any other database error, as raised.
        """
        return await self._on_native(partial(_rows_of, query=query, params=params),
                                     finish_within_s=finish_within_s)

    async def fetch_bound(self, query: bytes) -> list[tuple[Any, ...]]:
        """`fetch` for a statement with every value bound in: sent as it is (the simple
        query protocol), its rows loaded by psycopg's loaders, with no cursor and no
        parameters to dump. A busy drainer's archive-and-take (queues.Take.archive_of)."""
        return await self._on_native(partial(_simple_rows, query=query))

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
            conn.pgconn.finish()  # see fetch_prepared (the session is closed with it)
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

    async def _on_native(self, run: Callable[[TrioConnection], Awaitable[list[tuple[Any, ...]]]],
                         *, finish_within_s: float | None = None
                         ) -> list[tuple[Any, ...]]:
        """Run `run(conn)` on an idle session's trio-native face, within the deadline
        (once it runs, shielded from the caller's cancellation for `finish_within_s`)."""
        # A free token is taken without first yielding to the scheduler (which `async with`
        # would): one scheduling round less on every wake-up; the statement's own waits
        # are the checkpoints.
        try:
            self._limiter.acquire_nowait()
        except trio.WouldBlock:
            await self._limiter.acquire()
        try:
            session: _Session | None = None
            cut = True  # until the server has answered (rows or an error)
            stale = False  # a session that keeps refusing what a new one may accept
            bound_s = self.statement_timeout_s
            try:
                with trio.move_on_after(bound_s) as deadline:
                    session = await self._session()
                    face = await session.trio_face()
                    statement = trio.CancelScope(deadline=deadline.deadline)
                    if finish_within_s is not None:
                        bound_s = min(bound_s, finish_within_s)
                        statement.shield = True
                        statement.deadline = min(deadline.deadline,
                                                 trio.current_time() + finish_within_s)
                    with statement:
                        rows = await run(face)
                        cut = False
                        return rows
                raise DatabaseUnavailable(f"the database did not answer within {bound_s:g}s",
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
                if session is not None:
                    await self._give_back_native(session, interrupted=cut, reusable=not stale)
        finally:
            self._limiter.release()

    async def _session(self) -> _Session:
        """An idle session, or a new one (connected in a worker thread: libpq resolves
        host names with a blocking call)."""
        session = self._pop_idle()
        if session is not None:
            return session
        lease = _Lease(None)
        handed_over = False
        try:
            session = await trio.to_thread.run_sync(self._connect, lease,
                                                    abandon_on_cancel=True)
            handed_over = True
            return session
        finally:
            with lease.lock:
                if not lease.finished:
                    lease.abandoned = True  # the thread closes what it opens
                elif not handed_over and lease.session is not None:
                    # Connected just as the caller was cancelled: nobody else will close it.
                    lease.session.close()

    def _connect(self, lease: _Lease) -> _Session:
        # In a worker thread.
        try:
            session = lease.session = _Session(connect_sync(self.url))
            return session
        finally:
            with lease.lock:
                lease.finished = True
                if lease.abandoned and lease.session is not None:
                    lease.session.close()

    async def _give_back_native(self, session: _Session, *, interrupted: bool,
                                reusable: bool = True) -> None:
        """Keep a session that is idle, sound and `reusable`; otherwise close it.

        One cut off mid-statement (deadline, shutdown) is cancelled on the server
        first, and that is waited for (shielded, at most CANCEL_WAIT_S): when the
        caller goes on, the server has taken the cancel request, and the statement's
        backend stops at its next interrupt check (a moment later, when it is next
        scheduled), its transaction rolled back: it cannot take messages the caller
        releases next.
        """
        if reusable and not (self._closed or interrupted) and session.reusable():
            self._idle.append(session)
            return
        if session.closed:
            return
        try:
            if session.conn.info.transaction_status == pq.TransactionStatus.ACTIVE:
                with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_WAIT_S):
                    await trio.to_thread.run_sync(_cancel_quietly, session.conn.cancel,
                                                  abandon_on_cancel=True)
        finally:
            session.close()

    def _forget_idle(self) -> None:
        """Close every idle session: they may be stuck as they were opened (read-only, see
        errors._stuck_read_only); the next calls open fresh ones."""
        idle, self._idle = self._idle, []
        while True:
            try:  # a worker thread may pop from `idle` meanwhile: one at a time, never skipped
                session = idle.pop()
            except IndexError:
                return
            session.close()

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
