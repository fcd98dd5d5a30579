"""The prepared wake-up take (queues.Take.wake, db.Prepared, Database.fetch_prepared):
a drainer woken after an idle spell takes a whole batch with a server-side prepared
statement, planned once and named after its text, whose rows are read without a
cursor (straight from libpq, db._simple_rows).

It must take what the plain take would, read what a cursor reads whatever the
session's settings, and never be a danger: behind a transaction pooler (a real
PgBouncer 1.18: a statement missing on the server connection, another client's
reset, one server connection shared by every client), when the queue's table
changes under it, when its backend is terminated, or when it is cut mid-way by
shutdown or the statement deadline. What every take shares (both table layouts,
replicas racing, durable commits, a read-only database) is in test_take.py.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import psycopg
import pytest
import trio

from reactor.clinic.analytics import AnalyticsProcessor
from reactor.engine import queues
from reactor.engine.db import Database, DatabaseUnavailable, Prepared
from reactor.engine.pgcluster import PgCluster
from tests.harness import PLAIN, alter_database, eventually, running_reactor, send, sql
from tests.pgbouncer import pgbouncer, same_database

QUEUE = "analytics_queue"
OTHER = "email_queue"
VT, BATCH = 30, 100
ANALYTICS_ONLY: dict[str, Any] = {"analytics_queue": AnalyticsProcessor}
CHANGE_RESULT_TYPE = "ALTER TABLE pgmq.q_analytics_queue ALTER COLUMN read_ct TYPE bigint"


async def _statement(db: Database, queue: str = QUEUE) -> queues.Take:
    return await db.run(lambda c: queues.take_statement(c, queue, vt=VT, batch=BATCH))


async def _wake_take(db: Database, statement: queues.Take, queue: str = QUEUE
                     ) -> list[queues.Message]:
    """What a drainer takes when woken after an idle spell: nothing finished, a batch."""
    return await queues.archive_then_read(db, statement, queue, [], VT, BATCH)


async def _one(url: str, query: Any, params: Any = None) -> Any:
    [(value,)] = await sql(url, query, params)
    return value


async def _read_cts(url: str) -> list[int]:
    [(cts,)] = await sql(url + PLAIN, "SELECT array_agg(read_ct ORDER BY msg_id) "
                                      "FROM pgmq.q_analytics_queue")
    return list(cts or [])


# -- 1. one statement per queue, planned once -----------------------------------------------------
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


# -- 2. its rows, read without a cursor -----------------------------------------------------------
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


async def _by_cursor_and_prepared(url: str) -> tuple[list[Any], list[Any]]:
    """The same take read by a cursor (Database.fetch) and by _simple_rows (the prepared
    wake-up take), every message visible again before each; rows without read_ct."""
    async with Database(url, 1).opened() as db:
        statement = await _statement(db)
        out = []
        for prepared in (False, True):
            await sql(url + PLAIN, "UPDATE pgmq.q_analytics_queue SET vt = now()")
            rows = await (db.fetch_prepared(statement.wake) if prepared else db.fetch(
                statement.alone, queues._take_params(QUEUE, VT, BATCH)))
            out.append([(row[0], *row[2:]) for row in rows])
        assert db.prepared_statements
        return out[0], out[1]


@pytest.mark.parametrize("setting", [
    "TimeZone = 'Asia/Kathmandu'", "IntervalStyle = 'sql_standard'",
    "client_encoding = 'LATIN1'", "extra_float_digits = -15", "bytea_output = 'escape'",
    "DateStyle = 'ISO, DMY'"])
async def test_the_prepared_take_reads_what_a_cursor_reads_under_odd_session_settings(
        database_url: str, setting: str) -> None:
    """Session settings set on the database (as per role): the rows of the prepared wake-up
    take equal a cursor's, value for value and type for type (timestamps in the session's
    time zone, non-ASCII text decoded with the session's encoding)."""
    await send(database_url + PLAIN, QUEUE, {"event": "é", "n": [[1]]}, notify=False)
    await send(database_url + PLAIN, QUEUE, {"event": "x"}, notify=False)
    await alter_database(database_url, "SET " + setting)
    cursor, prepared = await _by_cursor_and_prepared(database_url)
    assert len(prepared) == 2
    assert prepared == cursor
    assert [type(v) for v in prepared[0]] == [type(v) for v in cursor[0]]
    if "TimeZone" in setting:
        assert str(prepared[0][1].tzinfo) == "Asia/Kathmandu"


