"""pytest plugin for testing an app built on reactor's engine (loaded by pytest
through the wheel's `pytest11` entry point; docs/engine.md, "Testing your worker").

Fixtures:
- `reactor_cluster` (session): a throwaway PostgreSQL 15+ cluster on 127.0.0.1 and
  a free port, with pg_cron preloaded when it is installed; started as the
  `postgres` OS user when the tests run as root (Postgres refuses root); on a
  tmpfs where there is one with room (`session_cluster_dir`, `REACTOR_TEST_PG_DIR`).
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

Helpers: `enqueue`, `sql`, `eventually`, `wait_until`, `wait_for_event`,
`wait_for_each`, `of_type`, `patience`. Every wait has a budget and fails with what it
waited for; none sleeps a fixed time. A budget only says when to give up and report:
each is multiplied by `REACTOR_TEST_PATIENCE` (default 3), so a loaded machine (CI
beside other jobs, a CPU hog) makes a green run slower, never red.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import os
import pwd
import queue
import re
import shutil
import stat
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
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

__all__ = [
    "enqueue",
    "eventually",
    "of_type",
    "patience",
    "settle_background_databases",
    "sql",
    "start_on_a_free_port",
    "throwaway_cluster",
    "wait_for_each",
    "wait_for_event",
    "wait_until",
]

TEMPLATE_PREFIX = "reactor_template_"
PATIENCE_VAR = "REACTOR_TEST_PATIENCE"


def patience(seconds: float) -> float:
    """The budget of a wait on this machine: `seconds` times `REACTOR_TEST_PATIENCE`
    (default 3). For waits on an event (a child ready, rows written), and for the slack
    beside a bound the product promises, never for that bound itself."""
    text = os.environ.get(PATIENCE_VAR, "3")
    try:
        factor = float(text)
    except ValueError:
        raise pytest.UsageError(f"{PATIENCE_VAR}={text!r}: give a number, e.g. 3") from None
    if not factor >= 1:
        raise pytest.UsageError(f"{PATIENCE_VAR}={text!r}: give a number of 1 or more")
    return seconds * factor


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


# Where throwaway clusters live. A suite creates and drops a database per test, each
# about a thousand files; on ext4 every file created after many were deleted costs the
# server a scan of recently freed inodes (`recently_deleted`, seen with perf): a clone
# and its drop took 0.3-0.4 s of CPU, against 0.03-0.04 s on a RAM filesystem. So a
# tmpfs is used where there is one with room (Linux mounts one on /dev/shm), the system
# temp directory otherwise; `REACTOR_TEST_PG_DIR` chooses (empty: the temp directory).
PG_DIR_VAR = "REACTOR_TEST_PG_DIR"
RAM_DIR = "/dev/shm"  # noqa: S108 - only mkdtemp is made in it (a private directory)
RAM_DIR_MIN_FREE = 2 << 30  # the suite peaked at 1 GB with 4 test processes
# The WAL a throwaway cluster keeps before a checkpoint (default 1 GB): in RAM, per cluster.
THROWAWAY_WAL = {"max_wal_size": "'256MB'", "min_wal_size": "'32MB'"}


def cluster_dir() -> str | None:
    """The directory throwaway clusters are made in (None: the system temp directory)."""
    chosen = os.environ.get(PG_DIR_VAR)
    if chosen is not None:
        if chosen and not os.path.isdir(chosen):
            raise pytest.UsageError(f"{PG_DIR_VAR}={chosen!r} is not a directory: create it, "
                                    "or leave it empty for the system temp directory")
        return os.path.abspath(chosen) if chosen else None  # tests chdir
    return RAM_DIR if _is_roomy_tmpfs(RAM_DIR) else None


@functools.cache
def session_cluster_dir() -> str | None:
    """`cluster_dir()` as chosen once for this process (every cluster of a session in one
    place, whatever the free space later), swept of killed processes' clusters first."""
    where = cluster_dir()
    _sweep_orphans(where or tempfile.gettempdir())
    return where


def _is_roomy_tmpfs(path: str) -> bool:
    """`path` is a mount point whose top mount is a tmpfs, with RAM_DIR_MIN_FREE free
    on it and in memory (a tmpfs' size is only a limit: what it holds takes RAM)."""
    try:
        with open("/proc/self/mountinfo", "rb") as mountinfo:  # paths are bytes, escaped
            top = None
            for line in mountinfo:
                fields = line.split()
                sep = fields.index(b"-")
                mount_point = re.sub(rb"\\([0-7]{3})",
                                     lambda m: bytes([int(m[1], 8)]), fields[4])
                if mount_point == os.fsencode(path):
                    top = fields[sep + 1]  # the last mount on a point is the one seen
        room = os.statvfs(path)
        with open("/proc/meminfo", "rb") as meminfo:
            available = next((int(line.split()[1]) * 1024 for line in meminfo
                              if line.startswith(b"MemAvailable:")), 0)
    except (OSError, ValueError, IndexError):
        return False
    free = min(room.f_bavail * room.f_frsize, available)
    return top == b"tmpfs" and os.access(path, os.W_OK | os.X_OK) and free >= RAM_DIR_MIN_FREE


