"""pgmq operations: on a sync connection (called through `Database.run`), and the
drainers' hot statements on the database's trio-native connections (`Database.fetch`).

Only what Supabase's pgmq 1.4.4-1.5.1 offers is used: read, archive,
set_vt, send, delete, metrics_all.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from reactor.engine import queries
from reactor.engine.db import Database, Prepared

__all__ = ["MAX_MESSAGE_BYTES", "MAX_NESTING", "Message", "QueueDepth", "decode_body",
           "dlq_name", "validate_queue"]

# The limits a message body must keep to be processed (public.enqueue refuses bigger
# ones: migration 036); a body over them is dead-lettered with the reason.
MAX_MESSAGE_BYTES = 256 * 1024
MAX_NESTING = 64


# pgmq's own rule for a queue's name, which becomes part of its tables' names (q_<name>,
# a_<name>, and <name>_dlq's): lower case, and short enough for Postgres identifiers.
QUEUE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,42}")


def validate_queue(name: str) -> str:
    """A name that may be composed into SQL as a queue's table. Which queues exist is
    the app's declaration and the database's registry (reactor.queue_names()).

    Raises:
        ValueError: the name could not be a queue's.
    """
    if not QUEUE_NAME.fullmatch(name):
        raise ValueError(f"unknown queue {name!r}: a queue's name is lower case letters, "
                         "digits and _ (at most 43)")
    return name


def dlq_name(queue: str) -> str:
    return f"{validate_queue(queue)}_dlq"


def _table(queue: str) -> sql.Identifier:
    base = queue.removesuffix("_dlq")
    validate_queue(base)
    return sql.Identifier(f"q_{queue}")


@dataclass(frozen=True, slots=True)
class Message:
    """One delivery of a pgmq message. `attempt` is pgmq's read_ct.

    `decode_error` says why the body could not be decoded (`body` is then None);
    `outcomes` counts the earlier deliveries that ended with a recorded outcome
    (a retry or a release), so `attempt - 1 - outcomes` deliveries ended in
    nothing: a worker crashed or was killed while it held this message.
    """

    queue: str
    msg_id: int
    attempt: int
    enqueued_at: datetime
    body: Any
    decode_error: str | None = None
    outcomes: int = 0

    @property
    def lost_deliveries(self) -> int:
        """Earlier deliveries of this message that ended with no recorded outcome."""
        return max(0, self.attempt - 1 - self.outcomes)

    @property
    def priority(self) -> int:
        if isinstance(self.body, dict):
            value = self.body.get("priority")
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return 0


@dataclass(frozen=True, slots=True)
class QueueDepth:
    queue: str
    depth: int
    oldest_age_s: int | None
    total: int


def _messages(queue: str, rows: list[tuple[Any, ...]]) -> list[Message]:
    """Rows of (msg_id, read_ct, enqueued_at, message), as the peeking queries select them."""
    return [Message(queue, r[0], r[1], r[2], r[3]) for r in rows]


def _taken(queue: str, rows: list[tuple[Any, ...]]) -> list[Message]:
    """Rows of the taking queries (see queries._TAKEN_COLUMNS), each body decoded alone."""
    messages = []
    for msg_id, read_ct, enqueued_at, text, size, outcomes, *_ in rows:
        body, error = decode_body(text, size)
        messages.append(Message(queue, msg_id, read_ct, enqueued_at, body, error, outcomes))
    return messages


# json.loads of a small body costs ~5 times its raw_decode here (its checks and two regex
# matches for the whitespace around the value); a body that is one JSON value and
# nothing else (what jsonb's text is) decodes to the same value either way.
_raw_decode = json.JSONDecoder().raw_decode


def decode_body(text: str | None, size: int | None) -> tuple[Any, str | None]:
    """Decode one message body; returns (body, None) or (None, why it cannot be processed).

    Never raises: a body is untrusted input, and one bad body must not stop the
    others of its batch (json's C decoder recurses, so an absurdly nested body
    raises RecursionError: caught here, and the depth is bounded anyway).
    """
    if text is None:
        if size is None:
            return None, "message has no body"
        return None, (f"message is {size} bytes, over the limit of {MAX_MESSAGE_BYTES} "
                      "bytes: not processed")
    try:
        try:
            body, end = _raw_decode(text)
        except ValueError:
            end = -1
        if end != len(text):  # not one JSON value alone: json.loads decides (and says why)
            body = json.loads(text)
    except RecursionError:
        return None, f"message nests deeper than {MAX_NESTING} levels: not processed"
    except ValueError as exc:
        return None, f"message is not valid JSON: {exc}"
    if text.count("[") + text.count("{") > MAX_NESTING and _deeper_than(body, MAX_NESTING):
        return None, f"message nests deeper than {MAX_NESTING} levels: not processed"
    return body, None


def _deeper_than(value: Any, limit: int) -> bool:
    """True if `value` nests more than `limit` arrays/objects deep (iterative: no recursion)."""
    if not isinstance(value, dict | list):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _take_params(queue: str, vt: int, qty: int) -> dict[str, Any]:
    return {"queue": queue, "vt": vt, "qty": qty, "max_bytes": MAX_MESSAGE_BYTES}


def read(conn: psycopg.Connection, queue: str, vt: int, qty: int) -> list[Message]:
    rows = conn.execute(queries.READ, _take_params(queue, vt, qty)).fetchall()
    return _taken(queue, rows)


def archive(conn: psycopg.Connection, queue: str, ids: list[int]) -> None:
    if ids:
        conn.execute(queries.ARCHIVE_MANY, {"queue": queue, "ids": ids})


async def archive_fast(db: Database, queue: str, ids: list[int]) -> None:
    """Archive without waiting for the WAL flush (see archive_then_read for why that is safe)."""
    if ids:
        await db.fetch(queries.ARCHIVE_ASYNC, {"queue": queue, "ids": ids})


def set_vt(conn: psycopg.Connection, queue: str, ids: list[int], seconds: int) -> None:
    """Make messages visible in `seconds` (0 = now): retry later, release, or extend."""
    if ids:
        conn.execute(queries.SET_VT_MANY, {"queue": queue, "ids": ids, "vt": seconds})


# Where the finished ids go in the archive-and-take (queries.TAKE: `%(ids)s::bigint[]`).
_IDS = b"%(ids)s"


class Take(NamedTuple):
    """The drainer's statements for one queue, composed once for its table and pgmq
    version: `with_archive` (queries.TAKE) when something finished, `alone`
    (queries.TAKE_ONLY) when nothing did, and `wake`: `alone` with this drainer's
    lease (`vt`) and batch size bound in, run prepared (what a wake-up after an
    idle spell takes: a whole batch, nothing finished). `archive_parts`:
    `with_archive` with the lease and batch size bound in, cut where the finished
    ids go (`archive_of`)."""

    with_archive: bytes
    alone: bytes
    wake: Prepared
    vt: int
    batch: int
    archive_parts: tuple[bytes, ...]

    def archive_of(self, ids: list[int]) -> bytes:
        """`with_archive` for the finished `ids`, every value bound in: a busy drainer's
        statement, sent with no cursor and no parameter to dump (psycopg's cursor and
        array dumper cost a tenth of its CPU per job). The ids are written into the
        text: ints only (msg_ids as psycopg loads them), not a bool, float or subclass
        that `%d` would write as another number."""
        for msg_id in ids:
            if type(msg_id) is not int:
                raise TypeError(f"a msg_id must be an int, not {type(msg_id).__name__}")
        return (b"'{" + b",".join([b"%d" % i for i in ids]) + b"}'").join(self.archive_parts)


def take_statement(conn: psycopg.Connection, queue: str, *, vt: int, batch: int) -> Take:
    """The drainer's archive-and-take statements for `queue` (see Take)."""
    row = conn.execute(queries.HAS_LAST_READ_AT, {"table": f"pgmq.q_{validate_queue(queue)}"}
                       ).fetchone()
    last_read = sql.SQL(queries.TAKE_SETS_LAST_READ if row and row[0] else "")
    table = _table(queue)
    with_archive, alone = (sql.SQL(query).format(table=table, last_read=last_read).as_bytes(conn)
                           for query in (queries.TAKE, queries.TAKE_ONLY))
    # Bound on the client, as literals (quoted by psycopg for this connection): the
    # values are the drainer's own settings and a validated queue name.
    client = psycopg.ClientCursor(conn)
    params = _take_params(queue, vt, batch)
    bound = client.mogrify(alone, params)
    # Each piece between two `%(ids)s` bound alone: the ids' literal goes between them.
    parts = tuple(client.mogrify(piece, params).encode() for piece in with_archive.split(_IDS))
    return Take(with_archive, alone, Prepared.of(bound.encode()), vt, batch, parts)


