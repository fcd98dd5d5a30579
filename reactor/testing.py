"""pytest plugin for testing an app built on reactor's engine (loaded by pytest
through the wheel's `pytest11` entry point; docs/engine.md, "Testing your worker").

Fixtures:
- `reactor_cluster` (session): a throwaway PostgreSQL 15+ cluster on 127.0.0.1 and
  a free port, with pg_cron preloaded when it is installed; started as the
  `postgres` OS user when the tests run as root (Postgres refuses root).
- `reactor_app_path` (session): the app under test as `module:factory`, from the
  `reactor_app` ini option (pytest.ini / pyproject's [tool.pytest.ini_options]);
  override the fixture to choose it in code.
- `reactor_database`: a database of the test's own, with pgmq and the engine's and
  the app's migrations applied (cloned from a template migrated once a session).
- `reactor_env`: the environment the app's settings are read from in this test
  (DATABASE_URL of `reactor_database`, ports 0); add your own with monkeypatch.
- `reactor_app`: the app, built by its factory from that environment.
- `running_reactor` (async, pytest-trio): the app running in the test's nursery,
  stopped gracefully after the test.

Helpers: `enqueue`, `sql`, `eventually`, `wait_until`, `wait_for_event`, `of_type`.
Every wait has a budget and fails with what it waited for; none sleeps a fixed time.
"""

from __future__ import annotations

import inspect
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# The engine (psycopg, trio, pydantic …) is imported by the fixtures and helpers when
# they are used, not when pytest loads the plugin: every pytest run in an environment
# where the wheel is installed loads it, most of them about something else.
if TYPE_CHECKING:
    import trio

    from reactor.engine.app import App
    from reactor.engine.events import Event, Subscription
    from reactor.engine.pgcluster import PgCluster
    from reactor.engine.runtime import Reactor

__all__ = ["enqueue", "eventually", "of_type", "sql", "start_on_a_free_port", "wait_for_event",
           "wait_until"]

TEMPLATE_PREFIX = "reactor_template_"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("reactor_app", "the app under test, as module:factory "
                  "(for reactor.testing's fixtures)", default="")


# -- clusters and databases -----------------------------------------------------------
def pg_cron_installed() -> bool:
    """pg_cron's library is installed for the server found (PG_BIN or the newest)."""
    from reactor.engine.pgcluster import PgClusterError, check_pg_cron, find_pg_bin

    try:
        check_pg_cron(find_pg_bin())
    except PgClusterError:
        return False
    return True


def start_on_a_free_port(cluster: PgCluster, tries: int = 5) -> PgCluster:
    """Start a cluster. Postgres cannot be handed a bound socket, so its port is chosen
    first and bound by postgres later: if another process took it meanwhile, choose
    again (the start failure says "Address already in use")."""
    from reactor.engine.pgcluster import PgClusterError, free_port

    for attempt in range(tries):
        try:
            cluster.start()
            return cluster
        except PgClusterError as exc:
            if "Address already in use" not in str(exc) or attempt == tries - 1:
                raise
            cluster.port = free_port()
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def reactor_cluster() -> Iterator[PgCluster]:
    """A throwaway cluster for the session (fsync off: nothing here must survive)."""
    from reactor.engine.pgcluster import PgCluster, free_port

    cluster = PgCluster(Path(tempfile.mkdtemp(prefix="reactor-test-pg-")), free_port(),
                        pg_cron=pg_cron_installed())
    try:
        cluster.init()
        start_on_a_free_port(cluster)
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(scope="session")
def reactor_app_path(pytestconfig: pytest.Config) -> str:
    path = str(pytestconfig.getini("reactor_app") or "")
    if not path:
        raise pytest.UsageError("reactor.testing: name the app under test: reactor_app = "
                                "mypkg.worker:build in [tool.pytest.ini_options], or "
                                "override the reactor_app_path fixture")
    return path


class _Templates:
    """One migrated template database per app (module:factory) in a session."""

    def __init__(self, cluster: PgCluster) -> None:
        self.cluster = cluster
        self.names: dict[str, str] = {}

    def for_app(self, path: str) -> str:
        if path not in self.names:
            from reactor.engine.app import load_app
            from reactor.engine.migrate import migrate

            name = TEMPLATE_PREFIX + uuid.uuid4().hex[:8]
            app = load_app(path)  # its settings are not needed to migrate
            migrate(self.cluster.create_database(name), app.migrations,
                    pg_cron=app.pg_cron)
            self.names[path] = name
        return self.names[path]


@pytest.fixture(scope="session")
def reactor_templates(reactor_cluster: PgCluster) -> _Templates:
    return _Templates(reactor_cluster)


