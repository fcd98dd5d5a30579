"""Shared fixtures: one throwaway Postgres 15 cluster (pg_cron preloaded, fsync
off) per test session, a template database migrated once, and a fresh clone
of it for every test (`CREATE DATABASE ... TEMPLATE`: isolated and fast).

pg_cron lives in the cluster's `postgres` database; the clones do not have
it, which is what migration 030 must cope with.

The database tier (SUPABASE_TIER) also runs on a Supabase-like database
(tests/supabase_db.py: `postgres` is no superuser, Supabase's default
privileges, pgmq and pg_cron installed by the admin): each of its tests that
uses `database_url` or `db` runs twice, `[plain]` and `[supabase]`.
"""

from __future__ import annotations

import email
import email.policy
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from reactor.cli import DEFAULT_APP
from reactor.clinic.schema import migrate
from reactor.engine.logs import configure_logging
from reactor.engine.pgcluster import PgCluster
from reactor.testing import start_on_a_free_port, throwaway_cluster
from tests.harness import read_line
from tests.supabase_db import SupabaseCluster, start_supabase_cluster

# Modules whose database tests run on plain Postgres and on the Supabase-like database.
SUPABASE_TIER = frozenset({"test_schema", "test_triggers", "test_rpc", "test_cron_functions",
                           "test_supabase_access"})


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run the database tier's tests on both databases (`db_flavor`)."""
    module = metafunc.module.__name__.rpartition(".")[2]
    if "db_flavor" in metafunc.fixturenames and module in SUPABASE_TIER:
        metafunc.parametrize("db_flavor", ["plain", "supabase"], indirect=True)


