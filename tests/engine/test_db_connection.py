"""The trio-native connection (Database.fetch) the drainers take with: it keeps the
rules of the threaded pool: the same statement deadline (test_drainer.py), a statement
cut by the caller's cancel scope stopped on the server, a broken or interrupted
connection never reused, a statement's own error raised as is, and no more
connections than the pool's size however many tasks fetch at once.
"""

from __future__ import annotations

import errno
import gc
import os
import subprocess
import sys
import textwrap
import warnings
from typing import Any

import psycopg
import pytest
import trio

from reactor.engine.db import Database, DatabaseUnavailable, connect_sync
from reactor.testing import patience, settle_background_databases
from tests.harness import eventually, sql

BOTH_FLAVOURS = pytest.mark.parametrize("db_flavor", ["plain", "supabase"], indirect=True)


async def _count(url: str, query: str) -> int:
    [(value,)] = await sql(url, query)
    return int(value)


async def _eq(value: Any, expected: Any) -> bool:
    """For `eventually`: an awaited query's result equals `expected`."""
    return bool(await value == expected)


def _open_fds() -> int:
    settle_background_databases()  # (the clone/drop thread's connection is no leak)
    return len(os.listdir("/proc/self/fd"))


async def _reactor_backends(url: str) -> int:
    return await _count(url, "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                        "current_database() AND application_name = 'reactor'")


@BOTH_FLAVOURS
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


@BOTH_FLAVOURS
async def test_a_fetch_cut_by_the_callers_cancel_scope_is_stopped_and_leaks_nothing(
        database_url: str) -> None:
    """Shutdown (a cancel scope) interrupts a statement at once: cancelled on the server,
    the connection not reused, and the next call works. A sweep of deadlines from 0 to
    15 ms then cuts `fetch` while it connects (a worker thread abandoned), sends, or waits
    for the answer: every interrupted connection is closed (on the server too) by the
    code, not by the garbage collector; none is reused mid-statement; no descriptor stays
    open."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        async with Database(database_url, 2).opened() as db:
            with trio.move_on_after(0.3) as scope:
                await db.fetch(b"SELECT pg_sleep(30)")
            assert scope.cancelled_caught
            assert await db.fetch(b"SELECT 2") == [(2,)]

            async def cancelled_on_the_server() -> bool:
                return await sql(database_url, "SELECT pid FROM pg_stat_activity "
                                 "WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'") == []

            await eventually(cancelled_on_the_server, within_s=10, every_s=0.05)
            fds = _open_fds()
            cut = 0
            for step in range(300):
                with trio.move_on_after(step * 0.00005) as scope:
                    rows = await db.fetch(b"SELECT %(n)s::int, pg_sleep(0.002)", {"n": step})
                    assert rows == [(step, "")]  # never the answer of an earlier, cut statement
                cut += scope.cancelled_caught
            assert cut > 10
            assert await db.fetch(b"SELECT 2") == [(2,)]
            await eventually(lambda: _eq(_reactor_backends(database_url), 1), within_s=20)
            await eventually(lambda: _open_fds() <= fds, within_s=20)
        await eventually(lambda: _eq(_reactor_backends(database_url), 0), within_s=20)
        gc.collect()
    leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaked == []


@BOTH_FLAVOURS
async def test_a_statement_error_is_raised_as_is_and_the_connection_kept(
        database_url: str) -> None:
    async with Database(database_url, 2).opened() as db:
        [(pid,)] = await db.fetch(b"SELECT pg_backend_pid()")
        with pytest.raises(psycopg.errors.UndefinedTable):
            await db.fetch(b"SELECT * FROM no_such_table")
        assert await db.fetch(b"SELECT pg_backend_pid()") == [(pid,)]


async def test_many_tasks_fetching_at_once_share_at_most_pool_size_connections(
        database_url: str) -> None:
    """psycopg's asyncio.Lock of a connection would raise under trio if two tasks used one
    connection at once: 40 tasks on a pool of 3 never do, and use 3 connections."""
    pids: set[int] = set()
    async with Database(database_url, 3).opened() as db:
        async def many() -> None:
            for _ in range(5):
                [(pid, _slept)] = await db.fetch(b"SELECT pg_backend_pid(), pg_sleep(0.002)")
                pids.add(pid)

        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(many)
    assert 1 <= len(pids) <= 3


async def test_run_and_fetch_share_one_pool_of_sessions(database_url: str) -> None:
    """One pool (issue 26): a session that served `run` in a worker thread serves `fetch`
    on the trio thread next, and back; the pool never holds more than its size."""
    async with Database(database_url, 1).opened() as db:
        [(pid,)] = await db.fetch(b"SELECT pg_backend_pid()")
        assert await db.run(lambda c: c.execute("SELECT pg_backend_pid()").fetchone()) == (pid,)
        assert await db.fetch(b"SELECT pg_backend_pid()") == [(pid,)]
        assert await _reactor_backends(database_url) == 1


async def test_a_session_left_in_a_transaction_by_run_is_never_lent_again(
        database_url: str) -> None:
    """Review of the one pool: `run(fn)` is the apps' API, and an `fn` that leaves a
    transaction open (or autocommit off) must not hand it to the next caller: a fetch's
    write would run inside it, report success, and be rolled back unseen."""
    await sql(database_url, "CREATE TABLE public.review_t (x int)")

    def leave_open(conn: psycopg.Connection) -> None:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO public.review_t VALUES (1)")

    def autocommit_off(conn: psycopg.Connection) -> None:
        conn.autocommit = False

    async with Database(database_url, 1).opened() as db:
        await db.fetch(b"SELECT 1")  # the session has its trio face
        for careless in (leave_open, autocommit_off):
            await db.run(careless)
            await db.fetch(b"INSERT INTO public.review_t VALUES (2)")
            await db.run(lambda c: c.execute("INSERT INTO public.review_t VALUES (3)"))
    assert await sql(database_url, "SELECT x, count(*) FROM public.review_t GROUP BY x "
                                   "ORDER BY x") == [(2, 2), (3, 2)]


async def test_runs_cut_by_their_callers_leave_no_connection_beyond_the_pool(
        database_url: str) -> None:
    """Review of the one pool: a `run` cut by its caller's own scope (a job's timeout,
    shutdown), not the pool's deadline, had its statement left running in an abandoned
    thread, holding a connection outside DB_POOL_SIZE (12 backends for a pool of 2).
    Now the server is asked to stop it, whoever cut it."""
    await sql(database_url, "CREATE TABLE public.review_locked (x int)")
    with psycopg.connect(database_url, autocommit=True) as locker:
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE public.review_locked IN ACCESS EXCLUSIVE MODE")
        async with Database(database_url, 2).opened() as db:

            async def cut_by_its_caller() -> None:
                with trio.move_on_after(0.3):
                    await db.run(lambda c: c.execute("SELECT count(*) FROM "
                                                     "public.review_locked"))

            for _ in range(5):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cut_by_its_caller)
                    nursery.start_soon(cut_by_its_caller)
            # Each cut statement is cancelled on the server; its thread then closes it.
            await eventually(lambda: _waiting_on_the_lock(database_url), within_s=20)
        locker.execute("ROLLBACK")


async def _waiting_on_the_lock(url: str) -> bool:
    [(waiting,)] = await sql(url, "SELECT count(*) FROM pg_stat_activity WHERE "
                                  "application_name = 'reactor' AND wait_event_type = 'Lock'")
    return bool(waiting == 0)


def test_out_of_descriptors_a_connect_fails_as_a_database_error_to_wait_out(
        database_url: str) -> None:
    """A flood of clients can leave the process no descriptor for psycopg's own wait on
    a new connection (an OSError, not a psycopg.Error). The listener and the pools wait
    out database errors and reconnect; an OSError escaped them and ended `reactor run`
    (seen once the flood had cut every connection). Run in a child whose descriptors
    are used up for real."""
    child = textwrap.dedent("""
        import os, resource, sys
        import psycopg
        from reactor.engine.db import connect_sync
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        held = []
        try:
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        os.close(held.pop())  # one left: libpq's socket, none for psycopg's selector
        try:
            connect_sync(sys.argv[1])
        except psycopg.OperationalError as exc:
            print("OperationalError:", exc)
        """)
    done = subprocess.run([sys.executable, "-c", child, database_url], capture_output=True,
                          text=True, timeout=patience(30), check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OperationalError: cannot open a connection: Too many "
                                  "open files"), done.stdout
    assert "raise LimitNOFILE" in done.stdout


def test_a_connect_out_of_memory_is_not_blamed_on_descriptors(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Only EMFILE and ENFILE name LimitNOFILE: another OSError of psycopg's wait (ENOMEM,
    ENOSPC from the kernel's epoll limits) says what it is, as a database error still."""
    def refuse(*args: Any, **kwargs: Any) -> psycopg.Connection:
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
    monkeypatch.setattr(psycopg, "connect", refuse)
    with pytest.raises(psycopg.OperationalError) as info:
        connect_sync("postgresql://u@127.0.0.1/db")
    assert str(info.value) == "cannot open a connection: Cannot allocate memory"
    cause = info.value.__cause__
    assert isinstance(cause, OSError)
    assert cause.__traceback__ is None  # it held the half-open socket while callers back off
