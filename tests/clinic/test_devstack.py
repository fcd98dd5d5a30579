"""`reactor dev`: demo data in a fresh directory, one stack per directory, and Postgres
start failures that lead with their reason."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from reactor.clinic.devstack import DevStack
from reactor.engine.pgcluster import PgCluster, PgClusterError, free_port, start_failure_reason
from tests.harness import wait_until

# `reactor dev` and Postgres servers run as child processes.
pytestmark = pytest.mark.process


def start(cwd: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "reactor", "dev", *args], cwd=cwd,
                                stdout=out, stderr=out, env={"PATH": os.environ["PATH"]})


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Ctrl-C, as a person would; the stack must exit cleanly."""
    try:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for(condition: Callable[[], object], what: str, log: Path,
             within_s: float = 90) -> None:
    try:
        wait_until(condition, within_s, what, every_s=0.2)
    except AssertionError:
        raise AssertionError(f"no {what}:\n{log.read_text()[-3000:]}") from None


def test_dev_stack_demo_then_restart_reuses_the_data_and_reset_starts_over(
        tmp_path: Path) -> None:
    home = tmp_path / ".reactor"
    log = tmp_path / "dev.log"
    proc = start(tmp_path, log)
    try:
        wait_for(lambda: len(list((home / "outbox").glob("*.eml"))) >= 7, "demo mails", log)
        wait_for(lambda: list((home / "reports").glob("*/*.pdf")), "demo report", log)
        wait_for(lambda: "dashboard  http://127.0.0.1:" in log.read_text(), "banner", log)
        text = log.read_text()
        assert "job.succeeded" in text  # the command follows the live events
        assert "report_generation_queue" in text
        port = int((home / "pg-port").read_text())
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

        def demo_done() -> bool:
            # The report's own mail is queued after its PDF: stop only when nothing of the
            # demo is left to do, so that the next start has nothing to send.
            with psycopg.connect(url) as conn:
                return all(conn.execute(f"SELECT count(*) = 0 FROM pgmq.q_{queue}").fetchone()
                           == (True,) for queue in ("email_queue", "report_generation_queue"))

        wait_for(demo_done, "the demo's queues to empty", log)
        with psycopg.connect(url) as conn:
            statuses: dict[int, str] = dict(
                conn.execute("SELECT amount::int, status FROM public.payments"))
            assert statuses == {3500: "completed", 4200: "failed"}
            listen = conn.execute("SHOW listen_addresses").fetchone()
            assert listen == ("127.0.0.1",)  # never beyond loopback
    finally:
        stop(proc)

    mails = len(list((home / "outbox").glob("*.eml")))
    log2 = tmp_path / "dev2.log"
    proc = start(tmp_path, log2)
    try:
        wait_for(lambda: "demo data from last run" in log2.read_text(), "second start", log2)
        with psycopg.connect(url) as conn:
            old_profiles = {r[0] for r in conn.execute("SELECT id FROM public.profiles")}
        assert len(old_profiles) == 2
    finally:
        stop(proc)
    assert len(list((home / "outbox").glob("*.eml"))) == mails  # nothing sent twice

    # --reset: the old data (database, mails, reports) is gone and the demo runs afresh.
    (home / "outbox" / "marker.eml").write_text("from the first run")
    log3 = tmp_path / "dev3.log"
    proc = start(tmp_path, log3, "--reset")
    try:
        wait_for(lambda: "dashboard  http://127.0.0.1:" in log3.read_text(), "banner", log3)
        wait_for(lambda: len(list((home / "outbox").glob("*.eml"))) >= 7, "demo mails", log3)
        assert "demo data from last run" not in log3.read_text()
        assert not (home / "outbox" / "marker.eml").exists()
        url = f"postgresql://postgres@127.0.0.1:{int((home / 'pg-port').read_text())}/postgres"
        with psycopg.connect(url) as conn:
            profiles = {r[0] for r in conn.execute("SELECT id FROM public.profiles")}
    finally:
        stop(proc)
    assert len(profiles) == 2
    assert not profiles & old_profiles  # new demo rows, not the old ones
    shutil.rmtree(DevStack(home).cluster_dir(), ignore_errors=True)


