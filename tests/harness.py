"""Running a reactor inside a test, and the scripted processor the tests drive.

The waits and the queue/SQL helpers are reactor.testing's (the pytest plugin the
wheel ships, which the project's own tests use): re-exported here under the names
the tests have always used (`send` is `enqueue`, `wait_for` is `wait_for_event`).

The one way to start `reactor run` in a test: in-process `running_reactor` (async
tests), or the `reactor_process` subprocess (signals, exit codes, log lines). The one
way to wait: `eventually` (async) / `wait_until` (sync tests) poll a condition with a
generous budget; `wait_for` waits on events; `read_line` is a pipe read with a timeout.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any, ClassVar, TypeVar
from urllib.parse import urlsplit

import httpx
import psycopg
import trio
from psycopg import sql as pgsql

from reactor.clinic.app import build
from reactor.clinic.settings import Settings, load_settings
from reactor.engine import queries
from reactor.engine.db import Database
from reactor.engine.events import EventBus
from reactor.engine.health import Health
from reactor.engine.migrate import _ensure_pgmq as ensure_pgmq
from reactor.engine.migrate import load_migrations
from reactor.engine.processor import Context, Job, MessageModel, PermanentError, Processor
from reactor.engine.runtime import Reactor
from reactor.testing import enqueue, wait_for_event
from reactor.testing import eventually as eventually
from reactor.testing import of_type as of_type
from reactor.testing import patience as patience
from reactor.testing import sql as sql
from reactor.testing import wait_until as wait_until
from tests import warm_start

wait_for = wait_for_event


async def send(url: str, queue: str, body: Any, *, notify: bool = True) -> int:
    """Enqueue like the app does (public.enqueue), or with pgmq.send alone (no NOTIFY)."""
    return await enqueue(url, queue, body, notify=notify)

# The checkout the tests run from (its docs/, deploy/, test-artifacts/).
CHECKOUT = Path(__file__).resolve().parents[1]

T = TypeVar("T")


class ScriptedMessage(MessageModel):
    """The message says how its handler behaves."""

    fail_times: int = 0          # raise a transient error on the first N deliveries
    permanent: bool = False      # raise PermanentError
    sleep_s: float = 0.0         # take this long
    hang_first: bool = False     # hang forever on the first delivery (job timeout)


class ScriptedProcessor(Processor[ScriptedMessage]):
    """Does what each message says; records every delivery it sees."""

    queue = "analytics_queue"
    model = ScriptedMessage
    seen: ClassVar[list[tuple[int, int]]]         # (msg_id, attempt) of every delivery
    finished: ClassVar[list[int]]                 # msg_ids whose handler returned
    per_instance: ClassVar[dict[int, int]]        # id(processor) → jobs: one per replica
    all_done: ClassVar[trio.Event]
    expected: ClassVar[int] = 0

    async def handle(self, job: Job[ScriptedMessage]) -> None:
        cls = type(self)
        msg = job.message
        cls.seen.append((job.msg_id, job.delivery.attempt))
        cls.per_instance[id(self)] = cls.per_instance.get(id(self), 0) + 1
        if msg.permanent:
            raise PermanentError("scripted permanent failure")
        if job.delivery.attempt <= msg.fail_times:
            raise RuntimeError(f"scripted failure {job.delivery.attempt}")
        if msg.hang_first and job.delivery.attempt == 1:
            await trio.sleep_forever()
        if msg.sleep_s:
            await trio.sleep(msg.sleep_s)
        cls.finished.append(job.msg_id)
        if len(cls.finished) == cls.expected:
            cls.all_done.set()


def scripted_processor(*, timeout_s: float = 30.0, concurrency: int = 50,
                       expected: int = 0) -> type[ScriptedProcessor]:
    """A fresh subclass (its own records); `all_done` is set after `expected` successes."""
    return type("Scripted", (ScriptedProcessor,), {
        "timeout_s": timeout_s, "concurrency": concurrency, "seen": [], "finished": [],
        "per_instance": {}, "all_done": trio.Event(), "expected": expected,
    })


def settings_for(url: str, **env: Any) -> Settings:
    values: dict[str, Any] = {"DATABASE_URL": url, "WORKER_INTERVAL_MS": 60_000,
                              "RETRY_BASE_S": 1, "LOG_LEVEL": "warning", "LOG_FORMAT": "json",
                              "EMAIL_PROVIDER": "file", "FEED_PORT": 0, "METRICS_PORT": 0,
                              "EMAIL_OUTBOX_DIR": tempfile.mkdtemp(prefix="reactor-outbox-")}
    values.update(env)
    return load_settings(_env_file=None, **values)


def processor_context(queue: str, db: Database, settings: Any) -> Context:
    """What the reactor gives a processor, for a test that drives one by hand."""
    return Context(queue=queue, db=db, bus=EventBus(), health=Health(), settings=settings)


def migrate_like_the_last_release(url: str, directory: Path) -> None:
    """What `reactor migrate` did before the engine had a line of its own (release
    f6fa557): pgmq, then each file of `directory` once, locked down and recorded, one
    transaction each; no engine line, no repeatable files."""
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.transaction():
            conn.execute(queries.CREATE_MIGRATIONS_TABLE)
        ensure_pgmq(conn)
        for migration in load_migrations(directory):
            with conn.transaction():
                conn.execute(queries.SNAPSHOT_OBJECTS)
                conn.execute(migration.sql.encode())
                conn.execute(queries.LOCK_DOWN_NEW_OBJECTS)
                conn.execute(queries.RECORD_MIGRATION, (migration.version, migration.name,
                                                        [migration.sql], migration.checksum))


@asynccontextmanager
async def running_reactor(url: str, processors: Mapping[str, type[Processor[Any]]] | None = None,
                          **env: Any) -> AsyncIterator[Reactor]:
    """A reactor in the test's nursery; stopped (gracefully) on exit."""
    reactor = Reactor(build(settings_for(url, **env)), processors=processors)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(reactor.run, handle_signals=False))
        try:
            yield reactor
        finally:
            reactor.stop()