async def archive_then_read(db: Database, statement: Take, queue: str, done: list[int],
                            vt: int, qty: int) -> list[Message]:
    """Archive finished messages and take the next batch: one statement, one commit
    (`statement` from take_statement).

    The commit does not wait for the WAL flush (synchronous_commit off, for
    the reactor's bookkeeping only: taking and archiving messages). That is
    safe: if Postgres crashes before the flush, a read or an archive is undone
    and the message is delivered again, and every effect is idempotent and was
    committed durably by its handler. It saves a busy drainer a disk flush and
    three round trips per batch. It runs on a trio-native connection
    (`Database.fetch`): it is what a wake-up waits for, and a wake-up's take
    (nothing finished, a whole batch) runs prepared: planned once, not at every
    wake-up (0.2 vs 0.6 ms here). A busy drainer's (something finished, a whole
    batch) goes with every value bound in (`Take.archive_of`, `Database.fetch_bound`).
    """
    if not done:
        if (vt, qty) == (statement.vt, statement.batch):
            return _taken(queue, await db.fetch_prepared(statement.wake))
        rows = await db.fetch(statement.alone, _take_params(queue, vt, qty))
        return _taken(queue, rows)
    if (vt, qty) == (statement.vt, statement.batch):
        return _taken(queue, await db.fetch_bound(statement.archive_of(done)))
    rows = await db.fetch(statement.with_archive, {**_take_params(queue, vt, qty), "ids": done})
    return _taken(queue, rows)


