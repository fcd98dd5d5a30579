"""The drainers' hot statement: archive-and-take on a trio-native connection.

It is pgmq.read's own UPDATE issued directly on the queue's table (no plpgsql
EXECUTE per call), so it must behave as pgmq.read does on both table layouts
(pgmq >= 1.8 with last_read_at, Supabase's 1.4.4-1.5.x without), and the
trio-native connection must keep the rules of the threaded pool: the same
statement deadline, the query cancelled on the server when it passes, and a
broken connection never reused.
"""

from __future__ import annotations

import psycopg
import pytest
import trio

from reactor.engine import queues
from reactor.engine.db import Database, DatabaseUnavailable
from tests.harness import eventually, of_type, running_reactor, send, sql, wait_for

QUEUE = "analytics_queue"


async def _take(db: Database, done: list[int], qty: int = 10) -> list[queues.Message]:
    statement = await db.run(lambda c: queues.take_statement(c, QUEUE, vt=30, batch=100))
    return await queues.archive_then_read(db, statement, QUEUE, done, 30, qty)


async def test_the_take_sets_last_read_at_where_pgmq_has_it(database_url: str) -> None:
    first = await send(database_url, QUEUE, {"event": "a"})
    async with Database(database_url, 2).opened() as db:
        [message] = await _take(db, [])
        assert (message.msg_id, message.attempt, message.body) == (first, 1, {"event": "a"})
        [(read_ct, last_read, leased)] = await sql(
            database_url, "SELECT read_ct, last_read_at IS NOT NULL, vt > now() + interval '25s' "
            "FROM pgmq.q_analytics_queue WHERE msg_id = %s", (first,))
        assert (read_ct, last_read, leased) == (1, True, True)
        # Taken, it is invisible: the next take archives it and finds nothing else.
        assert await _take(db, [first]) == []
    assert await sql(database_url, "SELECT msg_id FROM pgmq.a_analytics_queue") == [(first,)]
    assert await sql(database_url, "SELECT count(*) FROM pgmq.q_analytics_queue") == [(0,)]


async def test_the_take_works_on_a_queue_table_without_last_read_at(database_url: str) -> None:
    """Supabase's pgmq 1.4.4-1.5.x queue tables have no last_read_at column."""
    await sql(database_url, "ALTER TABLE pgmq.q_analytics_queue DROP COLUMN last_read_at")
    ids = [await send(database_url, QUEUE, {"event": str(i)}) for i in range(3)]
    async with Database(database_url, 2).opened() as db:
        statement = await db.run(lambda c: queues.take_statement(c, QUEUE, vt=30, batch=100))
        queries = (statement.with_archive, statement.alone, statement.wake.text)
        assert not any(b"last_read_at" in query for query in queries)
        taken = await queues.archive_then_read(db, statement, QUEUE, [], 30, 2)
        assert sorted(m.msg_id for m in taken) == ids[:2]  # oldest first, up to qty
        again = await queues.archive_then_read(db, statement, QUEUE, [], 30, 100)  # prepared
        assert [m.msg_id for m in again] == ids[2:]
    [(read_cts,)] = await sql(
        database_url, "SELECT array_agg(read_ct ORDER BY msg_id) FROM pgmq.q_analytics_queue")
    assert read_cts == [1, 1, 1]


async def test_a_take_with_nothing_to_archive_counts_earlier_outcomes_and_commits_async(
        database_url: str) -> None:
    """The wake-up take (nothing finished: `Take.alone`) reports how many earlier
    deliveries ended with a recorded outcome (the crash guard counts on it), and turns
    synchronous_commit off for its own transaction only: the session keeps its setting."""
    msg_id = await send(database_url, QUEUE, {"event": "again"})
    [(enqueued_at,)] = await sql(
        database_url, "SELECT enqueued_at FROM pgmq.q_analytics_queue WHERE msg_id = %s",
        (msg_id,))
    await sql(database_url, "INSERT INTO reactor.job_failures (queue, msg_id, enqueued_at, "
              "outcomes, last_attempt, last_error) VALUES (%s, %s, %s, 2, 2, 'boom')",
              (QUEUE, msg_id, enqueued_at))
    params = queues._take_params(QUEUE, 30, 10)
    with psycopg.connect(database_url, autocommit=True) as conn:
        statement = queues.take_statement(conn, QUEUE, vt=30, batch=100)
        conn.execute("SET synchronous_commit = on")  # the test cluster's default is off
        [(taken, read_ct, _, body, _, outcomes, commit)] = conn.execute(
            statement.alone, params).fetchall()
        assert (taken, read_ct, body, outcomes, commit) == (msg_id, 1, '{"event": "again"}',
                                                            2, "off")
        assert conn.execute("SHOW synchronous_commit").fetchall() == [("on",)]
        # Nothing left to take: no row, nothing committed.
        assert conn.execute(statement.alone, params).fetchall() == []