TIERS = ("unit", "db", "process", "browser", "container")
# Fixtures that start Postgres: a test that uses one (directly or through another
# fixture) is in the `db` tier unless it is marked process/browser/container.
DB_FIXTURES = frozenset({"pg_cluster", "template_db", "supabase_cluster", "database_url",
                         "empty_database_url", "private_cluster", "migrated_cluster_data", "db",
                         # reactor.testing's (the plugin; examples/webhooks uses only these)
                         "reactor_cluster", "reactor_database", "reactor_app",
                         "running_reactor"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give each test exactly one tier marker, so `-m unit`, `-m db`, ... select tiers."""
    for item in items:
        if any(item.get_closest_marker(tier) for tier in TIERS):
            continue
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & DB_FIXTURES or item.path.stem in SUPABASE_TIER:
            item.add_marker(pytest.mark.db)
        else:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def pg_cluster(reactor_cluster: PgCluster) -> PgCluster:
    """The session's cluster: reactor.testing's (the plugin the wheel ships), with
    pg_cron preloaded (the clinic's migrations need it)."""
    assert reactor_cluster.pg_cron, "pg_cron is not installed: apt-get install postgresql-15-cron"
    return reactor_cluster


@pytest.fixture(scope="session")
def template_db(reactor_templates: Any) -> str:
    """The clinic's migrated template (reactor.testing makes one per app and session;
    named here, not through reactor_app_path, which a test module may point elsewhere)."""
    return str(reactor_templates.for_app(DEFAULT_APP))


@pytest.fixture(scope="session")
def supabase_cluster() -> Iterator[SupabaseCluster]:
    """The Supabase-like cluster (tests/supabase_db.py), its template migrated."""
    cluster = start_supabase_cluster()
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def db_flavor(request: pytest.FixtureRequest) -> str:
    """`plain` (a superuser's Postgres) or `supabase` (see pytest_generate_tests)."""
    return str(getattr(request, "param", "plain"))


@pytest.fixture
def database_url(request: pytest.FixtureRequest, db_flavor: str) -> Iterator[str]:
    """A migrated database of this test's own (on Supabase: `postgres`'s URL)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    if db_flavor == "supabase":
        supabase: SupabaseCluster = request.getfixturevalue("supabase_cluster")
        url = supabase.clone(name)
        try:
            yield url
        finally:
            supabase.drop(name)
        return
    pg_cluster: PgCluster = request.getfixturevalue("pg_cluster")
    templates = request.getfixturevalue("reactor_templates")
    name = templates.clone(DEFAULT_APP)
    try:
        yield pg_cluster.url(name)
    finally:
        templates.release(name)


@pytest.fixture
def empty_database_url(pg_cluster: PgCluster) -> Iterator[str]:
    """An empty database (nothing migrated, no pgmq)."""
    name = f"e_{uuid.uuid4().hex[:12]}"
    url = pg_cluster.create_database(name)
    try:
        yield url
    finally:
        pg_cluster.drop_database(name)


@pytest.fixture(scope="session")
def migrated_cluster_data() -> Iterator[Path]:
    """The data directory of a stopped cluster whose `postgres` database is migrated:
    each private_cluster starts from a copy (migrating costs ~0.8 s of CPU a cluster)."""
    cluster = throwaway_cluster("reactor-test-migrated-")
    try:
        start_on_a_free_port(cluster)
        migrate(cluster.url())
        cluster.stop()
        yield cluster.data_dir
    finally:
        cluster.remove()


@pytest.fixture
def private_cluster(migrated_cluster_data: Path) -> Iterator[PgCluster]:
    """A migrated cluster of this test's own: it gets restarted."""
    cluster = throwaway_cluster("reactor-test-restart-", copy_of=migrated_cluster_data)
    try:
        start_on_a_free_port(cluster)
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the test's database, as the superuser
    (on the Supabase-like database: as `postgres`, which owns it)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="session", autouse=True)
def _quiet_logs() -> None:
    """Warnings and errors only, as JSON (what production writes)."""
    configure_logging("warning", "json")


# -- SMTP ------------------------------------------------------------------------------
@dataclass
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost."""
    import trustme

    base = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = TlsFiles(base / "ca.pem", base / "server.pem", base / "server.key")
    ca.cert_pem.write_to_path(str(files.ca))
    cert.private_key_pem.write_to_path(str(files.key))
    cert.cert_chain_pems[0].write_to_path(str(files.cert))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(files.cert), append=True)
    return files


@dataclass
class SmtpServer:
    """tests/smtp_server.py in a subprocess; `mails()` parses what it accepted."""

    port: int
    maildir: Path
    argv: list[str]
    sock: socket.socket  # bound to port 0 here, listened on by the server process
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SmtpServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.smtp_server", "--fd", str(self.sock.fileno()),
             *self.argv], stdout=subprocess.PIPE, pass_fds=[self.sock.fileno()],
            cwd=Path(__file__).parent.parent)
        assert self.proc.stdout is not None
        line = read_line(self.proc.stdout, within_s=30)
        assert line.strip() == f"READY {self.port}", f"SMTP server did not start: {line!r}"
        return self

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                self.proc.wait(timeout=10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        self.proc = None
        self.sock.close()

    def mails(self) -> list[email.message.EmailMessage]:
        return [email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
                for p in sorted(self.maildir.glob("*.eml"))]

    def meta(self) -> list[str]:
        return [p.read_text(encoding="utf-8") for p in sorted(self.maildir.glob("*.meta"))]

    def raw(self) -> list[bytes]:
        """Each accepted message as it came over the wire (after DATA, CRLF line ends)."""
        return [p.read_bytes() for p in sorted(self.maildir.glob("*.eml"))]

    def deferrals(self) -> list[str]:
        """One line `deferred ADDR` per greylist deferral (--greylist, --greylist-data)."""
        log = self.maildir / "deferrals.log"
        return log.read_text().splitlines() if log.exists() else []

    def sessions(self) -> list[str]:
        """Session events: `ehlo NAME`, `quit`, `closed` (tests/smtp_server.py)."""
        log = self.maildir / "sessions.log"
        return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def smtp_server(tmp_path: Path, tls_files: TlsFiles) -> Iterator[Callable[..., SmtpServer]]:
    """A factory: smtp_server(tls="starttls", user="u", password="p", reject=[...],
    defer=[...] (451 always), defer_once=[...] (451 the first time: greylisting),
    pipelining=True (offers PIPELINING, RFC 2920), greylist={addr: seconds} (451 to RCPT
    until that long after the address was first seen), greylist_data={addr: seconds}
    (the same, 452 at the end of DATA)), smtputf8=True (offers SMTPUTF8, RFC 6531))."""
    servers: list[SmtpServer] = []

    def make(*, tls: str = "none", user: str | None = None, password: str | None = None,
             reject: Sequence[str] = (), defer: Sequence[str] = (),
             defer_once: Sequence[str] = (), start: bool = True, delay_ms: int = 0,
             idle_timeout_s: float | None = None, pipelining: bool = False,
             greylist: Mapping[str, float] | None = None,
             greylist_data: Mapping[str, float] | None = None,
             smtputf8: bool = False) -> SmtpServer:
        # Bound now (port 0: the kernel's choice), listened on once started: until then
        # a client is refused, and no other process can take the port meanwhile.
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        maildir = tmp_path / f"mail-{port}"
        argv = ["--maildir", str(maildir), "--tls", tls,
                "--cert", str(tls_files.cert), "--key", str(tls_files.key)]
        if user:
            argv += ["--user", user, "--password", password or ""]
        if reject:
            argv += ["--reject", *reject]
        if defer:
            argv += ["--defer", *defer]
        if defer_once:
            argv += ["--defer-once", *defer_once]
        if delay_ms:
            argv += ["--delay-ms", str(delay_ms)]
        if idle_timeout_s is not None:
            argv += ["--idle-timeout-s", str(idle_timeout_s)]
        if pipelining:
            argv += ["--pipelining"]
        if smtputf8:
            argv += ["--smtputf8"]
        if greylist:
            argv += ["--greylist", *(f"{a}={s}" for a, s in greylist.items())]
        if greylist_data:
            argv += ["--greylist-data", *(f"{a}={s}" for a, s in greylist_data.items())]
        server = SmtpServer(port, maildir, argv, sock)
        servers.append(server)
        return server.start() if start else server

    yield make
    for server in servers:
        server.stop()