async def in_db(url: str, fn: Callable[[psycopg.Connection], T]) -> T:
    """`fn(conn)` on an autocommit connection, in a worker thread (e.g. tests/factories
    from an async test, so the reactor keeps running)."""
    def run() -> T:
        with psycopg.connect(url, autocommit=True) as conn:
            return fn(conn)
    return await trio.to_thread.run_sync(run)


def database_name(url: str) -> str:
    """The database a URL names."""
    return urlsplit(url).path.lstrip("/")


# What a test's own connections add to a URL to stay writable and UTF-8 whatever defaults
# `alter_database` gave the database's new sessions.
PLAIN = "?options=-c%20default_transaction_read_only%3Doff&client_encoding=UTF8"


async def alter_database(url: str, setting: str) -> None:
    """ALTER DATABASE <the database of url> <setting>: new sessions get it."""
    await sql(url + PLAIN, pgsql.SQL("ALTER DATABASE {} " + setting).format(
        pgsql.Identifier(database_name(url))))


@contextmanager
def listener_held_down(reactor: Reactor) -> Iterator[None]:
    """Hold the listener down: while inside, its reconnects go to an address that refuses
    them (a bound socket nobody listens on); on exit it reconnects to the database.
    Kill its current connection (pg_terminate_backend) to bring it down."""
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url, port = reactor.listener.url, closed.getsockname()[1]
        reactor.listener.url = psycopg.conninfo.make_conninfo(url, host="127.0.0.1", port=port)
        try:
            yield
        finally:
            reactor.listener.url = url


def read_line(stream: IO[Any], within_s: float = 30) -> str:
    """One line from a child's pipe, or AssertionError after `within_s` (never blocks
    for ever). Reads byte by byte from the descriptor, so nothing past the line is taken
    into a buffer that the next call would not see."""
    fd = stream.fileno()
    line = b""
    budget = patience(within_s)
    deadline = time.monotonic() + budget
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no complete line within {budget:g}s (got {line!r})")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 1)
            if not chunk:
                raise AssertionError(f"the stream closed before a line ended (got {line!r})")
            line += chunk
    return line.decode()


