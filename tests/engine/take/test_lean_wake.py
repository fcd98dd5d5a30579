"""An attacker's review of commit b5e76f7: the prepared wake-up take's rows read without a
cursor (db._simple_rows), the listener's notifications read straight from libpq
(ListenConnection.pending), and composing the take again not counting as recovery
(Drainer._db_call(..., recovers=False)).

Everything runs against real components: the fixtures' Postgres, the real pgmq SQL,
real triggers, locks and terminated backends, real reactors. Four defects are reproduced
(section 1): the first is a read-only spell that ends but the reactor never saw it end
(fixed: a session that refused a write as read-only is closed, and the idle ones with
it); the other three are session settings of the database or role (DateStyle,
client_encoding) that broke the take or the listener, the wake-up take included (fixed:
every connection asks for UTF8, and sets DateStyle ISO where the server has another).
The other tests (section 2) prove what held.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import trio
from psycopg import sql as pgsql

from reactor.engine import queues
from reactor.engine.db import Database, DatabaseUnavailable, ListenConnection
from tests.harness import eventually, running_reactor, scripted_processor, send, sql

QUEUE = "analytics_queue"
VT, BATCH = 30, 100
# The test's own connections: writable and UTF-8 whatever the database's defaults are.
PLAIN = "?options=-c%20default_transaction_read_only%3Doff&client_encoding=UTF8"


def _dbname(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


async def _alter_database(url: str, setting: str) -> None:
    """ALTER DATABASE <the test's database> <setting>: new sessions get it."""
    await sql(url + PLAIN, pgsql.SQL("ALTER DATABASE {} " + setting).format(
        pgsql.Identifier(_dbname(url))))


async def _statement(db: Database) -> queues.Take:
    return await db.run(lambda c: queues.take_statement(c, QUEUE, vt=VT, batch=BATCH))


async def _read_cts(url: str) -> list[int]:
    [(cts,)] = await sql(url + PLAIN, "SELECT array_agg(read_ct ORDER BY msg_id) "
                                      "FROM pgmq.q_analytics_queue")
    return list(cts or [])


# -- 1a. DEFECT: a read-only spell set per database ends, the reactor never sees it end ----------
async def test_a_database_made_writable_again_is_drained_and_recovers_once(
        database_url: str) -> None:
    """The database is made read-only the way an operator does it for one database
    (`ALTER DATABASE ... SET default_transaction_read_only = on`: new sessions only), then
    writable again (RESET). A message sent afterwards fails once (a retry to record) and
    must then be processed, the drainer's fault cleared once and not raised again.
    Reproduced: every connection the reactor opened during the spell stays read-only for
    its whole life, and `Database.run`/`fetch` keep a connection that failed with
    ReadOnlySqlTransaction (it is idle, not broken): composing the take during the spell
    (the sync pool) left one there, and every retry recorded through it fails, so
    the drainer never takes again (health cleared, then degraded for good)."""
    proc = scripted_processor(expected=1)
    await _alter_database(database_url, "SET default_transaction_read_only = on")
    events: list[str] = []
    async with running_reactor(database_url, {QUEUE: proc}, DB_POOL_SIZE=2) as reactor:
        with reactor.bus.subscribe() as sub:
            async def collect() -> None:
                async for event in sub.receive:
                    if event["type"].startswith("health.") and event.get("source") == (
                            f"drainer:{QUEUE}"):
                        events.append(event["type"])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect)
                await trio.sleep(3)  # a few takes refused, the take composed again each time
                await _alter_database(database_url, "RESET default_transaction_read_only")
                await send(database_url + PLAIN, QUEUE, {"fail_times": 1})
                with trio.move_on_after(25):  # backoff cap 10 s, retry after 1 s
                    await proc.all_done.wait()
                await trio.sleep(0.5)
                nursery.cancel_scope.cancel()
        faults = reactor.health.faults
    assert proc.seen == [(1, 1), (1, 2)], (proc.seen, faults)
    assert events[:1] == ["health.degraded"], events
    assert events.count("health.recovered") == 1, events
    assert events[-1] == "health.recovered", events
    assert faults == []


# -- 1b. DEFECT: a DateStyle other than ISO ends the reactor ---------------------------------
async def test_a_database_whose_date_style_is_not_iso_does_not_end_the_reactor(
        database_url: str) -> None:
    """`ALTER DATABASE ... SET DateStyle = 'SQL, DMY'` (a European habit; per role works
    the same): the take returns enqueued_at as text in that style, and psycopg's
    timestamptz loader raises NotImplementedError for anything but ISO, for a cursor
    (Database.fetch) and for the lean wake-up take (_simple_rows) alike. Not a
    psycopg.Error, so Drainer._db_call lets it through and it ended the whole reactor
    (reproduced), against "nothing ordinary ends the process". Wanted: the message is
    processed (the reactor's sessions read timestamps in ISO)."""
    proc = scripted_processor(expected=1)
    await _alter_database(database_url, "SET DateStyle = 'SQL, DMY'")
    await send(database_url + PLAIN, QUEUE, {})
    with trio.fail_after(20):
        async with running_reactor(database_url, {QUEUE: proc}):
            await proc.all_done.wait()
    assert proc.seen == [(1, 1)]


