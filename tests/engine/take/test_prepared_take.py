"""The wake-up take runs as a server-side prepared statement (queues.Take.wake,
Database.fetch_prepared): planned once, named after its text, and never a danger
behind a transaction pooler (a real PgBouncer), on a read-only database, or when the
queue's table changes under it.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import trio
from psycopg import sql as pgsql

from reactor.engine import queues
from reactor.engine.db import Database, DatabaseUnavailable, Prepared
from reactor.engine.pgcluster import PgCluster
from tests.harness import send, sql
from tests.pgbouncer import pgbouncer

QUEUE = "analytics_queue"
OTHER = "email_queue"
VT, BATCH = 30, 100


def _with_path(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{dbname}"))


def _dbname(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


async def _statement(db: Database, queue: str = QUEUE) -> queues.Take:
    return await db.run(lambda c: queues.take_statement(c, queue, vt=VT, batch=BATCH))


async def _wake_take(db: Database, statement: queues.Take, queue: str = QUEUE
                     ) -> list[queues.Message]:
    """What a drainer takes when woken after an idle spell: nothing finished, a batch."""
    return await queues.archive_then_read(db, statement, queue, [], VT, BATCH)


def test_a_prepared_statement_is_named_after_its_text() -> None:
    """Same text, same name (on any server connection); another text, another name."""
    a, b = Prepared.of(b"SELECT 1"), Prepared.of(b"SELECT 2")
    assert a == Prepared.of(b"SELECT 1")
    assert a.name != b.name
    assert a.name.startswith("reactor_")
    assert len(a.name) <= 63
    assert a.prepare == b"PREPARE " + a.name.encode() + b" AS SELECT 1"
    assert a.execute == b"EXECUTE " + a.name.encode()


async def test_the_wake_up_take_is_planned_once_and_takes_what_the_plain_one_would(
        database_url: str) -> None:
    """On a direct connection the wake-up take is prepared once and then runs its one
    generic plan: never planned again, whatever it finds."""
    async with Database(database_url, 1).opened() as db:
        statement = await _statement(db)
        assert b"%(" not in statement.wake.text  # every value bound in
        for _ in range(3):
            ids = [await send(database_url, QUEUE, {"n": n}, notify=False) for n in range(2)]
            taken = await _wake_take(db, statement)
            assert [m.msg_id for m in taken] == ids
            assert [m.body for m in taken] == [{"n": 0}, {"n": 1}]
            assert all(m.attempt == 1 for m in taken)
            assert await _wake_take(db, statement) == []
        # One connection (pool of 1): it holds the statement, planned once, generic.
        plans = await db.fetch("SELECT name, generic_plans, custom_plans "
                               "FROM pg_prepared_statements")
        assert plans == [(statement.wake.name, 6, 0)]
        assert db.prepared_statements
    assert await sql(database_url, "SELECT count(*), sum(read_ct) "
                                   "FROM pgmq.q_analytics_queue") == [(6, 6)]


async def test_a_prepared_statement_gives_the_rows_a_cursor_would(database_url: str) -> None:
    """fetch_prepared reads its rows without a cursor (psycopg's loaders on the raw result):
    the same Python values and types as `fetch`, errors as psycopg's error classes."""
    statement = Prepared.of(b"SELECT 1::int8, 2::int4, '2026-01-02 03:04:05+00'::timestamptz, "
                            b"'\xc3\xa9t\xc3\xa9'::text, NULL::int, '{\"a\": [1]}'::jsonb, "
                            b"true FROM generate_series(1, 3)")
    async with Database(database_url, 1).opened() as db:
        assert await db.fetch_prepared(statement) == await db.fetch(statement.text)
        rows = await db.fetch_prepared(statement)
        assert [tuple(map(type, row)) for row in rows] == [tuple(map(type, rows[0]))] * 3
        assert rows[0][3] == "\u00e9t\u00e9"
        assert rows[0][5] == {"a": [1]}
        assert await db.fetch_prepared(Prepared.of(b"SELECT 1 WHERE false")) == []
        with pytest.raises(psycopg.errors.DivisionByZero):
            await db.fetch_prepared(Prepared.of(b"SELECT 1 / (random() * 0)::int"))
        assert await db.fetch_prepared(statement) == rows  # on a fresh connection


async def test_a_take_of_a_part_batch_runs_unprepared(database_url: str) -> None:
    """Only the whole-batch take is prepared (one statement per queue and connection, not
    one per batch size): a smaller one runs as a plain statement."""
    ids = [await send(database_url, QUEUE, {"n": n}, notify=False) for n in range(3)]
    async with Database(database_url, 1).opened() as db:
        statement = await _statement(db)
        taken = await queues.archive_then_read(db, statement, QUEUE, [], VT, 2)
        assert [m.msg_id for m in taken] == ids[:2]
        assert await db.fetch("SELECT count(*) FROM pg_prepared_statements") == [(0,)]


async def test_the_prepared_take_keeps_to_the_primary_key_as_its_table_grows(
        database_url: str) -> None:
    """The plan is made once, possibly on an empty table: it must not be one that scans
    the whole table to update what it took (a join planned on an empty table hashes a
    sequential scan of it, and keeps it while the table grows)."""
    await sql(database_url, "ALTER TABLE pgmq.q_analytics_queue SET (autovacuum_enabled = off)")
    async with Database(database_url, 1).opened() as db:
        statement = await _statement(db)
        assert await _wake_take(db, statement) == []  # prepared and planned on an empty table
        await sql(database_url, "INSERT INTO pgmq.q_analytics_queue (vt, message) "
                                "SELECT now() + interval '1 hour', '{}' "
                                "FROM generate_series(1, 5000)")
        plan = "\n".join(row[0] for row in await db.fetch(b"EXPLAIN " + statement.wake.execute))
    update = plan[plan.index("Update on"):]
    assert "Seq Scan" not in update, plan
    assert "q_analytics_queue_pkey" in update, plan


@pytest.mark.process
async def test_through_a_transaction_pooler_a_missing_statement_means_unprepared_from_then_on(
        database_url: str, pg_cluster: PgCluster) -> None:
    """PgBouncer in transaction mode runs each statement on whichever server connection
    is free. When the take's EXECUTE lands on one that never saw its PREPARE, the take
    runs unprepared at once (nothing lost, nothing taken twice) and from then on."""
    ids = [await send(database_url, QUEUE, {"n": n}, notify=False) for n in range(4)]
    with pgbouncer(pg_cluster, pool_size=2) as pooled:
        url = _with_path(pooled, _dbname(database_url))
        async with Database(url, 1).opened() as db:
            statement = await _statement(db)
            first = await queues.archive_then_read(db, statement, QUEUE, [], VT, BATCH)
            assert [m.msg_id for m in first] == ids
            assert db.prepared_statements
            await sql(database_url, "UPDATE pgmq.q_analytics_queue SET vt = now()")
            # Another client holds the server connection that has the statement (PgBouncer
            # hands out the one used last), in a transaction: ours runs on the other.
            holder = await trio.to_thread.run_sync(
                lambda: psycopg.connect(url, autocommit=False))
            try:
                held = await trio.to_thread.run_sync(
                    lambda: holder.execute("SELECT name FROM pg_prepared_statements").fetchall())
                assert held == [(statement.wake.name,)]
                again = await _wake_take(db, statement)
                assert [m.msg_id for m in again] == ids
                assert not db.prepared_statements
                await sql(database_url, "UPDATE pgmq.q_analytics_queue SET vt = now()")
                third = await _wake_take(db, statement)  # unprepared, wherever it runs
                assert [m.msg_id for m in third] == ids
            finally:
                await trio.to_thread.run_sync(holder.close)
    assert await sql(database_url, "SELECT array_agg(read_ct ORDER BY msg_id) "
                                   "FROM pgmq.q_analytics_queue") == [([3, 3, 3, 3],)]


@pytest.mark.process
async def test_on_one_shared_server_connection_each_queue_runs_its_own_statement(
        database_url: str, pg_cluster: PgCluster) -> None:
    """Behind PgBouncer with one server connection, every client's statements run in one
    server session. Two queues' takes (and a second replica of one) prepare there, side
    by side: each name is its own text, so each queue only ever gets its own messages
    (psycopg's numbered names, `_pg3_0` on every connection, would run one queue's take
    for another's), and a replica that finds the statement already there uses it."""
    mine = [await send(database_url, QUEUE, {"q": "analytics"}, notify=False) for _ in range(3)]
    theirs = [await send(database_url, OTHER, {"q": "email"}, notify=False) for _ in range(3)]
    with pgbouncer(pg_cluster, pool_size=1) as pooled:
        url = _with_path(pooled, _dbname(database_url))
        async with Database(url, 1).opened() as one, Database(url, 1).opened() as two, \
                Database(url, 1).opened() as replica:
            analytics = await _statement(one)
            email = await _statement(two, OTHER)
            got_mine = await _wake_take(one, analytics)
            got_theirs = await _wake_take(two, email, OTHER)
            await sql(database_url, "UPDATE pgmq.q_analytics_queue SET vt = now()")
            got_again = await _wake_take(replica, await _statement(replica))
            assert one.prepared_statements
            assert two.prepared_statements
            assert replica.prepared_statements
            names = await sql(url, "SELECT name FROM pg_prepared_statements ORDER BY 1")
    assert [m.msg_id for m in got_mine] == mine
    assert [m.body for m in got_mine] == [{"q": "analytics"}] * 3
    assert [m.msg_id for m in got_theirs] == theirs
    assert [m.body for m in got_theirs] == [{"q": "email"}] * 3
    assert [m.msg_id for m in got_again] == mine
    assert names == sorted([(analytics.wake.name,), (email.wake.name,)])


async def test_a_prepared_take_on_a_read_only_database_is_an_outage_and_takes_nothing(
        database_url: str) -> None:
    """A database flipped read-only (a standby after failover) refuses the prepared take
    like the plain one, every time: the drainers' error for waiting it out, the message
    untouched; writable again, the take works."""
    name = pgsql.Identifier(_dbname(database_url))
    msg_id = await send(database_url, QUEUE, {"event": "later"}, notify=False)
    await sql(database_url, pgsql.SQL(
        "ALTER DATABASE {} SET default_transaction_read_only = on").format(name))
    async with Database(database_url, 1).opened() as db:  # new sessions: read-only
        statement = await _statement(db)
        for _ in range(2):  # the second on a fresh connection (the first one was dropped)
            with pytest.raises(DatabaseUnavailable) as refused:
                await _wake_take(db, statement)
            assert refused.value.reason == "database_read_only"
        assert db.prepared_statements
    assert await sql(database_url, "SELECT msg_id, read_ct FROM pgmq.q_analytics_queue") == [
        (msg_id, 0)]
    await sql(database_url + "?options=-c%20default_transaction_read_only%3Doff",
              pgsql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(name))
    async with Database(database_url, 1).opened() as db:
        assert [m.msg_id for m in await _wake_take(db, statement)] == [msg_id]


async def test_a_statement_whose_table_changed_under_it_runs_unprepared_from_then_on(
        database_url: str) -> None:
    """A prepared statement whose result type changed (a column's type altered) fails for
    good on its server session ("cached plan must not change result type"), and behind a
    pooler that session outlives our connection. The take runs unprepared at once (nothing
    lost, nothing taken twice) and from then on."""
    ids = [await send(database_url, QUEUE, {"n": n}, notify=False) for n in range(2)]
    async with Database(database_url, 1).opened() as db:
        statement = await _statement(db)
        assert [m.msg_id for m in await _wake_take(db, statement)] == ids
        await sql(database_url, "ALTER TABLE pgmq.q_analytics_queue "
                                "ALTER COLUMN read_ct TYPE bigint")
        await sql(database_url, "UPDATE pgmq.q_analytics_queue SET vt = now()")
        taken = await _wake_take(db, statement)
        assert [(m.msg_id, m.attempt) for m in taken] == [(i, 2) for i in ids]
        assert not db.prepared_statements
        await sql(database_url, "UPDATE pgmq.q_analytics_queue SET vt = now()")
        again = await _wake_take(db, statement)
        assert [(m.msg_id, m.attempt) for m in again] == [(i, 3) for i in ids]


async def test_a_queue_dropped_and_recreated_under_the_prepared_take(database_url: str) -> None:
    """The statement names the queue's table; dropped and created again, the prepared take
    finds the new table (Postgres re-plans it) and takes the new queue's messages."""
    async with Database(database_url, 1).opened() as db:
        statement = await _statement(db)
        assert await _wake_take(db, statement) == []
        await sql(database_url, "SELECT pgmq.drop_queue(%s)", (QUEUE,))
        await sql(database_url, "SELECT pgmq.create(%s)", (QUEUE,))
        fresh = [await send(database_url, QUEUE, {"new": True}, notify=False)]
        taken = await _wake_take(db, statement)
        assert [m.msg_id for m in taken] == fresh
        assert taken[0].body == {"new": True}
