"""Database errors as the reactor's callers see them, with no secret in their text.

A condition of the database (unreachable, read-only, a pooler's prepared-statement
mix-up) is told apart here from a fault of the statement, once, so that the pools
and the listener wait out the same things (`DatabaseUnavailable`, `reason_of`).
Error text never carries the password of DATABASE_URL (`describe_db_error`,
`scrub`): libpq quotes parts of the connection string in some errors.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import psycopg
from psycopg import errors as pgerrors

__all__ = ["DatabaseUnavailable", "describe_db_error", "reason_of", "scrub"]

# Errors that mean "a pooler shuffled prepared statements between server connections"
# (ours are off; another client's, or a pooler's own, can still show up).
_PREPARED_STATEMENT_ERRORS = (pgerrors.InvalidSqlStatementName, pgerrors.DuplicatePreparedStatement)


class DatabaseUnavailable(Exception):
    """The database cannot do what we ask right now; retried by the caller.

    `reason` is a health reason class (reactor.engine.health): database_unreachable,
    database_read_only or database_error.
    """

    def __init__(self, message: str, reason: str = "database_unreachable") -> None:
        super().__init__(message)
        self.reason = reason


def reason_of(exc: psycopg.Error) -> str | None:
    """The health reason class of a database error the caller should wait out, else None.

    Unreachable, read-only (a standby after failover, or default_transaction_read_only),
    and a pooler's prepared-statement mix-ups are conditions of the database, not of
    the statement: waiting (with backoff) is the cure.
    """
    if isinstance(exc, pgerrors.ReadOnlySqlTransaction):
        return "database_read_only"
    if isinstance(exc, psycopg.OperationalError):
        return "database_unreachable"
    if isinstance(exc, _PREPARED_STATEMENT_ERRORS):
        return "database_error"
    return None


def _stuck_read_only(exc: BaseException) -> bool:
    """A session that refused a write as read-only stays so: `default_transaction_read_only`
    set for its database or role (ALTER DATABASE ... SET) binds a session for life. It
    is closed, and the idle ones with it (opened in the same spell, most likely), so that
    the next statements see the database as it is by then."""
    return isinstance(exc, pgerrors.ReadOnlySqlTransaction)


def describe_db_error(exc: BaseException, url: str | None = None) -> str:
    """One line for a database error, with the URL's password scrubbed out.

    libpq quotes parts of the connection string in some errors (a `%` in the
    password that is not valid percent-encoding makes it quote the password).
    """
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, pgerrors.ReadOnlySqlTransaction):
        text = f"the database is read-only (a standby after failover, or in recovery?): {text}"
    return scrub(text, url)


def scrub(text: str, url: str | None) -> str:
    """Remove the password of `url` (raw and decoded) from `text`."""
    if not url:
        return text
    try:
        raw = urlsplit(url).password
    except ValueError:
        raw = None
    if raw is None and "://" in url and "@" in url:
        # urlsplit could not parse it: take what lies between the first ':' after the
        # scheme and the last '@' as the password.
        userinfo = url.split("://", 1)[1].rsplit("@", 1)[0]
        raw = userinfo.split(":", 1)[1] if ":" in userinfo else None
    for secret in {raw, unquote(raw) if raw else None} - {None, ""}:
        assert secret is not None
        text = text.replace(secret, "***")
    return text