async def test_the_prepared_take_reads_a_batch_of_a_hundred_big_bodies(database_url: str) -> None:
    """A hundred bodies of ~240 KB (multibyte text, 24 MB in all: many reads of the
    socket) come back whole and equal to a cursor's; the connection serves a cursor
    after it."""
    await sql(database_url, "SELECT pgmq.send('analytics_queue', jsonb_build_object('p', "
              "repeat(chr(1000 + n), 120000))) FROM generate_series(1, 100) AS n")
    cursor, prepared = await _by_cursor_and_prepared(database_url)
    assert len(prepared) == 100
    # UPDATE … RETURNING gives no order (it follows the heap, which a concurrent vacuum
    # may change between the two takes): compare by message id.
    prepared, cursor = (sorted(rows, key=lambda row: row[0]) for rows in (prepared, cursor))
    assert prepared == cursor
    assert [queues.decode_body(row[2], row[3])[0]["p"][0] for row in prepared] == [
        chr(1000 + n) for n in range(1, 101)]


async def test_an_error_after_the_rows_were_sent_takes_nothing_and_the_next_take_works(
        database_url: str) -> None:
    """An AFTER trigger on the queue table raises NOTICEs and then, at the end of the
    statement (after the rows were sent), an error: the prepared take raises the server's
    error, nothing is taken (read_ct unchanged), its connection is replaced, and the next
    take works, still prepared."""
    await sql(database_url, "SELECT pgmq.send('analytics_queue', jsonb_build_object('n', n)) "
                            "FROM generate_series(1, 50) AS n")
    await sql(database_url, """
        CREATE TABLE public.t_fail (fail boolean NOT NULL);
        INSERT INTO public.t_fail VALUES (true);
        CREATE FUNCTION public.t_noisy() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          RAISE NOTICE 'touching %', NEW.msg_id;
          IF NEW.msg_id = 40 AND (SELECT fail FROM public.t_fail) THEN
            RAISE EXCEPTION 'boom at 40';
          END IF;
          RETURN NEW;
        END $$;
        CREATE TRIGGER t_noisy AFTER UPDATE ON pgmq.q_analytics_queue FOR EACH ROW
        EXECUTE FUNCTION public.t_noisy();""")
    async with Database(database_url, 1).opened() as db:
        statement = await _statement(db)
        with pytest.raises(psycopg.errors.RaiseException, match="boom at 40"):
            await db.fetch_prepared(statement.wake)
        assert await _read_cts(database_url) == [0] * 50
        assert await db.fetch("SELECT 1") == [(1,)]
        await sql(database_url, "UPDATE public.t_fail SET fail = false")
        [(pid,)] = await db.fetch("SELECT pg_backend_pid()")
        rows = await db.fetch_prepared(statement.wake)
        assert [row[0] for row in rows] == list(range(1, 51))
        assert db.prepared_statements
        assert await db.fetch("SELECT pg_backend_pid(), count(*) FROM pg_prepared_statements"
                              ) == [(pid, 1)]


# -- 3. the queue's table changed under it --------------------------------------------------------
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
        await sql(database_url, CHANGE_RESULT_TYPE)
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


# -- 4. behind a transaction pooler ---------------------------------------------------------------
@pytest.mark.process
async def test_through_a_transaction_pooler_a_missing_statement_means_unprepared_from_then_on(
        database_url: str, pg_cluster: PgCluster) -> None:
    """PgBouncer in transaction mode runs each statement on whichever server connection
    is free. When the take's EXECUTE lands on one that never saw its PREPARE, the take
    runs unprepared at once (nothing lost, nothing taken twice) and from then on."""
    ids = [await send(database_url, QUEUE, {"n": n}, notify=False) for n in range(4)]
    with pgbouncer(pg_cluster, pool_size=2) as pooled:
        url = same_database(pooled, database_url)
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
@pytest.mark.parametrize("reset", ["DISCARD ALL", "DEALLOCATE ALL"])
async def test_a_pooler_client_that_resets_the_server_connection_costs_nothing_but_the_plan(
        database_url: str, pg_cluster: PgCluster, reset: str) -> None:
    """Another client of the same PgBouncer pool (one server connection) resets the session
    between two takes (what server_reset_query does too): the next take finds no
    statement, runs unprepared at once, takes each message once, and from then on the
    reactor takes unprepared (no statement left on the server connection)."""
    ids = [await send(database_url, QUEUE, {"n": n}, notify=False) for n in range(3)]
    with pgbouncer(pg_cluster, pool_size=1) as pooled:
        url = same_database(pooled, database_url)
        async with Database(url, 1).opened() as db:
            statement = await _statement(db)
            assert [m.msg_id for m in await _wake_take(db, statement)] == ids
            assert db.prepared_statements
            await sql(url, reset)
            await sql(database_url, "UPDATE pgmq.q_analytics_queue SET vt = now()")
            again = await _wake_take(db, statement)
            assert [(m.msg_id, m.attempt) for m in again] == [(i, 2) for i in ids]
            assert not db.prepared_statements
            assert await _wake_take(db, statement) == []
            assert await sql(url, "SELECT name FROM pg_prepared_statements") == []
    assert await sql(database_url, "SELECT array_agg(read_ct ORDER BY msg_id) "
                                   "FROM pgmq.q_analytics_queue") == [([2, 2, 2],)]


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
        url = same_database(pooled, database_url)
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


