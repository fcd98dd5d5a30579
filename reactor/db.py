"""psycopg under trio: the one module that touches threads (also for CPU-bound work).

psycopg's async API waits with asyncio, so the reactor uses two kinds of connection:
- sync connections for most statements: they run in worker threads
  (`trio.to_thread.run_sync`) on a small pool, and the LISTEN connection is
  awaited with `trio.lowlevel.wait_readable(fileno)` and drained without blocking;
- for the drainers' hot statement (archive the finished, read the next batch) a
  psycopg AsyncConnection whose waits are trio's (`Database.fetch`): no thread
  hop, which on a quiet machine costs more than the statement itself (a worker
  thread and then the trio thread must both be woken: ~0.6 ms of a ~2 ms wake-up).

Everything here must also work through a transaction pooler (PgBouncer or
Supabase's Supavisor in transaction mode), where consecutive statements of
one client may run on different server connections:
- no session state is relied on: the statement timeout is enforced from this
  side (a deadline per call; past it the query is cancelled on the server and
  the call fails), never with `SET statement_timeout`, which a pooler would
  lose or, worse, leak to other clients of the same server connection;
- no automatic server-side prepared statements (`prepare_threshold=None`): a
  pooler runs consecutive statements of one client on different server
  connections, where psycopg's numbered ones collide ("prepared statement
  "_pg3_3" does not exist", or worse, another statement under that name).
  The one statement run prepared (the wake-up take: `Prepared`,
  `Database.fetch_prepared`) is named after a hash of its text, so a name
  means the same statement on every server connection; where it turns out not
  to persist (a transaction pooler) it is run unprepared from then on.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, LiteralString, TypeVar
from urllib.parse import unquote, urlsplit

import psycopg
import structlog
import trio
from psycopg import errors as pgerrors
from psycopg import generators, pq
from psycopg.abc import PQGen, QueryNoTemplate
from psycopg.abc import Transformer as Loader
from psycopg.adapt import Transformer
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow
from psycopg.waiting import Ready, Wait

from reactor import queries

__all__ = ["Database", "DatabaseUnavailable", "ListenConnection", "Prepared", "connect_sync",
           "describe_db_error", "in_worker_thread", "reason_of"]

log = structlog.get_logger("reactor.db")

T = TypeVar("T")
RV = TypeVar("RV")

# TCP keepalives notice a dead peer in ~25 s even when nothing is being sent.
KEEPALIVE: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 10,
                             "keepalives_interval": 5, "keepalives_count": 3}
# No single statement of the reactor's may run longer than this (client-side deadline).
STATEMENT_TIMEOUT_S = 30.0
# Asking the server to stop an interrupted statement may take this long (a thread).
CANCEL_WAIT_S = 5.0
# Errors that mean "a pooler shuffled prepared statements between server connections"
# (ours are off; another client's, or a pooler's own, can still show up).
_PREPARED_STATEMENT_ERRORS = (pgerrors.InvalidSqlStatementName, pgerrors.DuplicatePreparedStatement)


class DatabaseUnavailable(Exception):
    """The database cannot do what we ask right now; retried by the caller.

    `reason` is a health reason class (reactor.core.health): database_unreachable,
    database_read_only or database_error.
    """

    def __init__(self, message: str, reason: str = "database_unreachable") -> None:
        super().__init__(message)
        self.reason = reason


def reason_of(exc: psycopg.Error) -> str | None:
    """The health reason class of a database error the caller should wait out, else None.

    Unreachable, read-only (a standby after failover, or default_transaction_read_only),
    and a pooler's prepared-statement mix-ups are conditions of the database, not of
    the statement: waiting (with backoff) is the cure.
    """
    if isinstance(exc, pgerrors.ReadOnlySqlTransaction):
        return "database_read_only"
    if isinstance(exc, psycopg.OperationalError):
        return "database_unreachable"
    if isinstance(exc, _PREPARED_STATEMENT_ERRORS):
        return "database_error"
    return None


def _stuck_read_only(exc: BaseException) -> bool:
    """A session that refused a write as read-only stays so: `default_transaction_read_only`
    set for its database or role (ALTER DATABASE ... SET) binds a session for life. It
    is closed, and the idle ones with it (opened in the same spell, most likely), so that
    the next statements see the database as it is by then."""
    return isinstance(exc, pgerrors.ReadOnlySqlTransaction)


def describe_db_error(exc: BaseException, url: str | None = None) -> str:
    """One line for a database error, with the URL's password scrubbed out.

    libpq quotes parts of the connection string in some errors (a `%` in the
    password that is not valid percent-encoding makes it quote the password).
    """
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, pgerrors.ReadOnlySqlTransaction):
        text = f"the database is read-only (a standby after failover, or in recovery?): {text}"
    return scrub(text, url)


def scrub(text: str, url: str | None) -> str:
    """Remove the password of `url` (raw and decoded) from `text`."""
    if not url:
        return text
    try:
        raw = urlsplit(url).password
    except ValueError:
        raw = None
    if raw is None and "://" in url and "@" in url:
        # urlsplit could not parse it: take what lies between the first ':' after the
        # scheme and the last '@' as the password.
        userinfo = url.split("://", 1)[1].rsplit("@", 1)[0]
        raw = userinfo.split(":", 1)[1] if ":" in userinfo else None
    for secret in {raw, unquote(raw) if raw else None} - {None, ""}:
        assert secret is not None
        text = text.replace(secret, "***")
    return text


# How every connection of the reactor's connects (sync or trio-native). UTF-8 whatever the
# database or role sets (ALTER DATABASE ... SET client_encoding): a body or a notification
# the session's encoding cannot carry would fail every take of its queue, or cut the
# listener. A startup parameter: PgBouncer tracks it per client.
CONNECT: dict[str, Any] = {"connect_timeout": 5, "client_encoding": "UTF8", **KEEPALIVE}
# psycopg reads dates and times in DateStyle ISO only (another raises NotImplementedError
# on the first timestamptz, the take's enqueued_at).
ISO_DATES = b"SET DateStyle = 'ISO'"


def _needs_iso_dates(pgconn: pq.abc.PGconn) -> bool:
    """Whether the session's DateStyle (a database or role may set one) is not ISO. SET
    is then the one way: `options` in the startup packet is refused by PgBouncer, which
    does track DateStyle per client, so the SET holds behind it and leaks to no one."""
    style = pgconn.parameter_status(b"DateStyle")
    return style is not None and not style.startswith(b"ISO")


def connect_sync(url: str, application_name: str = "reactor") -> psycopg.Connection:
    """Open an autocommit connection with keepalives; no session settings (but ISO dates,
    if the database sets another style) and no prepared statements, so it works through
    a transaction pooler (see above)."""
    conn = psycopg.connect(url, autocommit=True, prepare_threshold=None,
                           application_name=application_name, **CONNECT)
    if _needs_iso_dates(conn.pgconn):
        try:
            conn.execute(ISO_DATES)
        except BaseException:
            conn.close()
            raise
    return conn


class TrioConnection(psycopg.AsyncConnection[TupleRow]):
    """psycopg's AsyncConnection, waiting with trio instead of asyncio.

    psycopg runs every operation as a generator that says what it waits for (a
    readable or writable socket) and lets the connection's `wait` do the
    waiting; here that is trio.lowlevel.wait_readable / wait_writable (the way
    psycopg's author showed for anyio). Two rules keep it sound, and `Database`
    keeps both: one trio task uses a connection at a time (psycopg's internal
    asyncio.Lock is then never contended, so it never touches an event loop),
    and a connection whose wait was cancelled mid-statement is thrown away.
    """

    # The `Prepared` statements this connection's server session holds, by name.
    prepared_names: set[str]
    # Turns the rows of a result into Python values, as a cursor would (_simple_rows).
    loader: Loader

    async def wait(self, gen: PQGen[RV], interval: float = 0.0,
                   timeout: float | None = None) -> RV:  # noqa: ASYNC109 (psycopg's signature)
        del interval  # no need to wake up for Ctrl-C: trio delivers it as a cancellation
        fileno = self.pgconn.socket
        with trio.move_on_after(math.inf if timeout is None else timeout):
            try:
                state = next(gen)
                while True:
                    if state == Wait.R:
                        await trio.lowlevel.wait_readable(fileno)
                        state = gen.send(Ready.R)
                    elif state == Wait.W:
                        await trio.lowlevel.wait_writable(fileno)
                        state = gen.send(Ready.W)
                    else:  # Wait.RW: a big query still being written while results arrive
                        state = gen.send(await _readable_or_writable(fileno))
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
        raise pgerrors.ConnectionTimeout("wait timeout expired")


async def _readable_or_writable(fileno: int) -> Ready:
    """Wait until the socket can be read or written; say which."""
    ready = 0
    async with trio.open_nursery() as nursery:
        async def one(waiter: Callable[[int], Any], flag: Ready) -> None:
            nonlocal ready
            await waiter(fileno)
            ready |= flag
            nursery.cancel_scope.cancel()

        nursery.start_soon(one, trio.lowlevel.wait_readable, Ready.R)
        nursery.start_soon(one, trio.lowlevel.wait_writable, Ready.W)
    return Ready(ready)


async def _rows_of(conn: TrioConnection, query: QueryNoTemplate,
                   params: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
    """Run one statement; its rows (none for a statement that returns no rows)."""
    cursor = conn.cursor()
    await cursor.execute(query, params)
    return await cursor.fetchall() if cursor.description else []


async def _simple_rows(conn: TrioConnection, query: bytes) -> list[tuple[Any, ...]]:
    """`_rows_of` for a statement without parameters, without a cursor: the simple query
    protocol (what a cursor sends for it too) and psycopg's own loaders. For the wake-up
    take, where a cursor's bookkeeping cost a fifth of the wake-up (0.14 of 0.7 ms
    measured after an idle spell, when little of it is in the CPU's caches)."""
    pgconn = conn.pgconn
    pgconn.send_query(query)
    results = await conn.wait(generators.execute(pgconn))
    for result in results:
        if result.status == pq.ExecStatus.FATAL_ERROR:
            raise pgerrors.error_from_result(result, encoding=conn.info.encoding)
    result = results[-1]
    if result.status != pq.ExecStatus.TUPLES_OK:
        raise psycopg.ProgrammingError(f"expected rows, got {result.status.name}")
    conn.loader.set_pgresult(result)
    try:
        rows: list[tuple[Any, ...]] = conn.loader.load_rows(0, result.ntuples, tuple)
    finally:
        conn.loader.set_pgresult(None)
    return rows


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


@dataclass(frozen=True)
class Prepared:
    """A statement with every value bound in, run as a server-side prepared statement.

    Planned once per connection instead of at every call (Postgres keeps one
    generic plan for a statement without parameters). Named after a hash of its
    text: behind a pooler that runs our statements on other server connections,
    a name either means this very statement or does not exist there, never
    another statement.
    """

    text: bytes
    name: str

    @classmethod
    def of(cls, text: bytes) -> Prepared:
        return cls(text, "reactor_" + hashlib.sha256(text).hexdigest()[:32])

    @property
    def prepare(self) -> bytes:
        return b"PREPARE " + self.name.encode() + b" AS " + self.text

    @property
    def execute(self) -> bytes:
        return b"EXECUTE " + self.name.encode()


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
            conn.prepare_threshold = None  # poolers (see the module's docstring)
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
        were opened (read-only, see _stuck_read_only); the next calls open fresh ones."""
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


class ListenConnection:
    """A dedicated autocommit connection that LISTENs and yields notifications."""

    def __init__(self, conn: psycopg.Connection, url: str) -> None:
        self.conn = conn
        self.url = url
        self.encoding = conn.info.encoding

    @classmethod
    async def open(cls, url: str, channel_sql: LiteralString = queries.LISTEN) -> ListenConnection:
        def _open() -> psycopg.Connection:
            conn = connect_sync(url, "reactor listener")
            try:
                conn.execute(channel_sql)
            except BaseException:
                conn.close()
                raise
            return conn

        try:
            return cls(await trio.to_thread.run_sync(_open), url)
        except psycopg.Error as exc:
            raise DatabaseUnavailable(describe_db_error(exc, url),
                                      reason_of(exc) or "database_error") from exc

    async def wait(self) -> list[str]:
        """Wait until the socket is readable; return the payloads that arrived.

        Raises:
            DatabaseUnavailable: the server closed the connection or it broke.
        """
        await trio.lowlevel.wait_readable(self.conn.fileno())
        return self.pending()

    def pending(self) -> list[str]:
        """Payloads already received, without blocking.

        Read from libpq directly: psycopg's `notifies(timeout=0)` polls the socket
        twice and ends on a timeout exception, a tenth of a millisecond of every
        wake-up. Nothing runs on this connection but LISTEN (at open, and the
        listener wakes every drainer after it), so psycopg holds no backlog of
        notifications that this would miss.
        """
        pgconn = self.conn.pgconn
        try:
            pgconn.consume_input()
        except psycopg.Error as exc:
            raise DatabaseUnavailable(describe_db_error(exc, self.url),
                                      reason_of(exc) or "database_error") from exc
        payloads = []
        while (notify := pgconn.notifies()) is not None:
            payloads.append(notify.extra.decode(self.encoding, "replace"))
        return payloads

    def close(self) -> None:
        self.conn.close()


async def in_worker_thread(fn: Callable[..., T], *args: Any, abandon_on_cancel: bool = False) -> T:
    """Run CPU-bound work (rendering a PDF) off the trio thread, so nothing else stalls.

    With `abandon_on_cancel`, a cancelled caller (job timeout, shutdown) returns at
    once and the thread's result is thrown away: use it for pure computations only.
    """
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=abandon_on_cancel)
