"""The listener's connection (ListenConnection): what it reads straight from libpq.

Every payload of a transaction, in order, non-ASCII intact; a flood of them over many
reads of the socket; a payload its session's encoding cannot carry; and a connection
killed on the server is an error, never silence. How a running reactor's listener
reconnects and probes is in test_resilience.py.
"""

from __future__ import annotations

import pytest
import trio

from reactor.engine.db import DatabaseUnavailable, ListenConnection
from reactor.testing import patience
from tests.harness import PLAIN, alter_database, sql


async def test_the_listen_connection_reads_every_notification_and_notices_its_end(
        database_url: str) -> None:
    """What the listener reads straight from libpq: every payload of a transaction, in order,
    (Postgres folds only duplicates), non-ASCII intact; several transactions' worth read
    at once; and a connection killed on the server is DatabaseUnavailable, not silence."""
    listen = await ListenConnection.open(database_url)
    try:
        await sql(database_url, "SELECT pg_notify('reactor_wakeup', p) "
                                "FROM unnest(ARRAY['a', 'ä🙂', 'a', 'b']) AS p")
        with trio.fail_after(patience(10)):
            assert await listen.wait() == ["a", "ä🙂", "b"]
        for payload in ("c", "d"):
            await sql(database_url, "SELECT pg_notify('reactor_wakeup', %s)", (payload,))
        await trio.sleep(0.2)
        with trio.fail_after(patience(10)):
            got = await listen.wait()
            while len(got) < 2:
                got += await listen.wait()
        assert got == ["c", "d"]
        assert listen.pending() == []  # nothing more, and no waiting for it
        await sql(database_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE application_name = 'reactor listener'")
        with trio.fail_after(patience(10)), pytest.raises(DatabaseUnavailable):
            await _wait_until_it_fails(listen)
    finally:
        listen.close()


async def _wait_until_it_fails(listen: ListenConnection) -> None:
    while True:
        await listen.wait()


async def test_the_listener_reads_a_flood_of_distinct_notifications_in_order(
        database_url: str) -> None:
    """20,000 distinct payloads in one transaction (Postgres folds only duplicates): all
    read, in order, over several reads (libpq reads what the socket has), none twice."""
    listen = await ListenConnection.open(database_url)
    try:
        await sql(database_url, "SELECT pg_notify('reactor_wakeup', 'q' || n) "
                                "FROM generate_series(1, 20000) AS n")
        got: list[str] = []
        with trio.fail_after(patience(20)):
            while len(got) < 20000:
                got += await listen.wait()
        assert got == [f"q{n}" for n in range(1, 20001)]
        assert listen.pending() == []
    finally:
        listen.close()


async def test_a_notification_the_listener_encoding_cannot_carry_does_not_cut_it(
        database_url: str) -> None:
    """Any role may NOTIFY on reactor_wakeup. With `client_encoding = 'LATIN1'` set for new
    sessions, a payload in Russian cannot be converted for the listener's session: the
    server closes the listener's connection (reproduced: DatabaseUnavailable "server
    closed the connection unexpectedly"; the reactor reports listener_down and
    reconnects, losing what was sent meanwhile, and a hostile client can repeat it at
    will). Wanted: the listener reads it and the next notification."""
    await alter_database(database_url, "SET client_encoding = 'LATIN1'")
    listen = await ListenConnection.open(database_url)
    try:
        for payload in ("é", "Привет", "after"):
            await sql(database_url + PLAIN, "SELECT pg_notify('reactor_wakeup', %s)",
                      (payload,))
        got: list[str] = []
        with trio.fail_after(patience(10)):
            while len(got) < 3:
                got += await listen.wait()
        assert got == ["é", "Привет", "after"]
    finally:
        listen.close()