@pytest.mark.process
async def test_behind_a_transaction_pooler_a_take_whose_table_changed_recovers(
        database_url: str, pg_cluster: PgCluster) -> None:
    """The take's prepared statement lives on PgBouncer's server connection, not on the
    client connection the reactor closes after a failed take. Once the queue table's
    result type changes ("cached plan must not change result type"), a fresh client
    connection lands on the same server connection, its PREPARE finds the name taken
    (DuplicatePreparedStatement, suppressed) and its EXECUTE fails again: the wake-up
    take must recover as it does on a direct connection (it failed there for good:
    reproduced, every take after the change failed, as long as PgBouncer kept that
    server connection, up to server_lifetime, an hour by default)."""
    ids = [await send(database_url, QUEUE, {"n": n}, notify=False) for n in range(2)]
    with pgbouncer(pg_cluster, pool_size=1) as pooled:
        url = same_database(pooled, database_url)
        async with Database(url, 1).opened() as db:
            statement = await _statement(db)
            assert [m.msg_id for m in await _wake_take(db, statement)] == ids
            await sql(database_url, CHANGE_RESULT_TYPE)
            await sql(database_url, "UPDATE pgmq.q_analytics_queue SET vt = now()")
            errors: list[str] = []
            taken: list[queues.Message] | None = None
            for _ in range(4):  # as the drainer: after a failure, the statement composed again
                try:
                    taken = await _wake_take(db, await _statement(db))
                    break
                except (psycopg.Error, DatabaseUnavailable) as exc:
                    errors.append(str(exc))
            assert taken is not None, f"the wake-up take fails for good: {errors}"
            assert len(errors) <= 1, errors
            assert [(m.msg_id, m.attempt) for m in taken] == [(i, 2) for i in ids]


@pytest.mark.process
async def test_behind_a_transaction_pooler_a_reactor_drains_after_the_queue_table_changed(
        database_url: str, pg_cluster: PgCluster) -> None:
    """The same defect as a user meets it: a reactor behind PgBouncer (one server
    connection) drains the queue; the queue table's column type changes (a pgmq
    upgrade, an admin's ALTER); messages sent afterwards must be processed (reproduced:
    the drainer backed off and retried the failing prepared take forever)."""
    with pgbouncer(pg_cluster, pool_size=1) as pooled:
        url = same_database(pooled, database_url)
        async with running_reactor(url, ANALYTICS_ONLY, WORKER_INTERVAL_MS=300,
                                   MAX_TASKS_PER_CYCLE=20, DB_POOL_SIZE=2):
            await sql(database_url, "SELECT pgmq.send('analytics_queue', jsonb_build_object("
                                    "'event', 'before', 'properties', '{}'::jsonb))")
            await eventually(lambda: _one(database_url,
                                          "SELECT count(*) FROM public.analytics_events"),
                             within_s=30, every_s=0.1)
            await sql(database_url, CHANGE_RESULT_TYPE)
            await sql(database_url, "SELECT pgmq.send('analytics_queue', jsonb_build_object("
                                    "'event', 'after', 'properties', '{}'::jsonb))")

            async def processed_after() -> bool:
                return bool(await _one(database_url, "SELECT count(*) FROM public.analytics_events "
                                                     "WHERE event = 'after'") == 1)
            await eventually(processed_after, within_s=30, every_s=0.2)