# A killed test process (SIGKILL, SIGTERM: no atexit, no finalizers) leaves its clusters
# running and their files in RAM until reboot. Each process holds a lock on a file in
# its own directories; one that finds another's lock free stops and removes what is left
# (if the lock file is older than ORPHAN_AGE_S: a directory being made has its file an
# instant before its lock).
_OWNER_LOCK = ".reactor-owner.lock"
ORPHAN_AGE_S = 60.0
_held_locks: list[int] = []


def _claim(base: Path) -> None:
    import fcntl

    fd = os.open(base / _OWNER_LOCK, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _held_locks.append(fd)  # held until this process ends, however it ends


def _sweep_orphans(directory: str) -> None:
    import fcntl

    from reactor.engine.pgcluster import PgCluster

    owners = {os.geteuid()}
    with suppress(KeyError):
        owners.add(pwd.getpwnam("postgres").pw_uid)
    for base in Path(directory).glob("reactor-test-*"):
        try:  # a real directory of ours, not a link someone planted in a shared /tmp
            st = os.lstat(base)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid not in owners:
                continue
            fd = os.open(base / _OWNER_LOCK, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # another user's, or made before locks
        try:
            if time.time() - os.fstat(fd).st_mtime < ORPHAN_AGE_S:
                continue  # just made: its maker may not hold the lock yet
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its process is alive
        finally:
            os.close(fd)
        PgCluster(base, 0).remove()  # stops a server left running, then removes


class _InitdbOutputs:
    """initdb's output, made once per test process and superuser, for every throwaway
    cluster to copy: initdb costs ~2 s of CPU (a suite starts dozens of clusters), a
    copy of its ~40 MB ~0.3 s. Removed when the process ends."""

    def __init__(self) -> None:
        self._made: dict[str, Path] = {}
        self._lock = threading.Lock()

    def data_dir(self, superuser: str) -> Path:
        from reactor.engine.pgcluster import PgCluster

        with self._lock:
            if superuser not in self._made:
                base = Path(tempfile.mkdtemp(prefix="reactor-test-initdb-",
                                             dir=session_cluster_dir()))
                _claim(base)
                atexit.register(shutil.rmtree, base, True)
                source = PgCluster(base, 0, superuser=superuser)
                source.initdb_only()
                self._made[superuser] = source.data_dir
            return self._made[superuser]


_initdb_outputs = _InitdbOutputs()


def throwaway_cluster(prefix: str = "reactor-test-pg-", *, copy_of: Path | None = None,
                      **options: Any) -> PgCluster:
    """A new cluster in a temporary directory (in `session_cluster_dir()`) on a free port,
    initialized, not started: from a copy of initdb's output (see _InitdbOutputs), or of
    `copy_of`, the data directory of a stopped cluster with the same superuser (its
    settings are written again: the last of a setting's lines wins). `options` are
    PgCluster's (superuser, pg_cron, durable)."""
    from reactor.engine.pgcluster import PgCluster, free_port

    cluster = PgCluster(Path(tempfile.mkdtemp(prefix=prefix, dir=session_cluster_dir())),
                        free_port(), **options)
    try:
        _claim(cluster.base_dir)
        cluster.init(copy_of=copy_of or _initdb_outputs.data_dir(cluster.superuser))
        with (cluster.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in THROWAWAY_WAL.items())
    except BaseException:
        cluster.remove()  # a half-made copy must not stay in RAM
        raise
    return cluster


@pytest.fixture(scope="session")
def reactor_cluster() -> Iterator[PgCluster]:
    """A throwaway cluster for the session (fsync off: nothing here must survive)."""
    cluster = throwaway_cluster(pg_cron=pg_cron_installed())
    try:
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
    """One migrated template database per app (module:factory) in a session, and the
    tests' own databases cloned from it.

    A clone (CREATE DATABASE … TEMPLATE) takes 0.1–0.3 s of the server's work. One thread
    makes the next clone while a test runs, and drops the finished tests' databases, so a
    test takes a ready one and the copying overlaps the tests' waits instead of adding to
    them. A clone the thread failed to make is made by the test itself.
    """

    SPARES = 1  # clones made ahead, per app

    def __init__(self, cluster: PgCluster) -> None:
        self.cluster = cluster
        self.names: dict[str, str] = {}
        self._ready: dict[str, queue.SimpleQueue[str]] = {}
        self._coming: dict[str, int] = {}
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reactor-clones")
        _all_templates.add(self)

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

    def clone(self, path: str) -> str:
        """The name of a fresh database migrated for the app at `path`, the test's own."""
        template = self.for_app(path)
        ready = self._ready.setdefault(path, queue.SimpleQueue())
        try:
            name = ready.get_nowait()
        except queue.Empty:
            name = self._make(template)
        with self._lock:
            ahead = ready.qsize() + self._coming.get(path, 0)
            if ahead < self.SPARES:
                self._coming[path] = self._coming.get(path, 0) + 1
                self._worker.submit(self._make_ahead, path, template)
        return name

    def release(self, name: str) -> None:
        """Drop a test's database (in the background: the next test need not wait)."""
        self._worker.submit(self.cluster.drop_database, name)

    def settle(self) -> None:
        """Wait until the clones and drops under way are done (their connections closed)."""
        with suppress(RuntimeError):  # closed: nothing is under way
            self._worker.submit(lambda: None).result()

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    def _make(self, template: str) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.cluster.create_database(name, template=template)
        return name

    def _make_ahead(self, path: str, template: str) -> None:
        try:
            self._ready[path].put(self._make(template))
        except Exception:  # noqa: S110 - the next test makes its own, and sees why
            pass
        finally:
            with self._lock:
                self._coming[path] -= 1


_all_templates: weakref.WeakSet[_Templates] = weakref.WeakSet()


def settle_background_databases() -> None:
    """Wait until the test databases being cloned or dropped beside the tests are done:
    that work holds connections of this process, so a test that counts its own
    descriptors (a leak test) counts only once it is over."""
    for templates in list(_all_templates):
        templates.settle()


@pytest.fixture(scope="session")
def reactor_templates(reactor_cluster: PgCluster) -> Iterator[_Templates]:
    templates = _Templates(reactor_cluster)
    try:
        yield templates
    finally:
        templates.close()


@pytest.fixture
def reactor_database(reactor_cluster: PgCluster, reactor_templates: _Templates,
                     reactor_app_path: str) -> Iterator[str]:
    """The URL of a migrated database of this test's own (a clone of the app's template:
    isolated, and fast)."""
    name = reactor_templates.clone(reactor_app_path)
    try:
        yield reactor_cluster.url(name)
    finally:
        reactor_templates.release(name)


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
    Polls every `every_s` at first, then less often (up to 4 times a second). Fails
    (trio.TooSlowError) after `patience(within_s)`."""
    import trio

    async def check() -> Any:
        result = condition()
        return await result if inspect.isawaitable(result) else result

    pause = every_s
    with trio.fail_after(patience(within_s)):
        while not (result := await check()):
            await trio.sleep(pause)
            pause = _next_pause(pause, every_s)
    return result


def wait_until(condition: Callable[[], Any], within_s: float = 30, what: str = "",
               every_s: float = 0.05) -> Any:
    """Poll `condition` until it is truthy (sync tests); fail naming `what` after
    `patience(within_s)`."""
    budget = patience(within_s)
    deadline = time.monotonic() + budget
    pause = every_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {budget:g}s waiting for {what or condition}")
        time.sleep(pause)
        pause = _next_pause(pause, every_s)
    return result


# A condition that holds soon is seen soon; a long wait polls a few times a second, not
# fifty (a poll is often a new database connection: ~7 ms of CPU, the server's and ours).
SLOWEST_POLL_S = 0.25


def _next_pause(pause: float, every_s: float) -> float:
    return min(pause * 1.5, max(every_s, SLOWEST_POLL_S))


def of_type(type_: str, msg_id: int | None = None) -> Callable[[Event], bool]:
    """An event predicate: this type (and message)."""
    return lambda e: e["type"] == type_ and (msg_id is None or e["msg_id"] == msg_id)


async def wait_for_event(sub: Subscription, predicate: Callable[[Event], bool],
                         count: int = 1, within_s: float = 30.0) -> list[Event]:
    """Collect `count` events matching `predicate` from a subscription
    (`with reactor.bus.subscribe() as sub:`, opened before the cause); fail after
    `patience(within_s)`."""
    import trio

    found: list[Event] = []
    with trio.fail_after(patience(within_s)):
        async for event in sub.receive:
            if predicate(event):
                found.append(event)
                if len(found) >= count:
                    return found
    raise AssertionError(f"subscription ended: {sub.dropped}")


async def wait_for_each(sub: Subscription, *predicates: Callable[[Event], bool],
                        within_s: float = 30.0) -> list[Event]:
    """The first event matching each of `predicates`, in the order of `predicates`,
    whatever order they arrive in. For events of causes that race: an HTTP handler
    publishes its action after the job it queued may already have finished, so two
    `wait_for_event` calls in a row would skip the job's event while waiting for the
    handler's."""
    import trio

    found: list[Event | None] = [None] * len(predicates)
    missing = len(predicates)
    with trio.fail_after(patience(within_s)):
        async for event in sub.receive:
            for i, predicate in enumerate(predicates):
                if found[i] is None and predicate(event):
                    found[i] = event
                    missing -= 1
                    break
            if not missing:
                return [e for e in found if e is not None]
    raise AssertionError(f"subscription ended: {sub.dropped}")

