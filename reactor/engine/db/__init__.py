"""psycopg under trio: the one package that touches threads (also for CPU-bound work).

psycopg's async API waits with asyncio, so each pooled connection (one pool,
`Database`) has two faces:
- a sync `psycopg.Connection` for most statements: `Database.run` lends it to a
  worker thread (`trio.to_thread.run_sync`);
- for the drainers' hot statement (archive the finished, read the next batch) a
  psycopg AsyncConnection over the same libpq connection, whose waits are trio's
  (`Database.fetch`): no thread hop, which on a quiet machine costs more than the
  statement itself (a worker thread and then the trio thread must both be woken:
  ~0.6 ms of a ~2 ms wake-up).
The LISTEN connection is its own, outside the pool: awaited with
`trio.lowlevel.wait_readable(fileno)` and drained without blocking.

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

The modules, by responsibility:
- `errors`: `DatabaseUnavailable`, the health reason of an error, and error text
  with the URL's password scrubbed out;
- `connection`: how every connection connects (`connect_sync`, `CONNECT`), the
  trio-driven connection (`TrioConnection`) and `Prepared`;
- `pool`: `Database` (the one pool, both faces of its connections, the deadline)
  and `in_worker_thread`;
- `listen`: `ListenConnection`.
This module re-exports what the rest of the reactor imports from
`reactor.engine.db`.
"""

from __future__ import annotations

from reactor.engine.db.connection import CONNECT as CONNECT
from reactor.engine.db.connection import ISO_DATES as ISO_DATES
from reactor.engine.db.connection import KEEPALIVE as KEEPALIVE
from reactor.engine.db.connection import Prepared, connect_sync
from reactor.engine.db.connection import TrioConnection as TrioConnection
from reactor.engine.db.connection import _rows_of as _rows_of
from reactor.engine.db.connection import _simple_rows as _simple_rows
from reactor.engine.db.errors import DatabaseUnavailable, describe_db_error, reason_of
from reactor.engine.db.errors import scrub as scrub
from reactor.engine.db.listen import ListenConnection
from reactor.engine.db.pool import CANCEL_WAIT_S as CANCEL_WAIT_S
from reactor.engine.db.pool import STATEMENT_TIMEOUT_S as STATEMENT_TIMEOUT_S
from reactor.engine.db.pool import Database, in_worker_thread

__all__ = ["Database", "DatabaseUnavailable", "ListenConnection", "Prepared", "connect_sync",
           "describe_db_error", "in_worker_thread", "reason_of"]