# -- 5. cut mid-way, or its backend terminated ----------------------------------------------------
@pytest.mark.process
@pytest.mark.parametrize("pooled", [False, True], ids=["direct", "pgbouncer"])
@pytest.mark.parametrize("stage", ["prepare", "execute"])
@pytest.mark.parametrize("cut", ["shutdown", "deadline"])
async def test_a_prepared_take_cut_mid_way_takes_nothing_and_the_next_one_works(
        database_url: str, pg_cluster: PgCluster, pooled: bool, stage: str, cut: str) -> None:
    """The take waits on a lock of the queue table (another transaction's ACCESS
    EXCLUSIVE), at its PREPARE (first take of the connection) or at its EXECUTE. Cut
    there, by shutdown (Drainer.cancel_jobs cancels the take's scope) or by the
    statement deadline: it is cancelled on the server before the caller goes on, so once
    the lock is gone it takes nothing; the next take (a fresh connection; behind
    PgBouncer the server connection may hold the statement already) takes every message
    once, still prepared."""
    ids = [await send(database_url, QUEUE, {"n": n}, notify=False) for n in range(3)]
    with pgbouncer(pg_cluster, pool_size=1) if pooled else nullcontext(database_url) as url:
        url = same_database(url, database_url)
        async with Database(url, 1, statement_timeout_s=1.5 if cut == "deadline" else 30
                            ).opened() as db:
            statement = await _statement(db)
            if stage == "execute":
                await sql(database_url, "UPDATE pgmq.q_analytics_queue "
                                        "SET vt = now() + interval '1 hour'")
                assert await _wake_take(db, statement) == []  # prepared on this connection
                await sql(database_url, "UPDATE pgmq.q_analytics_queue SET vt = now()")
            locker = await trio.to_thread.run_sync(
                lambda: psycopg.connect(database_url, autocommit=False))
            try:
                await trio.to_thread.run_sync(
                    locker.execute, "LOCK TABLE pgmq.q_analytics_queue IN ACCESS EXCLUSIVE MODE")
                prefix = "PREPARE" if stage == "prepare" else "EXECUTE"

                async def waits_on_the_lock() -> bool:
                    rows = await sql(database_url,
                                     "SELECT wait_event_type, left(query, 7) "
                                     "FROM pg_stat_activity WHERE datname = current_database() "
                                     "AND state = 'active' AND query LIKE %s",
                                     (prefix + " reactor_%",))
                    return rows == [("Lock", prefix)]

                outcome: list[BaseException] = []
                with trio.CancelScope() as scope:
                    async with trio.open_nursery() as nursery:
                        async def take() -> None:
                            try:
                                await _wake_take(db, statement)
                            except DatabaseUnavailable as exc:
                                outcome.append(exc)

                        nursery.start_soon(take)
                        await eventually(waits_on_the_lock, within_s=10)
                        if cut == "shutdown":
                            scope.cancel()
                if cut == "deadline":
                    assert [getattr(e, "reason", None) for e in outcome] == [
                        "database_unreachable"]
                # Cancelled on the server before the caller went on: the cancel request was
                # delivered (PQcancel returns once the server took it), and the backend
                # leaves its lock wait as soon as it is scheduled (a loaded machine: a
                # moment later), while the lock is still held.
                async def left_the_wait() -> bool:
                    return not await waits_on_the_lock()
                await eventually(left_the_wait, within_s=5, every_s=0.02)
            finally:
                await trio.to_thread.run_sync(locker.close)  # the lock goes
            await trio.sleep(0.3)
            assert await sql(database_url, "SELECT array_agg(read_ct ORDER BY msg_id) "
                                           "FROM pgmq.q_analytics_queue") == [([0, 0, 0],)]
            taken = await _wake_take(db, statement)
            assert [(m.msg_id, m.attempt) for m in taken] == [(i, 1) for i in ids]
            assert db.prepared_statements
            assert await db.fetch("SELECT name FROM pg_prepared_statements") == [
                (statement.wake.name,)]


async def test_a_prepared_take_whose_backend_is_terminated_is_an_outage_and_takes_nothing(
        database_url: str) -> None:
    """The prepared take waits on a lock; its backend is terminated (pg_terminate_backend,
    as a failover or an admin does): DatabaseUnavailable (database_unreachable), nothing
    taken, and the next take (a new connection) takes every message once."""
    ids = [await send(database_url, QUEUE, {"n": n}, notify=False) for n in range(3)]
    async with Database(database_url, 1).opened() as db:
        statement = await _statement(db)
        locker = await trio.to_thread.run_sync(
            lambda: psycopg.connect(database_url, autocommit=False))
        try:
            await trio.to_thread.run_sync(
                locker.execute, "LOCK TABLE pgmq.q_analytics_queue IN ACCESS EXCLUSIVE MODE")
            outcome: list[BaseException] = []

            async def take() -> None:
                try:
                    await db.fetch_prepared(statement.wake)
                except DatabaseUnavailable as exc:
                    outcome.append(exc)

            async def waiting() -> list[tuple[Any, ...]]:
                return await sql(database_url, "SELECT pid FROM pg_stat_activity WHERE "
                                 "wait_event_type = 'Lock' AND query LIKE 'PREPARE reactor_%'")

            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(take)
                    [(pid,)] = await eventually(waiting, within_s=10)
                    await sql(database_url, "SELECT pg_terminate_backend(%s)", (pid,))
        finally:
            await trio.to_thread.run_sync(locker.close)
        assert [getattr(e, "reason", None) for e in outcome] == ["database_unreachable"]
        assert await _read_cts(database_url) == [0, 0, 0]
        taken = queues._taken(QUEUE, await db.fetch_prepared(statement.wake))
        assert [(m.msg_id, m.attempt) for m in taken] == [(i, 1) for i in ids]
