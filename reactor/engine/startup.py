"""Fail fast at start on what waiting cannot fix; wait, saying what for, on what it can.

Before `reactor run` starts anything it opens one probe connection:
- a rejected password, a missing database or role, an unknown host, a
  malformed DATABASE_URL: no amount of retrying helps, so the process stops
  with one line naming the part of DATABASE_URL that is wrong (exit 2);
- a refused or timed-out connection, a server still starting up or out of
  connection slots: the database may still be starting (compose, a reboot),
  so it is retried with backoff, and each retry logs what it waits for.

After the first successful connection every loss is retried (core.listener,
core.drainer): a database that was right once is worth waiting for.

libpq reports connection failures without an SQLSTATE that psycopg exposes,
so they are told apart by libpq's and the server's (English) wording; any
failure not recognised here is treated as one that waiting may cure. No line
built here contains the password: user, host and database names only, and
everything quoted from an error passes through the URL scrubber.
"""

from __future__ import annotations

import re
import resource
from dataclasses import dataclass
from urllib.parse import unquote

import psycopg
import structlog
import trio
from psycopg.conninfo import conninfo_to_dict

from reactor.engine.db import connect_sync, describe_db_error, in_worker_thread

__all__ = ["DatabaseRefused", "Target", "raise_open_files_limit", "refusal", "target_of",
           "url_problem", "wait_for_database", "waiting_reason"]

log = structlog.get_logger("reactor.engine.startup")

# Above this many open files, raising the soft limit further buys nothing (Linux's
# default nr_open is 1,048,576; an unlimited hard limit is refused above it).
OPEN_FILES_CEILING = 1 << 20

FIRST_RETRY_S = 1.0
MAX_RETRY_S = 10.0

_URL_FORM = "postgresql://USER:PASSWORD@HOST:PORT/DATABASE"


class DatabaseRefused(Exception):
    """DATABASE_URL names something the database (or DNS) refuses; `str()` is the one
    line to show, naming the part to fix. Waiting cannot help: `reactor run` exits 2."""


@dataclass(frozen=True)
class Target:
    """Where DATABASE_URL points, without its password: safe to log."""

    host: str
    port: str
    dbname: str
    user: str

    def __str__(self) -> str:
        return f"{self.host}:{self.port}/{self.dbname}"