@pytest.fixture
def reactor_database(reactor_cluster: PgCluster, reactor_templates: _Templates,
                     reactor_app_path: str) -> Iterator[str]:
    """The URL of a migrated database of this test's own (CREATE DATABASE … TEMPLATE:
    isolated, and fast)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    url = reactor_cluster.create_database(
        name, template=reactor_templates.for_app(reactor_app_path))
    try:
        yield url
    finally:
        reactor_cluster.drop_database(name)


@pytest.fixture
def reactor_env(reactor_database: str, monkeypatch: pytest.MonkeyPatch,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment the app's settings come from in this test."""
    env = {"DATABASE_URL": reactor_database, "FEED_PORT": "0", "METRICS_PORT": "0",
           "FEED_HOST": "127.0.0.1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # An empty working directory for the test (no stray .env is read); pytest keeps and
    # cleans its temp folders as for tmp_path.
    monkeypatch.chdir(tmp_path_factory.mktemp("reactor-cwd"))
    return env


@pytest.fixture
def reactor_app(reactor_env: dict[str, str], reactor_app_path: str) -> App:
    """The app under test, its settings read from `reactor_env`."""
    from reactor.engine.app import load_app

    app = load_app(reactor_app_path)
    app.settings  # noqa: B018 - read now, while the test's environment is set
    return app


@pytest.fixture
async def running_reactor(reactor_app: App, nursery: trio.Nursery) -> AsyncIterator[Reactor]:
    """The app running in the test's nursery (started: LISTENing, every queue drained
    once); stopped gracefully after the test. For trio tests (pytest-trio: `trio_mode =
    true`, or `@pytest.mark.trio`)."""
    from reactor.engine.runtime import Reactor

    reactor = Reactor(reactor_app)
    await nursery.start(partial(reactor.run, handle_signals=False))
    try:
        yield reactor
    finally:
        reactor.stop()


# -- helpers ---------------------------------------------------------------------------
async def sql(url: str, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement in a worker thread (so a reactor in the test keeps running)."""
    import psycopg
    import trio

    def run() -> list[tuple[Any, ...]]:
        with psycopg.connect(url, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []
    return await trio.to_thread.run_sync(run)


async def enqueue(url: str, queue: str, body: Any, *, delay_s: int = 0,
                  notify: bool = True) -> int:
    """Queue a message as an app does (public.enqueue: send + NOTIFY at commit), or with
    pgmq.send alone (`notify=False`: no wake-up, the poll must find it)."""
    from psycopg.types.json import Jsonb

    if notify:
        [(msg_id,)] = await sql(url, "SELECT public.enqueue(%s, %s, %s)",
                                (queue, Jsonb(body), delay_s))
    else:
        [(msg_id,)] = await sql(url, "SELECT pgmq.send(%s, %s, %s)",
                                (queue, Jsonb(body), delay_s))
    return int(msg_id)


async def eventually(condition: Callable[[], Any], within_s: float = 30,
                     every_s: float = 0.02) -> Any:
    """Poll `condition` (a coroutine function is awaited) until it is truthy; return it.
    Fails (trio.TooSlowError) after `within_s`."""
    import trio

    async def check() -> Any:
        result = condition()
        return await result if inspect.isawaitable(result) else result

    with trio.fail_after(within_s):
        while not (result := await check()):  # noqa: ASYNC110 - polling outside state
            await trio.sleep(every_s)
    return result


def wait_until(condition: Callable[[], Any], within_s: float = 30, what: str = "",
               every_s: float = 0.05) -> Any:
    """Poll `condition` until it is truthy (sync tests); fail naming `what` after `within_s`."""
    deadline = time.monotonic() + within_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what or condition}")
        time.sleep(every_s)
    return result


def of_type(type_: str, msg_id: int | None = None) -> Callable[[Event], bool]:
    """An event predicate: this type (and message)."""
    return lambda e: e["type"] == type_ and (msg_id is None or e["msg_id"] == msg_id)


async def wait_for_event(sub: Subscription, predicate: Callable[[Event], bool],
                         count: int = 1, within_s: float = 30.0) -> list[Event]:
    """Collect `count` events matching `predicate` from a subscription
    (`with reactor.bus.subscribe() as sub:`, opened before the cause); fail after
    `within_s`."""
    import trio

    found: list[Event] = []
    with trio.fail_after(within_s):
        async for event in sub.receive:
            if predicate(event):
                found.append(event)
                if len(found) >= count:
                    return found
    raise AssertionError(f"subscription ended: {sub.dropped}")

