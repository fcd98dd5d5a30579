"""The LISTEN connection: a dedicated sync connection that trio waits on.

Its socket is awaited with `trio.lowlevel.wait_readable(fileno)` and the
notifications that arrived are read from libpq without blocking, so listening
takes no worker thread.
"""

from __future__ import annotations

from typing import LiteralString

import psycopg
import trio

from reactor.engine import queries
from reactor.engine.db.connection import connect_sync
from reactor.engine.db.errors import DatabaseUnavailable, describe_db_error, reason_of

__all__ = ["ListenConnection"]


class ListenConnection:
    """A dedicated autocommit connection that LISTENs and yields notifications."""

    def __init__(self, conn: psycopg.Connection, url: str) -> None:
        self.conn = conn
        self.url = url
        self.encoding = conn.info.encoding

    @classmethod
    async def open(cls, url: str, channel_sql: LiteralString = queries.LISTEN) -> ListenConnection:
        def _open() -> psycopg.Connection:
            conn = connect_sync(url, "reactor listener")
            try:
                conn.execute(channel_sql)
            except BaseException:
                conn.close()
                raise
            return conn

        try:
            return cls(await trio.to_thread.run_sync(_open), url)
        except psycopg.Error as exc:
            raise DatabaseUnavailable(describe_db_error(exc, url),
                                      reason_of(exc) or "database_error") from exc

    async def wait(self) -> list[str]:
        """Wait until the socket is readable; return the payloads that arrived.

        Raises:
            DatabaseUnavailable: the server closed the connection or it broke.
        """
        await trio.lowlevel.wait_readable(self.conn.fileno())
        return self.pending()

    def pending(self) -> list[str]:
        """Payloads already received, without blocking.

        Read from libpq directly: psycopg's `notifies(timeout=0)` polls the socket
        twice and ends on a timeout exception, a tenth of a millisecond of every
        wake-up. Nothing runs on this connection but LISTEN (at open, and the
        listener wakes every drainer after it), so psycopg holds no backlog of
        notifications that this would miss.
        """
        pgconn = self.conn.pgconn
        try:
            pgconn.consume_input()
        except psycopg.Error as exc:
            raise DatabaseUnavailable(describe_db_error(exc, self.url),
                                      reason_of(exc) or "database_error") from exc
        payloads = []
        while (notify := pgconn.notifies()) is not None:
            payloads.append(notify.extra.decode(self.encoding, "replace"))
        return payloads

    def close(self) -> None:
        self.conn.close()