async def test_a_finished_message_whose_lease_ran_out_is_archived_not_taken_again(
        database_url: str) -> None:
    """The statement that archives a message must not take it again, even when its lease
    ran out while it ran (an outage): it is excluded from the take."""
    msg_id = await send(database_url, QUEUE, {"event": "long"})
    async with Database(database_url, 2).opened() as db:
        [message] = await _take(db, [])
        await sql(database_url, "UPDATE pgmq.q_analytics_queue SET vt = now() - interval '1s'")
        assert await _take(db, [message.msg_id]) == []
    assert await sql(database_url, "SELECT msg_id, read_ct FROM pgmq.a_analytics_queue") == [
        (msg_id, 1)]


async def test_a_take_stuck_past_the_deadline_is_cancelled_and_the_drain_resumes(
        database_url: str) -> None:
    """A table lock holds the take: past DB_STATEMENT_TIMEOUT_S the drainer reports the
    database as not answering, the statement is cancelled on the server (nothing of the
    reactor's waits on the lock afterwards), and once the lock goes the message is handled
    once."""
    msg_id = await send(database_url, QUEUE, {"event": "locked"})
    with psycopg.connect(database_url) as locker:
        locker.execute("LOCK TABLE pgmq.q_analytics_queue IN ACCESS EXCLUSIVE MODE")
        async with running_reactor(database_url, DB_STATEMENT_TIMEOUT_S=1) as reactor:
            with reactor.bus.subscribe() as sub:
                await wait_for(sub, lambda e: e["type"] == "health.degraded"
                               and "database_unreachable" in str(e), within_s=20)
                assert reactor.health.reasons() == ["database_unreachable"]

                async def nothing_of_ours_waits_on_the_lock() -> bool:
                    rows = await sql(database_url,
                                     "SELECT count(*) FROM pg_stat_activity WHERE "
                                     "application_name = 'reactor' AND wait_event_type = 'Lock'")
                    return rows == [(0,)]

                # Cancelled on the server, though the drainer tries again meanwhile: at
                # some moment none of its statements is waiting on the lock.
                await eventually(nothing_of_ours_waits_on_the_lock, within_s=20, every_s=0.05)
                locker.rollback()
                await wait_for(sub, of_type("job.succeeded", msg_id), within_s=30)
            await eventually(lambda: reactor.health.reasons() == [], within_s=10)
    rows = await sql(database_url, "SELECT event FROM public.analytics_events")
    assert rows == [("locked",)]


async def test_a_connection_killed_by_the_server_is_replaced(database_url: str) -> None:
    async with Database(database_url, 2).opened() as db:
        assert await db.fetch(b"SELECT 1") == [(1,)]
        [(pid,)] = await db.fetch(b"SELECT pg_backend_pid()")
        await sql(database_url, "SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(DatabaseUnavailable) as lost:  # the caller waits it out
            await db.fetch(b"SELECT 1")
        assert lost.value.reason == "database_unreachable"
        [(new_pid,)] = await db.fetch(b"SELECT pg_backend_pid()")
        assert new_pid != pid


async def test_fetch_honours_the_callers_cancel_scope(database_url: str) -> None:
    """Shutdown (a cancel scope) interrupts a statement at once; the connection is not
    reused, and the next call works."""
    async with Database(database_url, 2).opened() as db:
        with trio.move_on_after(0.3) as scope:
            await db.fetch(b"SELECT pg_sleep(30)")
        assert scope.cancelled_caught
        assert await db.fetch(b"SELECT 2") == [(2,)]

        async def cancelled_on_the_server() -> bool:
            return await sql(database_url, "SELECT pid FROM pg_stat_activity "
                             "WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'") == []

        await eventually(cancelled_on_the_server, within_s=10, every_s=0.05)


async def test_a_statement_error_is_raised_as_is_and_the_connection_kept(
        database_url: str) -> None:
    async with Database(database_url, 2).opened() as db:
        [(pid,)] = await db.fetch(b"SELECT pg_backend_pid()")
        with pytest.raises(psycopg.errors.UndefinedTable):
            await db.fetch(b"SELECT * FROM no_such_table")
        assert await db.fetch(b"SELECT pg_backend_pid()") == [(pid,)]
