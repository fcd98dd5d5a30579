"""An attacker's review of commit 4ee4e4f: the drainers' wake-up take runs as a
server-side prepared statement (queues.Take.wake, db.Prepared, Database.fetch_prepared).

Everything runs against real components: a real Postgres (the fixtures' clusters, and
the Supabase-like one), the real pgmq SQL, a real PgBouncer 1.18 in transaction mode,
real locks and cancellations, and a real synchronous-replication wait. Two defects are
reproduced (section 1: a prepared statement whose result type changed stays on a
pooler's server connection, and the wake-up take failed there for good: fixed in
Database.fetch_prepared, which then runs it unprepared from then on; section 1b: a take
that kept failing was retried ten times a second with health flapping, because
composing it again counted as recovery: fixed in Drainer._flush); the other tests prove
what held.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import trio
from psycopg import sql as pgsql

from reactor.clinic.analytics import AnalyticsProcessor
from reactor.engine import queues
from reactor.engine.db import Database, DatabaseUnavailable
from reactor.engine.pgcluster import PgCluster
from tests.engine.take.test_wake_take import standby_that_never_answers
from tests.harness import eventually, running_reactor, send, sql
from tests.pgbouncer import pgbouncer

QUEUE = "analytics_queue"
VT, BATCH = 30, 100
BOTH_FLAVOURS = pytest.mark.parametrize("db_flavor", ["plain", "supabase"], indirect=True)
ANALYTICS_ONLY: dict[str, Any] = {"analytics_queue": AnalyticsProcessor}
CHANGE_RESULT_TYPE = "ALTER TABLE pgmq.q_analytics_queue ALTER COLUMN read_ct TYPE bigint"


def _dbname(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def _with_path(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{dbname}"))


async def _statement(db: Database, batch: int = BATCH) -> queues.Take:
    return await db.run(lambda c: queues.take_statement(c, QUEUE, vt=VT, batch=batch))


async def _wake_take(db: Database, statement: queues.Take) -> list[queues.Message]:
    """What a drainer takes when woken after an idle spell: nothing finished, a whole
    batch (the prepared take)."""
    return await queues.archive_then_read(db, statement, QUEUE, [], VT, statement.batch)


async def _one(url: str, query: Any, params: Any = None) -> Any:
    [(value,)] = await sql(url, query, params)
    return value


# -- 1. DEFECT: a stale prepared take on a pooler's server connection ---------------------------
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
        url = _with_path(pooled, _dbname(database_url))
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
        url = _with_path(pooled, _dbname(database_url))
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


# -- 1b. DEFECT: a take that keeps failing is retried ten times a second, for good -------------
async def test_a_take_that_keeps_failing_backs_off_and_reports_once(database_url: str) -> None:
    """A wake-up take that fails every time (here: a read-only database; behind a pooler,
    the stale statement above) must be retried with the drainer's doubling backoff and
    reported once. Reproduced: after each failure the drainer composes its statement
    again (Drainer._db_down drops it) through `_db`, whose success counts as recovery:
    health cleared, backoff back to 0.1 s, then the take fails and degrades again:
    ~10 degraded/recovered pairs a second per queue (a warning each, /healthz flapping,
    and, since a failed prepared take closes its connection, a new connection each)."""
    name = pgsql.Identifier(_dbname(database_url))
    await send(database_url, QUEUE, {"event": "later", "properties": {}}, notify=False)
    await sql(database_url, pgsql.SQL(
        "ALTER DATABASE {} SET default_transaction_read_only = on").format(name))
    seen: list[str] = []
    try:
        async with running_reactor(database_url, ANALYTICS_ONLY) as reactor:
            with reactor.bus.subscribe() as sub, trio.move_on_after(4):
                async for event in sub.receive:
                    if event["type"] in ("health.degraded", "health.recovered"):
                        seen.append(event["type"])
    finally:
        await sql(database_url + "?options=-c%20default_transaction_read_only%3Doff",
                  pgsql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(
                      name))
    assert seen.count("health.degraded") <= 2, seen
    assert "health.recovered" not in seen, f"{len(seen)} events in 4 s"


# -- 2. held: a pooler that forgets the statement (DISCARD ALL, DEALLOCATE ALL) ----------------
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
        url = _with_path(pooled, _dbname(database_url))
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


# -- 3. held: replicas racing with prepared takes -------------------------------------------
async def _race(url: str, database_url: str, replicas: int, total: int) -> list[queues.Message]:
    """`replicas` Databases race for `total` messages, alternating the prepared wake-up
    take and the archive-and-take, as the drainers do; every take is a whole batch."""
    batch = 7
    taken: list[queues.Message] = []

    async def replica(alone_every: int) -> None:
        async with Database(url, 2).opened() as db:
            statement = await _statement(db, batch)
            done: list[int] = []
            rounds = 0
            while len(taken) < total:
                rounds += 1
                finished = done if rounds % alone_every else []
                got = await queues.archive_then_read(db, statement, QUEUE, finished, VT, batch)
                done = [m.msg_id for m in got] + (done if not finished else [])
                taken.extend(got)
            await queues.archive_then_read(db, statement, QUEUE, done, VT, 1)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for n in range(replicas):
                nursery.start_soon(replica, 1 if n % 2 == 0 else n + 1)
    return taken


@BOTH_FLAVOURS
async def test_replicas_racing_with_prepared_takes_take_each_message_once(
        database_url: str) -> None:
    """Four replicas, two of them taking only with the prepared wake-up take: every
    message is taken exactly once, at its first attempt, on the plain and the
    Supabase-like database; the statement stays prepared (one per connection)."""
    total = 300
    ids = [int(i) for (i,) in await sql(
        database_url, "SELECT pgmq.send('analytics_queue', jsonb_build_object('n', n)) "
        "FROM generate_series(1, %s) AS n", (total,))]
    taken = await _race(database_url, database_url, 4, total)
    assert sorted(m.msg_id for m in taken) == ids
    assert {m.attempt for m in taken} == {1}
    assert await _one(database_url, "SELECT count(*) FROM pgmq.q_analytics_queue "
                                    "WHERE read_ct <> 1") == 0


@pytest.mark.process
async def test_replicas_racing_through_pgbouncer_take_each_message_once(
        database_url: str, pg_cluster: PgCluster) -> None:
    """The same race through PgBouncer (two server connections for four replicas of two
    connections each): statements prepared on one server connection, executed on another
    or missing there, fall back mid-race; still each message exactly once."""
    total = 300
    ids = [int(i) for (i,) in await sql(
        database_url, "SELECT pgmq.send('analytics_queue', jsonb_build_object('n', n)) "
        "FROM generate_series(1, %s) AS n", (total,))]
    with pgbouncer(pg_cluster, pool_size=2) as pooled:
        taken = await _race(_with_path(pooled, _dbname(database_url)), database_url, 4, total)
    assert sorted(m.msg_id for m in taken) == ids
    assert {m.attempt for m in taken} == {1}


# -- 4. held: the prepared take never waits for a durable commit -----------------------------
async def test_the_prepared_take_never_waits_for_a_durable_commit(
        database_url: str, pg_cluster: PgCluster) -> None:
    """With a synchronous standby that never answers, a durable commit waits forever;
    the prepared wake-up take (one that takes, one that finds nothing) does not: its
    generic plan still turns synchronous_commit off for its own transaction."""
    ids = [await send(database_url, QUEUE, {"n": n}, notify=False) for n in range(3)]
    async with standby_that_never_answers(database_url, pg_cluster) as durable_url, \
            Database(durable_url, 1, statement_timeout_s=20).opened() as db:
        statement = await _statement(db)
        with trio.fail_after(30):  # a take that waited would wait forever
            for _ in range(2):  # prepared, then executed again
                taken = await _wake_take(db, statement)
                assert [m.msg_id for m in taken] == ids
                await sql(database_url, "UPDATE pgmq.q_analytics_queue SET vt = now()")
            await sql(database_url, "UPDATE pgmq.q_analytics_queue "
                                    "SET vt = now() + interval '1 hour'")
            assert await _wake_take(db, statement) == []
        plans = await db.fetch("SELECT name FROM pg_prepared_statements")
        assert plans == [(statement.wake.name,)]
    assert await sql(database_url, "SELECT array_agg(read_ct ORDER BY msg_id) "
                                   "FROM pgmq.q_analytics_queue") == [([2, 2, 2],)]


# -- 5. held: a prepared take cut mid-way -----------------------------------------------------
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
        url = _with_path(url, _dbname(database_url))
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
                # Cancelled on the server before the caller went on: nothing waits any more.
                assert not await waits_on_the_lock()
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

