"""The drainers' take (queues.take_statement, queues.archive_then_read): one statement
that archives what finished and takes the next batch with a lease.

It is pgmq.read's own UPDATE issued directly on the queue's table (no plpgsql EXECUTE
per call), so it must read what pgmq.read reads on both table layouts (pgmq >= 1.8
with last_read_at, Supabase's 1.4.4-1.5.x without), archive what finished whatever
plan the planner picks, take each message once however many replicas race for it,
never wait for a durable commit, and refuse nothing silently on a read-only database.
Every form of the take is covered: the archive-and-take (`Take.with_archive`, with its
parameters for a part batch, bound in as one statement for a whole one:
`Take.archive_of`), the take alone of a part batch (`Take.alone`) and the prepared
whole-batch wake-up take (`Take.wake`; its own file is test_prepared_take.py).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
import trio
from psycopg import sql as pgsql

from reactor.engine import queues
from reactor.engine.db import Database, DatabaseUnavailable
from reactor.engine.pgcluster import PgCluster
from tests.harness import database_name, eventually, patience, send, sql
from tests.pgbouncer import pgbouncer, same_database

QUEUE = "analytics_queue"
VT, BATCH = 30, 100
BOTH_FLAVOURS = pytest.mark.parametrize("db_flavor", ["plain", "supabase"], indirect=True)


async def _statement(db: Database, batch: int = BATCH) -> queues.Take:
    return await db.run(lambda c: queues.take_statement(c, QUEUE, vt=VT, batch=batch))


async def _wake_take(db: Database, statement: queues.Take) -> list[queues.Message]:
    """What a drainer takes when woken after an idle spell: nothing finished, a whole
    batch (the prepared take)."""
    return await queues.archive_then_read(db, statement, QUEUE, [], VT, statement.batch)


async def _one(url: str, query: Any, params: Any = None) -> Any:
    [(value,)] = await sql(url, query, params)
    return value


def _connect(url: str, autocommit: bool) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(url, autocommit=autocommit)


# -- 1. what the take reads, on both table layouts --------------------------------------------
@BOTH_FLAVOURS
@pytest.mark.parametrize("last_read_at", [True, False], ids=["pgmq-1.8", "pgmq-1.5"])
@pytest.mark.parametrize("rest", ["prepared", "bound"])
async def test_the_take_reads_every_kind_of_message_as_pgmq_read_does_on_both_table_layouts(
        database_url: str, last_read_at: bool, rest: str) -> None:
    """On a queue table with last_read_at (pgmq >= 1.8) and without (Supabase's
    1.4.4-1.5.x; then no form of the take names the column): an ordinary body, a body
    over MAX_MESSAGE_BYTES (not sent: its size), a message with a failure row of an
    earlier queue incarnation (its msg_id reused: not counted) and one with its own
    (counted) come out of the take as they come out of queues.read (pgmq.read, where the
    installed pgmq has the column), oldest first and no more than asked for (a part
    batch, then a whole batch: prepared, or as the archive-and-take bound for a busy
    drainer with nothing in its archive list), and the table is left as pgmq.read
    leaves it: read_ct 1, leased, last_read_at set where the column is."""
    if not last_read_at:
        await sql(database_url, "ALTER TABLE pgmq.q_analytics_queue DROP COLUMN last_read_at")
    huge = queues.MAX_MESSAGE_BYTES + 1000

    async def four() -> list[int]:
        ids = [int(i) for (i,) in await sql(
            database_url,
            "SELECT pgmq.send('analytics_queue', m) FROM unnest(ARRAY["
            "'{\"event\": \"plain\"}'::jsonb, jsonb_build_object('blob', repeat('x', %s)),"
            "'{\"event\": \"old\"}', '{\"event\": \"own\"}']) WITH ORDINALITY AS t(m, o) "
            "ORDER BY o", (huge,))]
        await sql(database_url, "INSERT INTO reactor.job_failures (queue, msg_id, enqueued_at, "
                  "outcomes) SELECT 'analytics_queue', msg_id, enqueued_at - interval '1 day', "
                  "5 FROM pgmq.q_analytics_queue WHERE msg_id = %s", (ids[2],))
        await sql(database_url, "INSERT INTO reactor.job_failures (queue, msg_id, enqueued_at, "
                  "outcomes) SELECT 'analytics_queue', msg_id, enqueued_at, 2 "
                  "FROM pgmq.q_analytics_queue WHERE msg_id = %s", (ids[3],))
        return ids

    def shape(messages: list[queues.Message], ids: list[int]) -> list[tuple[Any, ...]]:
        return [(m.msg_id - ids[0], m.attempt, m.body, m.decode_error, m.outcomes)
                for m in messages]

    async def table_state(ids: list[int]) -> list[tuple[Any, ...]]:
        return await sql(database_url, pgsql.SQL(
            "SELECT msg_id - %s, read_ct, vt > clock_timestamp() + interval '25 s', {} "
            "FROM pgmq.q_analytics_queue WHERE msg_id = ANY(%s) ORDER BY msg_id").format(
                pgsql.SQL("last_read_at IS NOT NULL" if last_read_at else "NULL")),
            (ids[0], ids))

    expected_state = [(i, 1, True, True if last_read_at else None) for i in range(4)]
    async with Database(database_url, 2).opened() as db:
        if last_read_at:  # the installed pgmq.read itself needs the column
            by_read = await four()
            read = await db.run(lambda c: queues.read(c, QUEUE, VT, 10))
            assert await table_state(by_read) == expected_state
        statement = await _statement(db)
        if not last_read_at:
            forms = (statement.with_archive, statement.alone, statement.wake.text,
                     *statement.archive_parts)
            assert not any(b"last_read_at" in form for form in forms)
        by_take = await four()
        taken = await queues.archive_then_read(db, statement, QUEUE, [], VT, 2)
        assert [m.msg_id for m in taken] == by_take[:2]  # oldest first, up to qty
        if rest == "prepared":
            taken += await _wake_take(db, statement)
        else:  # the installed pgmq.archive needs the column: an empty list archives nothing
            rows = await db.fetch_bound(statement.archive_of([]))
            taken += queues._taken(QUEUE, rows)
    if last_read_at:
        assert shape(taken, by_take) == shape(read, by_read)
    assert shape(taken, by_take) == [
        (0, 1, {"event": "plain"}, None, 0),
        (1, 1, None, f"message is {huge + 12} bytes, over the limit of "
                     f"{queues.MAX_MESSAGE_BYTES} bytes: not processed", 0),
        (2, 1, {"event": "old"}, None, 0),
        (3, 1, {"event": "own"}, None, 2)]
    assert await table_state(by_take) == expected_state


@BOTH_FLAVOURS
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


# -- 2. what the take archives ------------------------------------------------------------------
@BOTH_FLAVOURS
async def test_the_take_archives_what_finished_when_nothing_else_is_visible(
        database_url: str) -> None:
    """Taken, a message is invisible; once its job finished, the drainer's next take
    archives it and takes nothing else, also when the planner puts the take first (the
    archive inside the take was skipped: reproduced by a review, fixed, kept fixed)."""
    msg_id = await send(database_url, QUEUE, {"event": "a"})
    async with Database(database_url, 2).opened() as db:
        statement = await _statement(db)
        [taken] = await queues.archive_then_read(db, statement, QUEUE, [], 30, 100)
        assert (taken.msg_id, taken.attempt, taken.body) == (msg_id, 1, {"event": "a"})
        # What autovacuum does to a queue table after 50 changes, at a quiet moment: a few
        # rows (in flight, or retries waiting). An empty table is not enough: the planner
        # then assumes ten pages of rows.
        await sql(database_url, "ANALYZE pgmq.q_analytics_queue")
        # The job finished; the drainer archives it with its next take (nothing visible).
        assert await queues.archive_then_read(db, statement, QUEUE, [msg_id], 30, 100) == []
    assert await sql(database_url, "SELECT msg_id FROM pgmq.a_analytics_queue") == [(msg_id,)]
    assert await _one(database_url, "SELECT count(*) FROM pgmq.q_analytics_queue") == 0


@BOTH_FLAVOURS
@pytest.mark.parametrize("qty", [BATCH, 10], ids=["bound", "parameters"])
async def test_a_finished_message_whose_lease_ran_out_is_archived_not_taken_again(
        database_url: str, qty: int) -> None:
    """The statement that archives a message must not take it again, even when its lease
    ran out while it ran (an outage): it is excluded from the take, in both forms of the
    archive-and-take (a whole batch: every value bound in; a part one: parameters)."""
    msg_id = await send(database_url, QUEUE, {"event": "long"})
    async with Database(database_url, 2).opened() as db:
        statement = await _statement(db)
        [message] = await queues.archive_then_read(db, statement, QUEUE, [], 30, qty)
        await sql(database_url, "UPDATE pgmq.q_analytics_queue SET vt = now() - interval '1s'")
        assert await queues.archive_then_read(db, statement, QUEUE, [message.msg_id],
                                              30, qty) == []
    assert await sql(database_url, "SELECT msg_id, read_ct FROM pgmq.a_analytics_queue") == [
        (msg_id, 1)]


async def test_the_bound_archive_takes_integer_ids_only(database_url: str) -> None:
    """The finished ids are written into the statement's text: anything but an integer
    is refused before a statement is sent (they are msg_ids read from pgmq, bigint)."""
    async with Database(database_url, 2).opened() as db:
        statement = await _statement(db)
    assert statement.archive_of([1, 22, 333]).count(b"'{1,22,333}'::bigint[]") == 3

    class Sly(int):
        def __str__(self) -> str:
            return "1) OR true --"
    for wrong in ["1) OR true --", True, 2.9, Sly(3)]:
        with pytest.raises(TypeError, match="a msg_id must be an int"):
            statement.archive_of([1, wrong])  # type: ignore[list-item]


# -- 3. replicas racing ---------------------------------------------------------------------------
async def _race(url: str, replicas: int, total: int, *, prepared: bool) -> list[queues.Message]:
    """`replicas` Databases race for `total` messages, alternating the take alone (with
    nothing finished: the wake-up take) and the archive-and-take, as the drainers do,
    and archiving their last batch at the end. Every take is of 7 messages: a whole
    batch (the wake-up take prepared) or a part of one (every take unprepared)."""
    qty = 7
    taken: list[queues.Message] = []

    async def replica(alone_every: int) -> None:
        async with Database(url, 2).opened() as db:
            statement = await _statement(db, qty if prepared else BATCH)
            done: list[int] = []
            rounds = 0
            while len(taken) < total:
                rounds += 1
                finished = done if rounds % alone_every else []
                got = await queues.archive_then_read(db, statement, QUEUE, finished, VT, qty)
                done = [m.msg_id for m in got] + (done if not finished else [])
                taken.extend(got)
            await queues.archive_then_read(db, statement, QUEUE, done, VT, 1)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for n in range(replicas):  # 1: always the wake-up take (nothing archived)
                nursery.start_soon(replica, 1 if n % 2 == 0 else n + 1)
    return taken


async def _send_many(url: str, total: int) -> list[int]:
    return [int(i) for (i,) in await sql(
        url, "SELECT pgmq.send('analytics_queue', jsonb_build_object('n', n)) "
        "FROM generate_series(1, %s) AS n", (total,))]


@BOTH_FLAVOURS
@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "unprepared"])
async def test_replicas_racing_for_the_same_messages_take_each_once(
        database_url: str, prepared: bool) -> None:
    """Four replicas race for the same messages, two of them taking only with the
    wake-up take (prepared or not): every message is taken exactly once (FOR UPDATE SKIP
    LOCKED), at its first attempt, and archived by the replica that took it, on the
    plain and the Supabase-like database."""
    total = 400
    ids = await _send_many(database_url, total)
    taken = await _race(database_url, 4, total, prepared=prepared)
    assert sorted(m.msg_id for m in taken) == ids  # each once
    assert {m.attempt for m in taken} == {1}
    assert await _one(database_url, "SELECT count(*) FROM pgmq.q_analytics_queue "
                                    "WHERE read_ct <> 1") == 0
    assert await _one(database_url, "SELECT count(*) FROM pgmq.a_analytics_queue "
                      "WHERE read_ct = 1") + await _one(
        database_url, "SELECT count(*) FROM pgmq.q_analytics_queue WHERE read_ct = 1") == total


@pytest.mark.process
async def test_replicas_racing_through_pgbouncer_take_each_message_once(
        database_url: str, pg_cluster: PgCluster) -> None:
    """The same race through PgBouncer (two server connections for four replicas of two
    connections each): statements prepared on one server connection, executed on another
    or missing there, fall back mid-race; still each message exactly once."""
    total = 300
    ids = await _send_many(database_url, total)
    with pgbouncer(pg_cluster, pool_size=2) as pooled:
        taken = await _race(same_database(pooled, database_url), 4, total, prepared=True)
    assert sorted(m.msg_id for m in taken) == ids
    assert {m.attempt for m in taken} == {1}


# -- 4. no take waits for a durable commit ------------------------------------------------------
# What a URL adds for its commits to ask for durability (the clusters turn it off).
DURABLE = "?options=-c%20synchronous_commit%3Don"


def _set_sync_standby(url: str, names: str | None) -> None:
    """Name a synchronous standby that never connects (or none): every commit that asks
    for durability then waits for it forever; one with synchronous_commit off does not."""
    with psycopg.connect(url, autocommit=True) as conn:
        if names is None:
            conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
        else:
            conn.execute(pgsql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(
                pgsql.Literal(names)))
        conn.execute("SELECT pg_reload_conf()")


@asynccontextmanager
async def standby_that_never_answers(database_url: str, pg_cluster: PgCluster
                                     ) -> AsyncIterator[str]:
    """A synchronous standby named that never connects, proven to bite; yields a URL of the
    database whose commits ask for durability (they wait for it for ever)."""
    durable_url = database_url + DURABLE
    admin = pg_cluster.url()
    await trio.to_thread.run_sync(_set_sync_standby, admin, "never_connects")
    try:
        await _durable_commits_wait_for_the_standby(durable_url, admin)
        yield durable_url
    finally:
        await trio.to_thread.run_sync(_set_sync_standby, admin, None)


async def _durable_commits_wait_for_the_standby(durable_url: str, admin: str) -> None:
    """Prove the setup bites: a durable commit waits for the standby (until cancelled).

    The setting takes effect once the checkpointer has read the reloaded configuration
    (it is the process that tells the backends a synchronous standby is named), which it
    does between checkpoints: a durable commit that went through before is tried again."""
    with trio.fail_after(patience(20)):
        attempt = 0
        while not await _a_durable_commit_waits(durable_url, admin, attempt):
            attempt += 1
            await trio.sleep(0.1)


async def _a_durable_commit_waits(durable_url: str, admin: str, attempt: int) -> bool:
    """True if a durable commit waits for the standby; False if it went through."""
    blocked: dict[str, Any] = {}

    def durable_write() -> None:
        with psycopg.connect(durable_url, autocommit=True) as conn:
            blocked["pid"] = conn.info.backend_pid
            conn.execute("INSERT INTO reactor.job_failures (queue, msg_id, enqueued_at) "
                         "VALUES ('control', %s, now())", (attempt,))
            blocked["committed"] = True

    writer = threading.Thread(target=durable_write)
    writer.start()
    try:
        await eventually(lambda: "pid" in blocked, within_s=20)
        await eventually(lambda: "committed" in blocked or _waits_for_standby(
            admin, blocked["pid"]), within_s=20)
        return "committed" not in blocked
    finally:
        with trio.CancelScope(shield=True):  # also when the caller's deadline struck
            if "pid" in blocked:
                await sql(admin, "SELECT pg_cancel_backend(%s)", (blocked["pid"],))
            await trio.to_thread.run_sync(writer.join)


async def _waits_for_standby(admin: str, pid: int) -> bool:
    rows = await sql(admin, "SELECT wait_event FROM pg_stat_activity WHERE pid = %s", (pid,))
    return rows == [("SyncRep",)]


async def test_no_take_waits_for_a_durable_commit_even_where_every_commit_would(
        database_url: str, pg_cluster: PgCluster) -> None:
    """The takes turn synchronous_commit off for their own transaction: with a synchronous
    standby that never answers, a durable commit waits forever, and no take does: the
    take alone that took messages, the archive-and-take, one that found nothing, and the
    prepared wake-up take (its generic plan too) when it is prepared, when it is
    executed again, and when it finds nothing."""
    ids = [await send(database_url, QUEUE, {"n": n}) for n in range(3)]
    async with standby_that_never_answers(database_url, pg_cluster) as durable_url, \
            Database(durable_url, 1, statement_timeout_s=20).opened() as db:
        statement = await _statement(db)
        with trio.fail_after(30):  # a take that waited would wait forever
            taken = await queues.archive_then_read(db, statement, QUEUE, [], VT, 2)
            assert [m.msg_id for m in taken] == ids[:2]
            rest = await queues.archive_then_read(db, statement, QUEUE, ids[:2], VT, 10)
            assert [m.msg_id for m in rest] == ids[2:]
            assert await queues.archive_then_read(db, statement, QUEUE, [], VT, 10) == []
            for _ in range(2):  # prepared, then executed again
                await sql(database_url, "UPDATE pgmq.q_analytics_queue SET vt = now()")
                assert [m.msg_id for m in await _wake_take(db, statement)] == ids[2:]
            await sql(database_url, "UPDATE pgmq.q_analytics_queue "
                                    "SET vt = now() + interval '1 hour'")
            assert await _wake_take(db, statement) == []
        plans = await db.fetch("SELECT name FROM pg_prepared_statements")
        assert plans == [(statement.wake.name,)]
    # Committed all the same: taken once each time, the first two archived.
    assert await sql(database_url, "SELECT msg_id, read_ct FROM pgmq.q_analytics_queue") == [
        (ids[2], 3)]
    assert await sql(database_url, "SELECT msg_id FROM pgmq.a_analytics_queue ORDER BY 1") == [
        (i,) for i in ids[:2]]


async def test_a_take_that_loses_its_only_message_to_another_replica_commits_async(
        database_url: str, pg_cluster: PgCluster) -> None:
    """Another replica takes the message R and commits after this take's snapshot but before
    its scan reaches R: FOR UPDATE then locks R's new version, finds it no longer visible
    (the recheck) and returns no row, yet keeps the lock: the take has a transaction id
    to commit. Like every take, it must not wait for a durable commit (reproduced: the
    wake-up take set synchronous_commit off once per returned row, so this one waited
    for the synchronous standby forever; now its scan sets it at each visible message,
    before locking it).

    The race is made deterministic with a row-level security policy that holds the
    taker's scan on an advisory lock at the message before R (the taker is an ordinary
    role: a superuser bypasses row-level security)."""
    taker = f"taker_{uuid.uuid4().hex[:8]}"
    admin = pg_cluster.url()
    first = await send(database_url, QUEUE, {"gate": True}, notify=False)
    lost = await send(database_url, QUEUE, {"lost": True}, notify=False)
    key = 0x7A4E
    await sql(database_url, pgsql.SQL("""
        CREATE ROLE {taker} LOGIN;
        GRANT USAGE ON SCHEMA pgmq, reactor TO {taker};
        GRANT SELECT, UPDATE ON pgmq.q_analytics_queue TO {taker};
        GRANT SELECT ON reactor.job_failures TO {taker};
        CREATE FUNCTION public.review_gate(id bigint) RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN
            IF id = {first} THEN  -- hold the scan here, and never take this one
                PERFORM pg_advisory_lock_shared({key});
                PERFORM pg_advisory_unlock_shared({key});
                RETURN false;
            END IF;
            RETURN true;
        END $$;
        ALTER TABLE pgmq.q_analytics_queue ENABLE ROW LEVEL SECURITY;
        CREATE POLICY review_gate ON pgmq.q_analytics_queue USING (public.review_gate(msg_id));
        """).format(taker=pgsql.Identifier(taker), first=pgsql.Literal(first),
                    key=pgsql.Literal(key)))
    taker_url = pg_cluster.url_as(taker, database_name(database_url)) + DURABLE
    other = await trio.to_thread.run_sync(_connect, database_url, False)
    locker = await trio.to_thread.run_sync(_connect, database_url, True)
    try:
        # The other replica takes R (not committed yet); the taker's scan will wait at F.
        await trio.to_thread.run_sync(
            other.execute, "UPDATE pgmq.q_analytics_queue SET read_ct = read_ct + 1, "
            "vt = clock_timestamp() + interval '30 s' WHERE msg_id = %s", (lost,))
        await trio.to_thread.run_sync(locker.execute, f"SELECT pg_advisory_lock({key})")
        await trio.to_thread.run_sync(_set_sync_standby, admin, "never_connects")
        # Else a take could commit before the checkpointer applies it, and pass vacuously.
        await _durable_commits_wait_for_the_standby(database_url + DURABLE, admin)
        taken: list[queues.Message] = []
        finished = trio.Event()
        async with Database(taker_url, 1, statement_timeout_s=60).opened() as db:
            statement = await _statement(db)

            async def take() -> None:
                taken.extend(await queues.archive_then_read(db, statement, QUEUE, [], 30, 10))
                finished.set()

            async def held_at_the_gate() -> bool:
                return ("advisory",) in await sql(
                    admin, "SELECT wait_event FROM pg_stat_activity WHERE usename = %s",
                    (taker,))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(take)
                await eventually(held_at_the_gate, within_s=20)
                await trio.to_thread.run_sync(other.commit)  # after the taker's snapshot
                await trio.to_thread.run_sync(locker.execute,
                                              f"SELECT pg_advisory_unlock({key})")
                with trio.move_on_after(15):  # a durable commit waits forever here
                    await finished.wait()
                waits = await sql(admin, "SELECT wait_event FROM pg_stat_activity "
                                         "WHERE usename = %s", (taker,))
                # (a failure here cancels the take: its connection is cut on the server)
                assert finished.is_set(), f"the take waits for a durable commit: {waits}"
        assert taken == []
        # The race did happen: the take holds (held) a lock on R's new version.
        assert await sql(database_url, "SELECT xmax::text <> '0' FROM pgmq.q_analytics_queue "
                                       "WHERE msg_id = %s", (lost,)) == [(True,)]
    finally:
        await trio.to_thread.run_sync(_set_sync_standby, admin, None)
        await trio.to_thread.run_sync(other.close)
        await trio.to_thread.run_sync(locker.close)
        await sql(database_url, pgsql.SQL("DROP POLICY review_gate ON pgmq.q_analytics_queue; "
                                          "DROP OWNED BY {taker}").format(
            taker=pgsql.Identifier(taker)))
        await sql(admin, pgsql.SQL("DROP ROLE {}").format(pgsql.Identifier(taker)))
    assert await sql(database_url, "SELECT msg_id, read_ct FROM pgmq.q_analytics_queue "
                                   "ORDER BY msg_id") == [(first, 0), (lost, 1)]


# -- 5. behind a transaction pooler, and on a read-only database ---------------------------------
@pytest.mark.process
async def test_through_pgbouncer_a_take_leaves_no_setting_on_the_server_connection(
        database_url: str, pg_cluster: PgCluster) -> None:
    """Through PgBouncer in transaction mode (one server connection), the takes work, and
    the synchronous_commit they turn off is their transaction's alone: the next client
    of that server connection commits durably again."""
    await sql(database_url, pgsql.SQL("ALTER DATABASE {} SET synchronous_commit = on").format(
        pgsql.Identifier(database_name(database_url))))
    ids = [await send(database_url, QUEUE, {"n": n}) for n in range(3)]
    with pgbouncer(pg_cluster, pool_size=1) as pooled:
        url = same_database(pooled, database_url)
        async with Database(url, 1).opened() as db:
            statement = await _statement(db)
            first = await queues.archive_then_read(db, statement, QUEUE, [], 30, 2)
            rest = await queues.archive_then_read(db, statement, QUEUE, [ids[0]], 30, 10)
            # A whole batch's archive-and-take, every value bound in (the simple protocol).
            assert await queues.archive_then_read(db, statement, QUEUE, ids[1:], 30,
                                                  BATCH) == []
        assert [m.msg_id for m in first + rest] == ids
        assert await sql(url, "SELECT msg_id FROM pgmq.a_analytics_queue ORDER BY 1") == [
            (i,) for i in ids]
        assert await sql(url, "SHOW synchronous_commit") == [("on",)]
        assert await sql(url, "SELECT count(DISTINCT pid) FROM pg_stat_activity "
                              "WHERE datname = current_database() "
                              "AND application_name <> 'pgbouncer'") == [(1,)]


@pytest.mark.parametrize(("qty", "finished"), [(BATCH, []), (10, []), (BATCH, [10**9])],
                         ids=["prepared", "unprepared", "bound"])
async def test_a_take_on_a_read_only_database_is_an_outage_and_takes_nothing(
        database_url: str, qty: int, finished: list[int]) -> None:
    """A database flipped read-only (a standby after failover) refuses the take, prepared,
    with parameters or bound with a (harmless) archive list, every time: the drainers'
    error for waiting it out (database_read_only), the message untouched, preparing not
    given up; writable again, the take works."""
    name = pgsql.Identifier(database_name(database_url))
    msg_id = await send(database_url, QUEUE, {"event": "later"}, notify=False)
    await sql(database_url, pgsql.SQL(
        "ALTER DATABASE {} SET default_transaction_read_only = on").format(name))
    async with Database(database_url, 1).opened() as db:  # new sessions: read-only
        statement = await _statement(db)
        for _ in range(2):  # the second on a fresh connection (the first one was dropped)
            with pytest.raises(DatabaseUnavailable) as refused:
                await queues.archive_then_read(db, statement, QUEUE, finished, VT, qty)
            assert refused.value.reason == "database_read_only"
        assert db.prepared_statements
    assert await sql(database_url, "SELECT msg_id, read_ct FROM pgmq.q_analytics_queue") == [
        (msg_id, 0)]
    await sql(database_url + "?options=-c%20default_transaction_read_only%3Doff",
              pgsql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(name))
    async with Database(database_url, 1).opened() as db:
        taken = await queues.archive_then_read(db, statement, QUEUE, finished, VT, qty)
        assert [m.msg_id for m in taken] == [msg_id]
