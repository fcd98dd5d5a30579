"""How the reactor connects to Postgres, and a psycopg connection driven from trio.

Every connection connects the same way (`connect_sync`, `CONNECT`: UTF-8,
keepalives, a connect timeout; ISO dates where the database sets another style)
and relies on no session state, so it works through a transaction pooler (see the
package docstring, reactor.engine.db). `TrioConnection` is psycopg's
AsyncConnection with trio's waits instead of asyncio's; `_rows_of` and
`_simple_rows` run one statement on it, and `Prepared` is the one statement run
as a server-side prepared statement, named after a hash of its text.
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
import trio
from psycopg import errors as pgerrors
from psycopg import generators, pq
from psycopg.abc import PQGen, QueryNoTemplate
from psycopg.abc import Transformer as Loader
from psycopg.rows import TupleRow
from psycopg.waiting import Ready, Wait

__all__ = ["CONNECT", "ISO_DATES", "KEEPALIVE", "Prepared", "TrioConnection", "connect_sync"]

RV = TypeVar("RV")

# TCP keepalives notice a dead peer in ~25 s even when nothing is being sent.
KEEPALIVE: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 10,
                             "keepalives_interval": 5, "keepalives_count": 3}

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
    a transaction pooler (see reactor.engine.db)."""
    try:
        conn = psycopg.connect(url, autocommit=True, prepare_threshold=None,
                               application_name=application_name, **CONNECT)
    except OSError as exc:
        # psycopg waits for the connection on a selector of its own: out of descriptors
        # (a flood of clients, a low LimitNOFILE) or memory, that raises OSError, not
        # psycopg.Error. A condition to wait out like any failed connect, not a crash.
        # Without its traceback, which holds the half-open connection's socket while the
        # caller backs off.
        hint = (" (the process is out of file descriptors: raise LimitNOFILE or find what "
                "holds them)" if exc.errno in (errno.EMFILE, errno.ENFILE) else "")
        raise psycopg.OperationalError(
            f"cannot open a connection: {exc.strerror or exc}{hint}"
        ) from exc.with_traceback(None)
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
        if timeout is None:  # (every statement of ours: its caller's scope bounds it)
            return await _drive(gen, self.pgconn.socket)
        with trio.move_on_after(timeout):
            return await _drive(gen, self.pgconn.socket)
        raise pgerrors.ConnectionTimeout("wait timeout expired")


async def _drive(gen: PQGen[RV], fileno: int) -> RV:
    """Run psycopg's generator to its end, waiting on the socket as it asks."""
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