def test_a_second_dev_is_refused_naming_the_first_and_a_killed_one_is_recovered(
        tmp_path: Path) -> None:
    home = tmp_path / ".reactor"
    log = tmp_path / "dev.log"
    first = start(tmp_path, log)
    try:
        wait_for(lambda: "dashboard  http://127.0.0.1:" in log.read_text(), "banner", log)
        for extra in ([], ["--reset"]):  # --reset must not wipe the running stack either
            second = subprocess.run([sys.executable, "-m", "reactor", "dev", *extra],
                                    cwd=tmp_path, capture_output=True, text=True, check=False,
                                    timeout=60, env={"PATH": os.environ["PATH"]})
            assert second.returncode == 1
            [line] = second.stderr.strip().splitlines()
            assert f"another `reactor dev` (pid {first.pid}) is already running" in line
            assert "--dir" in line
        assert list((home / "reports").glob("*/*.pdf"))
        # kill -9 leaves its Postgres running: the next start takes it over.
        first.kill()
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    log2 = tmp_path / "dev2.log"
    again = start(tmp_path, log2)
    try:
        wait_for(lambda: "demo data from last run" in log2.read_text(), "restart", log2)
        assert "reusing the Postgres server already running" in log2.read_text()
    finally:
        stop(again)
    cluster = DevStack(home).cluster()
    assert not cluster.running()  # Ctrl-C stopped the server it took over
    shutil.rmtree(cluster.base_dir, ignore_errors=True)


@pytest.fixture
def stopped_cluster() -> Iterator[PgCluster]:
    cluster = PgCluster(Path(tempfile.mkdtemp(prefix="reactor-test-start-")), free_port())
    cluster.init()
    try:
        yield cluster
    finally:
        cluster.remove()


def reason_of(exc: PgClusterError, port: int) -> str:
    [line] = str(exc).splitlines()  # one line, the reason first
    prefix = f"postgres did not start on port {port}: "
    assert line.startswith(prefix)
    return line.removeprefix(prefix)


def test_a_postgres_start_failure_leads_with_the_line_that_says_why(
        stopped_cluster: PgCluster) -> None:
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", stopped_cluster.port))
        taken.listen()
        with pytest.raises(PgClusterError) as port_taken:
            stopped_cluster.start()
    assert reason_of(port_taken.value, stopped_cluster.port).startswith(
        'LOG: could not bind IPv4 address "127.0.0.1": Address already in use')
    stopped_cluster.start()
    twin = PgCluster(stopped_cluster.base_dir, free_port())
    with pytest.raises(PgClusterError) as same_dir:
        twin.start()
    reason = reason_of(same_dir.value, twin.port)
    assert reason.startswith('FATAL: lock file "postmaster.pid" already exists')
    assert "Is another postmaster" in reason
    assert str(stopped_cluster.log_file) in reason


@pytest.mark.skipif(os.geteuid() != 0,
                    reason="the server user differs from the caller only as root")
def test_the_reason_is_right_from_a_directory_the_server_user_cannot_enter(
        stopped_cluster: PgCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkout under /root or in a 0700 mktemp directory: Postgres (as `postgres`)
    cannot enter the caller's working directory. It runs from its own base directory
    instead, and the "line that says why" is still the real reason."""
    checkout = tmp_path / "checkout"
    checkout.mkdir(mode=0o700)
    monkeypatch.chdir(checkout)
    stopped_cluster.start()
    twin = PgCluster(stopped_cluster.base_dir, free_port())
    with pytest.raises(PgClusterError) as same_dir:
        twin.start()
    assert reason_of(same_dir.value, twin.port).startswith(
        'FATAL: lock file "postmaster.pid" already exists')
    assert "could not change directory" not in stopped_cluster.log_file.read_text()


def test_the_reason_skips_postgres_noise_about_the_working_directory() -> None:
    log = ('could not change directory to "/root/reactor": Permission denied\n'
           "2026-12-04 16:00:00.000 UTC [1] LOG:  starting PostgreSQL 15\n"
           '2026-12-04 16:00:00.001 UTC [1] FATAL:  lock file "postmaster.pid" already exists\n'
           "2026-12-04 16:00:00.001 UTC [1] HINT:  Is another postmaster running?\n")
    assert start_failure_reason(log) == ('FATAL: lock file "postmaster.pid" already exists '
                                         "(HINT: Is another postmaster running?)")
    # The same words as the reason itself (the data directory) are kept.
    assert start_failure_reason(
        'FATAL:  could not change directory to "/srv/pg/data": Permission denied\n'
        "pg_ctl: could not start server\n") == (
        'FATAL: could not change directory to "/srv/pg/data": Permission denied')