@dataclass(frozen=True, slots=True)
class Outcome:
    """A failed (or released) delivery to record: visible again after `delay_s`."""

    message: Message
    delay_s: int
    error: str | None  # None: released at shutdown, not a failure
    duration_ms: float = 0.0  # how long the failed delivery ran (for its event)
    # A requeue only (RetryLater): keys merged into the new message's body, and whether
    # it is a deferral (Deferred: the original is deleted, not archived).
    stamp: dict[str, Any] | None = None
    deferred: bool = False
    wait_ms: float | None = None  # a first delivery's enqueue-to-start (for its event)
    started: float | None = None  # trio.current_time() at its start (start-to-settle)


def record_outcomes(conn: psycopg.Connection, queue: str, outcomes: list[Outcome]) -> None:
    """Make each message visible after its delay and count the outcome (one statement)."""
    latest = {o.message.msg_id: o for o in outcomes}  # a message may be listed twice
    if not latest:
        return
    items = list(latest.values())
    conn.execute(queries.RECORD_OUTCOMES, {
        "queue": queue,
        "ids": [o.message.msg_id for o in items],
        "delays": [o.delay_s for o in items],
        "attempts": [None if o.error is None else o.message.attempt for o in items],
        "errors": [o.error for o in items],
        "enqueued": [o.message.enqueued_at for o in items],
    })


def dead_letter(conn: psycopg.Connection, msg: Message, error: str,
                stamp: dict[str, Any] | None = None) -> int | None:
    """Send to `<queue>_dlq` with the reason and archive the original, atomically.

    The body is copied by the server, so an undecodable one is kept too (as text).
    Returns the dead letter's msg_id, or None if the message was no longer queued
    (another replica dead-lettered or archived it first).
    """
    row = conn.execute(queries.DEAD_LETTER.format(table=_table(msg.queue)), {
        "dlq": dlq_name(msg.queue), "queue": msg.queue, "msg_id": msg.msg_id,
        "error": error, "attempts": msg.attempt, "decodable": msg.decode_error is None,
        "stamp": Jsonb(stamp or {}),
    }).fetchone()
    return None if row is None else int(row[0])


def requeue(conn: psycopg.Connection, msg: Message, delay_s: int,
            stamp: dict[str, Any] | None = None, *, deferred: bool = False) -> int | None:
    """Put the same body (with `stamp` merged in) back as a new message after `delay_s`;
    archive this one, or delete it when `deferred` (it is not done: the new one goes on
    with it, and is archived once it succeeds). Returns the new message's id, or None
    when this one was no longer queued."""
    query = queries.DEFER if deferred else queries.REQUEUE
    row = conn.execute(query.format(table=_table(msg.queue)),
                       {"queue": msg.queue, "msg_id": msg.msg_id, "delay": delay_s,
                        "stamp": Jsonb(stamp or {})}).fetchone()
    return None if row is None else int(row[0])


def next_visible_in(conn: psycopg.Connection, queue: str) -> float | None:
    """Seconds until a message of `queue` becomes visible; None when it is empty."""
    row = conn.execute(queries.NEXT_VISIBLE_IN.format(table=_table(queue))).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def enqueue(conn: psycopg.Connection, queue: str, message: dict[str, Any], delay: int = 0) -> int:
    """public.enqueue: send and wake the reactor at commit."""
    row = conn.execute(
        queries.ENQUEUE, {"queue": validate_queue(queue), "message": Jsonb(message), "delay": delay}
    ).fetchone()
    assert row is not None
    return int(row[0])


def depths(conn: psycopg.Connection) -> list[QueueDepth]:
    return [QueueDepth(r[0], r[1], r[2], r[3]) for r in conn.execute(queries.QUEUE_METRICS)]


def oldest_visible_age(conn: psycopg.Connection, queue: str) -> float | None:
    """Seconds since the oldest message that could be taken now was enqueued (not one in
    flight or waiting for its retry); None when none is visible."""
    row = conn.execute(queries.OLDEST_VISIBLE_AGE.format(table=_table(queue))).fetchone()
    return None if row is None or row[0] is None else max(0.0, float(row[0]))


def peek(conn: psycopg.Connection, queue: str, msg_id: int | None = None,
         limit: int = 100) -> list[Message]:
    """Messages of a queue without taking them (for the DLQ commands)."""
    rows = conn.execute(queries.PEEK.format(table=_table(queue)),
                        {"msg_id": msg_id, "limit": limit}).fetchall()
    return _messages(queue, rows)


def purge_dead_letters(conn: psycopg.Connection, queue: str) -> int:
    ids = [m.msg_id for m in peek(conn, dlq_name(queue), limit=1_000_000)]
    if ids:
        conn.execute(queries.DELETE_MANY, {"queue": dlq_name(queue), "ids": ids})
    return len(ids)