def target_of(url: str) -> Target:
    """Host, port, database and user of a URL or key=value DSN, with libpq's defaults."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.Error:
        return Target("?", "?", "?", "?")
    user = str(parts.get("user") or "?")
    return Target(str(parts.get("host") or "localhost"), str(parts.get("port") or "5432"),
                  str(parts.get("dbname") or user), user)


_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def url_problem(url: str) -> str | None:
    """Why a postgresql:// URL cannot be used as written, or None; never quotes a secret.

    libpq would quote a bad percent-encoding (typically the whole password) in
    its error, and a host name that is not one fails in Python's IDNA codec
    with a traceback, in every command.
    """
    if not url.startswith(("postgresql://", "postgres://")):
        return None
    rest = url.split("://", 1)[1]
    userinfo, _, location = rest.rpartition("@")
    user, _, password = userinfo.partition(":")
    for name, value in (("user name", user), ("password", password),
                        ("host, port or database", location)):
        if _PERCENT.search(value):
            return (f"the {name} in DATABASE_URL has a '%' that does not start a "
                    "percent-encoding (%XX): "
                    "write a literal % as %25 (and @ as %40, : as %3A, / as %2F)")
    netloc = re.split(r"[/?]", location, maxsplit=1)[0]
    for entry in netloc.split(","):  # libpq accepts host1:port1,host2:port2
        host = entry if entry.startswith("[") else entry.rsplit(":", 1)[0]
        if host and not host.startswith("["):
            try:
                unquote(host).encode("idna")
            except UnicodeError:
                return (f'the host "{unquote(host)}" in DATABASE_URL is not a valid host '
                        f"name: fix HOST in {_URL_FORM}")
    return None


def _hopeless(text: str, target: Target) -> str | None:
    """The one line for a failure that waiting cannot fix, or None."""
    if m := re.search(r'password authentication failed for user "([^"]*)"', text):
        return (f'the database at {target.host}:{target.port} rejected the password of user '
                f'"{m[1]}": check USER and PASSWORD in DATABASE_URL ({_URL_FORM}; '
                "percent-encode special characters)")
    if "no password supplied" in text:
        return (f"the database at {target.host}:{target.port} asks for a password and "
                f"DATABASE_URL has none: add it ({_URL_FORM})")
    if m := re.search(r'role "([^"]*)" does not exist', text):
        return (f'the user "{m[1]}" in DATABASE_URL does not exist on {target.host}:'
                f"{target.port}: fix USER in {_URL_FORM}")
    if m := re.search(r'database "([^"]*)" does not exist', text):
        return (f'the database "{m[1]}" in DATABASE_URL does not exist on {target.host}:'
                f"{target.port}: fix DATABASE at the end of {_URL_FORM}, or create it")
    host = re.search(r"(?:failed to resolve host '([^']*)'|could not translate host name "
                     r'"([^"]*)")', text)
    if host and "emporary failure" not in text:  # EAI_AGAIN: DNS itself is down; wait
        return (f'the host "{host[1] or host[2]}" in DATABASE_URL is unknown (it does not '
                f"resolve): fix HOST in {_URL_FORM}")
    if "no pg_hba.conf entry" in text:
        return (f"the database at {target.host}:{target.port} does not accept user "
                f'"{target.user}" from this machine to database "{target.dbname}" '
                "(no pg_hba.conf entry): allow it in pg_hba.conf, or add ?sslmode=require "
                "to DATABASE_URL if the server only accepts SSL")
    if "server does not support SSL" in text:
        return (f"the database at {target.host}:{target.port} does not support SSL: remove "
                "sslmode=require (or verify-*) from DATABASE_URL")
    return None


def refusal(exc: Exception, url: str) -> str | None:
    """The one line (no password) if `exc`, raised while connecting, cannot be waited out."""
    text = str(exc)
    if isinstance(exc, UnicodeError):  # psycopg resolving a host name that is not one
        return (f'the host "{target_of(url).host}" in DATABASE_URL is not a valid host name '
                f"({text}): fix HOST in {_URL_FORM}")
    if isinstance(exc, psycopg.ProgrammingError) or text.startswith("connection is bad: "):
        # libpq rejected DATABASE_URL itself before any network traffic.
        if problem := url_problem(url):
            return problem
        if "percent-encoded" in text:
            return ("invalid DATABASE_URL: a '%' that does not start a percent-encoding "
                    "(%XX): write a literal % as %25")
        detail = describe_db_error(exc, url).removeprefix("connection is bad: ")
        return f"invalid DATABASE_URL: {detail} (see {_URL_FORM})"
    return _hopeless(text, target_of(url))


def waiting_reason(exc: BaseException, url: str) -> str:
    """What the database did, in a few words a person waiting understands."""
    text = str(exc)
    if "Connection refused" in text:
        return "connection refused: Postgres is not listening there yet"
    if "timeout expired" in text:
        return "no answer within the connect timeout"
    if "starting up" in text:
        return "the database system is starting up"
    if "shutting down" in text:
        return "the database system is shutting down"
    if ("too many" in text and "clients" in text) or "remaining connection slots" in text:
        return "the database has no free connection slots"
    if "emporary failure in name resolution" in text:
        return "the host name cannot be resolved right now (DNS)"
    return describe_db_error(exc, url)


def _probe(url: str) -> None:
    # In a worker thread: connect and close at once, so an abandoned probe leaks nothing.
    connect_sync(url, "reactor start").close()


async def wait_for_database(url: str) -> None:
    """Return once the database accepts a connection.

    Raises:
        DatabaseRefused: the failure is one that waiting cannot fix.
    """
    target = target_of(url)
    delay = FIRST_RETRY_S
    while True:
        try:
            await in_worker_thread(_probe, url, abandon_on_cancel=True)
            return
        except (psycopg.Error, UnicodeError) as exc:
            line = refusal(exc, url)
            if line is not None:
                raise DatabaseRefused(line) from None
            log.warning("database unreachable; waiting for it to accept connections",
                        database=str(target), reason=waiting_reason(exc, url),
                        retry_in_s=delay)
        await trio.sleep(delay)
        delay = min(delay * 2, MAX_RETRY_S)


def raise_open_files_limit() -> int:
    """Raise the soft limit of open files to the hard one (as Go's runtime does); the
    soft limit after.

    systemd starts a service with 1,024 (and a hard limit of 524,288): every
    connection to the HTTP port (payment webhooks put it on the internet), the
    feed, Postgres and SMTP takes one, so about a thousand idle connections held
    open against the HTTP port would leave the reactor unable to reconnect to its
    database. The hard limit stays the operator's (LimitNOFILE=, ulimit -Hn)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = OPEN_FILES_CEILING if hard == resource.RLIM_INFINITY else min(
        hard, OPEN_FILES_CEILING)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # a sandbox that forbids it: keep what we have
            log.warning("could not raise the open files limit", soft=soft, hard=hard,
                        error=str(exc), fix="set LimitNOFILE= in the systemd unit, or "
                        "--ulimit nofile= for a container")
    return soft

