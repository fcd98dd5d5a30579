"""A real PgBouncer in transaction mode in front of a test cluster (tests that prove
the reactor behind a transaction pooler, as Supabase's Supavisor or a PgBouncer is)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from reactor.engine.pgcluster import PgCluster, free_port
from tests.harness import database_name, wait_until


@contextmanager
def pgbouncer(cluster: PgCluster, *, pool_size: int = 2) -> Iterator[str]:
    """A real PgBouncer in transaction mode in front of `cluster`; yields its URL (of the
    `postgres` database: `same_database` points it at a test's own).

    PgBouncer cannot be handed a bound socket, so its port is chosen first: if another
    process takes it meanwhile, PgBouncer exits and another port is tried.
    """
    exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(exe).exists():
        pytest.skip("pgbouncer is not installed: apt-get install -y pgbouncer")
    base = Path(tempfile.mkdtemp(prefix="reactor-test-pgbouncer-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(5):
            url, proc = _start_pgbouncer(exe, base, cluster, pool_size)
            if proc.poll() is None:
                break
        assert proc is not None
        assert proc.poll() is None, "pgbouncer did not start: " + (
            (base / "pgbouncer.log").read_text()[-500:])
        yield url
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(base, ignore_errors=True)


def same_database(pooled_url: str, database_url: str) -> str:
    """`pooled_url` (PgBouncer's) pointed at the database of `database_url`."""
    parts = urlsplit(pooled_url)
    return urlunsplit(parts._replace(path="/" + database_name(database_url)))


def _start_pgbouncer(exe: str, base: Path, cluster: PgCluster,
                     pool_size: int) -> tuple[str, subprocess.Popen[bytes]]:
    """Start PgBouncer on a free port; return once it answers or has exited."""
    port = free_port()
    (base / "users.txt").write_text('"postgres" ""\n')
    ini = base / "pgbouncer.ini"
    ini.write_text(f"""[databases]
* = host=127.0.0.1 port={cluster.port}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {base / "users.txt"}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 100
logfile = {base / "pgbouncer.log"}
pidfile = {base / "pgbouncer.pid"}
""")
    argv = [exe, str(ini)]
    if os.geteuid() == 0:  # PgBouncer, like Postgres, refuses to run as root
        pw = pwd.getpwnam("postgres")
        for path in (base, *base.iterdir()):
            os.chown(path, pw.pw_uid, pw.pw_gid)
        argv = ["runuser", "-u", "postgres", "--", *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def answers() -> bool:
        if proc.poll() is not None:
            return True  # exited: the caller tries another port
        try:
            with psycopg.connect(url, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False
    wait_until(answers, 15, "pgbouncer to accept connections")
    return url, proc