def scalar(url: str, query: str) -> int:
    """The one number of a one-row, one-column query, e.g. a count (sync tests)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query.encode()).fetchone()
    assert row is not None
    return int(row[0])


def log_lines(log: Path) -> list[dict[str, Any]]:
    """The JSON lines of a `reactor_process` log."""
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


# A child process of a test: started for real, or forked from the warm interpreter.
Process = subprocess.Popen[bytes] | warm_start.WarmProcess


@contextmanager
def reactor_process(url: str, log: Path, *args: str, python_c: str = "", **env: str
                    ) -> Iterator[Process]:
    """`python -m reactor run` (or `reactor ARGS`, or `python -c PYTHON_C` that runs it its
    own way), JSON logs to `log`, its ports chosen by the kernel (FEED_PORT=0,
    METRICS_PORT=0: see `ports`); killed if the test forgets it. A fork of the warm
    interpreter where it can be (tests/warm_start.py)."""
    environ = {"PATH": os.environ["PATH"], "DATABASE_URL": url, "LOG_FORMAT": "json",
               "LOG_LEVEL": "info", "WORKER_INTERVAL_MS": "60000", "EMAIL_PROVIDER": "file",
               "EMAIL_OUTBOX_DIR": str(log.parent / "outbox"), "FEED_PORT": "0",
               "METRICS_PORT": "0", "RETRY_BASE_S": "1", **env}
    proc: Process | None = None
    log.open("ab").close()  # there at once, as for a real start (the tests read it)
    if not python_c:
        proc = warm_start.WARM.start(args or ("run",), environ, str(log.parent), str(log),
                                     str(log), append=True)
    if proc is None:
        with log.open("ab") as out:
            argv = ["-c", python_c] if python_c else ["-m", "reactor", *(args or ("run",))]
            proc = subprocess.Popen([sys.executable, *argv], env=environ, stdout=out,
                                    stderr=out, cwd=log.parent)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def reactor_command(*args: str, cwd: Path | None = None, timeout_s: float = 60,
                    env: Mapping[str, str] | None = None,
                    **more_env: str) -> subprocess.CompletedProcess[str]:
    """A `reactor ...` command that ends by itself (e.g. `run` refusing bad settings,
    `dlq replay`), with only PATH and `env`/`more_env` in its environment; output captured.
    A fork of the test process's warm interpreter where it can be (tests/warm_start.py)."""
    environ = {"PATH": os.environ["PATH"], **(env or {}), **more_env}
    where = os.fspath(cwd or tempfile.gettempdir())
    done = warm_start.WARM.run(args, environ, where, patience(timeout_s))
    if done is not None:
        return done
    return subprocess.run([sys.executable, "-m", "reactor", *args], capture_output=True,
                          text=True, env=environ, cwd=where, check=False,
                          timeout=patience(timeout_s))


@dataclass(frozen=True)
class Ports:
    feed: int
    http: int


def ports(proc: Process, log: Path, within_s: float = 30) -> Ports:
    """The ports a `reactor_process` bound (its `reactor.listening` line): it is then
    started, and its drainers are running."""
    def listening() -> dict[str, Any] | None:
        assert proc.poll() is None, f"reactor run exited early:\n{log.read_text()}"
        return next((e for e in log_lines(log) if e.get("event") == "reactor.listening"), None)
    line = wait_until(listening, within_s, "reactor.listening in the log")
    return Ports(int(line["feed_port"]), int(line["http_port"]))


def wait_healthy(port: int, proc: Process, log: Path,
                 within_s: float = 30) -> None:
    """Block until a `reactor run` process answers /healthz with 200 (sync tests)."""
    def healthy() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False
    wait_until(healthy, within_s, f"/healthz on port {port}")


async def post_raw(port: int, path: str, headers: str, parts: list[bytes],
                    gap_s: float = 0.0) -> str:
    """POST over a raw socket (the body in `parts`, `gap_s` apart, as a client that
    trickles or floods would send it); the response's status line. A server that has
    answered and closed may refuse the rest of the body: that is the point."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                              f"{headers}\r\n".encode())

        async def send_body() -> None:
            for part in parts:
                try:
                    await stream.send_all(part)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                await trio.sleep(gap_s)

        answer = b""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_body)
            while b"\r\n" not in answer:
                chunk = await stream.receive_some()
                if not chunk:
                    break
                answer += chunk
            nursery.cancel_scope.cancel()
    return answer.split(b"\r\n", 1)[0].decode()