# -- 1c. DEFECT: one body the session's encoding cannot carry stops its whole queue ------------
async def test_a_body_the_session_encoding_cannot_carry_does_not_stall_its_queue(
        database_url: str) -> None:
    """The database (UTF8) has `client_encoding = 'LATIN1'` set for new sessions (set per
    role or database by a legacy client; or PGCLIENTENCODING in the reactor's environment).
    One message body in Russian cannot be converted to LATIN1: the server fails the whole
    take (UntranslatableCharacter), the prepared wake-up take and every other, so that
    body and every message behind it stay in the queue for good (reproduced: nothing is
    processed; the drainer reports a database error and retries forever). Wanted: both
    processed (the reactor's sessions use UTF-8, which carries any text)."""
    proc = scripted_processor(expected=2)
    await _alter_database(database_url, "SET client_encoding = 'LATIN1'")
    await sql(database_url + PLAIN, "SELECT pgmq.send('analytics_queue', "
                                    "jsonb_build_object('note', 'Привет'))")
    await send(database_url + PLAIN, QUEUE, {"note": "plain"})
    async with running_reactor(database_url, {QUEUE: proc}):
        with trio.move_on_after(15):
            await proc.all_done.wait()
    assert sorted(proc.finished) == [1, 2], proc.seen


# -- 1d. DEFECT: one notification the listener's encoding cannot carry cuts the listener -------
async def test_a_notification_the_listener_encoding_cannot_carry_does_not_cut_it(
        database_url: str) -> None:
    """Any role may NOTIFY on reactor_wakeup. With `client_encoding = 'LATIN1'` set for new
    sessions, a payload in Russian cannot be converted for the listener's session: the
    server closes the listener's connection (reproduced: DatabaseUnavailable "server
    closed the connection unexpectedly"; the reactor reports listener_down and
    reconnects, losing what was sent meanwhile, and a hostile client can repeat it at
    will). Wanted: the listener reads it and the next notification."""
    await _alter_database(database_url, "SET client_encoding = 'LATIN1'")
    listen = await ListenConnection.open(database_url)
    try:
        for payload in ("é", "Привет", "after"):
            await sql(database_url + PLAIN, "SELECT pg_notify('reactor_wakeup', %s)",
                      (payload,))
        got: list[str] = []
        with trio.fail_after(10):
            while len(got) < 3:
                got += await listen.wait()
        assert got == ["é", "Привет", "after"]
    finally:
        listen.close()


# -- 2. held ------------------------------------------------------------------------------------
async def _cursor_then_lean(url: str) -> tuple[list[Any], list[Any]]:
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
async def test_the_lean_take_reads_what_a_cursor_reads_under_odd_session_settings(
        database_url: str, setting: str) -> None:
    """Session settings set on the database (as per role): the rows of the lean wake-up
    take equal a cursor's, value for value and type for type (timestamps in the session's
    time zone, non-ASCII text decoded with the session's encoding)."""
    await send(database_url + PLAIN, QUEUE, {"event": "é", "n": [[1]]}, notify=False)
    await send(database_url + PLAIN, QUEUE, {"event": "x"}, notify=False)
    await _alter_database(database_url, "SET " + setting)
    cursor, lean = await _cursor_then_lean(database_url)
    assert len(lean) == 2
    assert lean == cursor
    assert [type(v) for v in lean[0]] == [type(v) for v in cursor[0]]
    if "TimeZone" in setting:
        assert str(lean[0][1].tzinfo) == "Asia/Kathmandu"


async def test_the_lean_take_reads_a_batch_of_a_hundred_big_bodies(database_url: str) -> None:
    """A hundred bodies of ~240 KB (multibyte text, 24 MB in all: many reads of the
    socket) come back whole and equal to a cursor's; the connection serves a cursor
    after it."""
    await sql(database_url, "SELECT pgmq.send('analytics_queue', jsonb_build_object('p', "
              "repeat(chr(1000 + n), 120000))) FROM generate_series(1, 100) AS n")
    cursor, lean = await _cursor_then_lean(database_url)
    assert len(lean) == 100
    # UPDATE … RETURNING gives no order (it follows the heap, which a concurrent vacuum
    # may change between the two takes): compare by message id.
    lean, cursor = sorted(lean, key=lambda row: row[0]), sorted(cursor, key=lambda row: row[0])
    assert lean == cursor
    assert [queues.decode_body(row[2], row[3])[0]["p"][0] for row in lean] == [
        chr(1000 + n) for n in range(1, 101)]


async def test_an_error_after_the_rows_were_sent_takes_nothing_and_the_next_take_works(
        database_url: str) -> None:
    """An AFTER trigger on the queue table raises NOTICEs and then, at the end of the
    statement (after the rows were sent), an error: the lean take raises the server's
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


async def test_a_lean_take_whose_backend_is_terminated_is_an_outage_and_takes_nothing(
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


async def test_the_listener_reads_a_flood_of_distinct_notifications_in_order(
        database_url: str) -> None:
    """20,000 distinct payloads in one transaction (Postgres folds only duplicates): all
    read, in order, over several reads (libpq reads what the socket has), none twice."""
    listen = await ListenConnection.open(database_url)
    try:
        await sql(database_url, "SELECT pg_notify('reactor_wakeup', 'q' || n) "
                                "FROM generate_series(1, 20000) AS n")
        got: list[str] = []
        with trio.fail_after(20):
            while len(got) < 20000:
                got += await listen.wait()
        assert got == [f"q{n}" for n in range(1, 20001)]
        assert listen.pending() == []
    finally:
        listen.close()
