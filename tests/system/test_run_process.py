"""`reactor run` as a process: crashes, signals, bad settings, an absent database."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from reactor.engine.pgcluster import PgCluster
from reactor.engine.startup import refusal, url_problem
from reactor.engine.web import serve_http
from reactor.testing import start_on_a_free_port, throwaway_cluster
from tests import factories as f
from tests.harness import log_lines, ports, reactor_command, reactor_process, scalar, wait_until


@pytest.mark.process
def test_kill_9_mid_burst_then_restart_handles_everything_exactly_once(
        database_url: str, tmp_path: Path) -> None:
    total = 3000
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT public.enqueue('analytics_queue', jsonb_build_object("
                     "'event', 'burst', 'properties', jsonb_build_object('n', i))) "
                     "FROM generate_series(1, %s) AS i", (total,))
    log = tmp_path / "reactor.log"
    with reactor_process(database_url, log, VISIBILITY_TIMEOUT_S="2",
                         MAX_TASKS_PER_CYCLE="50") as proc:
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM analytics_events") >= 200,
                   what="the first rows")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_before = scalar(database_url, "SELECT count(*) FROM analytics_events")
    assert done_before < total, "the crash came too late to prove anything"
    with reactor_process(database_url, log, VISIBILITY_TIMEOUT_S="2",
                         WORKER_INTERVAL_MS="200") as proc:
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM pgmq.q_analytics_queue")
                   == 0, within_s=60, what="the queue to drain")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert scalar(database_url, "SELECT count(*) FROM analytics_events") == total
    assert scalar(database_url, "SELECT count(DISTINCT source_msg_id) FROM analytics_events "
                                "WHERE source_msg_id BETWEEN 1 AND 3000") == total
    assert scalar(database_url, "SELECT count(*) FROM pgmq.a_analytics_queue") == total
    assert scalar(database_url, "SELECT count(*) FROM pgmq.q_analytics_queue_dlq") == 0


@pytest.mark.process
def test_sigterm_with_jobs_in_flight_finishes_them_and_exits_0(
        database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "reactor.log"
    total = 5000
    with reactor_process(database_url, log, VISIBILITY_TIMEOUT_S="300",
                         SHUTDOWN_GRACE_S="10", LOG_LEVEL="debug") as proc:
        ports(proc, log)  # started
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("SELECT public.enqueue('analytics_queue', jsonb_build_object("
                         "'event', 'burst')) FROM generate_series(1, %s)", (total,))
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM analytics_events") >= 100,
                   what="work to start")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    events = [e.get("event") for e in log_lines(log)]
    assert "reactor.stopping" in events
    assert "job.retrying" not in events
    handled = scalar(database_url, "SELECT count(*) FROM analytics_events")
    # Finished, not released: every job that had started when the signal came succeeded
    # (a message read ahead but not started yet may be released: it did no work).
    started = {e["msg_id"] for e in log_lines(log) if e.get("event") == "job.started"}
    succeeded = {e["msg_id"] for e in log_lines(log) if e.get("event") == "job.succeeded"}
    assert started
    assert started == succeeded
    assert len(succeeded) == handled
    # Everything that was handled is archived; everything else is visible again at once
    # (not 300 s later), with nothing lost.
    assert scalar(database_url, "SELECT count(*) FROM pgmq.a_analytics_queue") == handled
    assert scalar(database_url, "SELECT count(*) FROM pgmq.q_analytics_queue") == total - handled
    assert scalar(database_url, "SELECT count(*) FROM pgmq.q_analytics_queue "
                                "WHERE vt > clock_timestamp()") == 0


@pytest.mark.process
def test_job_log_lines_carry_the_fields_and_no_address(database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "reactor.log"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT public.enqueue('analytics_queue', "
                     "'{\"event\": \"ok\", \"properties\": {\"email\": \"anna@example.com\"}}')")
        conn.execute("SELECT public.enqueue('analytics_queue', "
                     "'{\"event\": \"x\", \"user_id\": \"anna.petrova@example.com\"}')")
    with reactor_process(database_url, log, LOG_LEVEL="debug") as proc:  # job.succeeded: debug
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM pgmq.a_analytics_queue")
                   == 2, what="both messages")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    text = log.read_text()
    assert "anna@example.com" not in text
    assert "anna.petrova@example.com" not in text
    lines = log_lines(log)  # every line is JSON
    [ok] = [e for e in lines if e.get("event") == "job.succeeded"]
    assert {"queue", "msg_id", "attempt", "duration_ms"} <= ok.keys()
    [dead] = [e for e in lines if e.get("event") == "job.dead_lettered"]
    assert dead["level"] == "error"
    assert "user_id" in str(dead["error"])


@pytest.mark.process
async def test_a_second_sigterm_cancels_the_jobs_at_once_and_releases_them(
        database_url: str, tmp_path: Path) -> None:
    """The first SIGTERM waits up to SHUTDOWN_GRACE_S (600 s) for a report whose Storage
    upload hangs; the second one cancels it: the job neither finishes nor times out into
    a retry, the process exits 0, and the message is visible again at once."""
    upload_seen = trio.Event()

    async def hang(request: Request) -> Response:
        upload_seen.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    storage = Starlette(routes=[Route("/storage/v1/object/reports/{path:path}", hang,
                                      methods=["POST"])])
    with psycopg.connect(database_url, autocommit=True) as conn:
        user = f.profile(conn)
        f.assessment(conn, user, status="completed",
                     results={"scores": [{"domain": "Сон", "score": 3, "max": 5}]})
    log = tmp_path / "reactor.log"
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, storage, "127.0.0.1", 0)
        with reactor_process(database_url, log, SHUTDOWN_GRACE_S="600", LOG_LEVEL="debug",
                             VISIBILITY_TIMEOUT_S="900", REPORTS_DIR=str(tmp_path / "reports"),
                             SUPABASE_URL=f"http://127.0.0.1:{port}",
                             SUPABASE_SERVICE_ROLE_KEY="service-role-key-for-tests") as proc:
            with trio.fail_after(60):
                await upload_seen.wait()
            proc.send_signal(signal.SIGTERM)
            await trio.to_thread.run_sync(lambda: wait_until(
                lambda: "reactor.stopping" in log.read_text(), what="the graceful stop"))
            assert proc.poll() is None  # waiting for the report, within the grace
            proc.send_signal(signal.SIGTERM)
            assert await trio.to_thread.run_sync(lambda: proc.wait(timeout=60)) == 0
        nursery.cancel_scope.cancel()
    assert [e["event"] for e in log_lines(log)].count("signal received") == 2
    report = [e.get("event") for e in log_lines(log)
              if e.get("queue") == "report_generation_queue" and "msg_id" in e]
    assert report == ["job.started"]  # neither succeeded nor retried: cancelled
    assert scalar(database_url, "SELECT count(*) FROM pgmq.q_report_generation_queue "
                                "WHERE read_ct = 1 AND vt <= clock_timestamp()") == 1
    assert scalar(database_url, "SELECT count(*) FROM public.reports") == 0


@pytest.mark.process
def test_log_format_console_writes_readable_lines_not_json(database_url: str,
                                                           tmp_path: Path) -> None:
    log = tmp_path / "reactor.log"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT public.enqueue('analytics_queue', '{\"event\": \"console\", "
                     "\"properties\": {\"email\": \"anna@example.com\"}}')")
    with reactor_process(database_url, log, LOG_FORMAT="console", LOG_LEVEL="debug") as proc:
        wait_until(lambda: "job.succeeded" in log.read_text(), what="a job line")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    text = log.read_text()
    job = next(line for line in text.splitlines() if "job.succeeded" in line)
    assert not job.lstrip().startswith("{")  # not JSON
    assert "queue=analytics_queue" in job  # key=value pairs a person reads
    assert "\x1b[" not in text  # no colour codes: the output is not a terminal
    assert "reactor.stopping" in text
    assert "anna@example.com" not in text


@pytest.mark.process
@pytest.mark.parametrize(("env", "expected"), [
    ({}, "DATABASE_URL is not set"),
    ({"DATABASE_URL": "postgresql://x@127.0.0.1/db", "WORKER_INTERVAL_MS": "soon"},
     "invalid WORKER_INTERVAL_MS='soon'"),
    ({"DATABASE_URL": "postgresql://x@127.0.0.1/db", "LOG_FORMAT": "xml"},
     "invalid LOG_FORMAT='xml'"),
    ({"DATABASE_URL": "mysql://x@127.0.0.1/db"}, "DATABASE_URL must be a postgresql:// URL"),
    ({"DATABASE_URL": "postgresql://x@127.0.0.1/db", "EMAIL_PROVIDER": "smtp"},
     "EMAIL_PROVIDER=smtp needs SMTP_HOST"),
    ({"DATABASE_URL": "postgresql://x@127.0.0.1/db", "EMAIL_PROVIDER": "smtp",
      "SMTP_HOST": "mail.example.com", "SMTP_FROM": "a@example.com", "SMTP_USER": "u"},
     "SMTP_USER is set but SMTP_PASS is not"),
    ({"DATABASE_URL": "postgresql://x@127.0.0.1/db", "APP_TIMEZONE": "Mars/Olympus"},
     "APP_TIMEZONE='Mars/Olympus' is not a time zone"),
])
def test_bad_settings_stop_with_one_line_and_exit_2(
        tmp_path: Path, env: dict[str, str], expected: str) -> None:
    result = reactor_command("run", cwd=tmp_path, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "mysql://x@" not in lines[0]  # a URL may hold a password: never echoed


@pytest.mark.process
def test_unreachable_database_is_retried_and_reported_not_a_traceback(tmp_path: Path) -> None:
    log = tmp_path / "reactor.log"
    # Bound and never listened on: connections are refused, and no one else can take it.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"postgresql://postgres@127.0.0.1:{closed.getsockname()[1]}/postgres"
        with reactor_process(url, log) as proc:
            wait_until(lambda: sum("database unreachable" in str(e.get("event"))
                                   for e in log_lines(log)) >= 2, what="two retries")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
    assert "Traceback" not in log.read_text()
    [first, *_] = [e for e in log_lines(log) if "database unreachable" in str(e.get("event"))]
    assert first["level"] == "warning"
    assert "retry_in_s" in first
    # What it waits for, and why: where, and what the database did.
    assert first["event"] == "database unreachable; waiting for it to accept connections"
    assert first["database"] == url.removeprefix("postgresql://postgres@")
    assert "connection refused" in str(first["reason"])


@pytest.mark.process
def test_a_silent_database_at_start_is_waited_for_saying_so(tmp_path: Path) -> None:
    log = tmp_path / "reactor.log"
    # Accepts TCP connections (the kernel completes the handshake) and never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/postgres"
        with reactor_process(url, log) as proc:
            wait_until(lambda: any("database unreachable" in str(e.get("event"))
                                   for e in log_lines(log)), within_s=60, what="a wait line")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
    [first, *_] = [e for e in log_lines(log) if "database unreachable" in str(e.get("event"))]
    assert first["reason"] == "no answer within the connect timeout"


@pytest.mark.process
def test_a_database_that_comes_up_later_is_used_once_it_does(
        private_cluster: PgCluster, tmp_path: Path) -> None:
    log = tmp_path / "reactor.log"
    private_cluster.stop()
    with reactor_process(private_cluster.url(), log) as proc:
        wait_until(lambda: any("database unreachable" in str(e.get("event"))
                               for e in log_lines(log)), what="a wait line")
        private_cluster.start()
        wait_until(lambda: any(e.get("event") == "reactor.started" for e in log_lines(log)),
                   within_s=60, what="start once the database is up")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


@pytest.fixture(scope="module")
def password_cluster() -> Iterator[PgCluster]:
    """A cluster that asks TCP clients for a password (the shared one trusts everyone)."""
    cluster = throwaway_cluster("reactor-test-auth-")
    (cluster.data_dir / "pg_hba.conf").write_text(
        "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
    start_on_a_free_port(cluster)
    try:
        with psycopg.connect(host=str(cluster.data_dir), port=cluster.port, user="postgres",
                             dbname="postgres", autocommit=True) as conn:
            conn.execute("ALTER ROLE postgres PASSWORD 'right%s3cret'")
        yield cluster
    finally:
        cluster.remove()


@pytest.mark.process
@pytest.mark.parametrize(("case", "expected"), [
    ("wrong password", 'rejected the password of user "postgres": check USER and PASSWORD'),
    ("missing database", 'the database "no_such_db" in DATABASE_URL does not exist'),
    ("missing role", 'the user "no_such_role" in DATABASE_URL does not exist'),
    ("invalid host", 'the host "bad..host" in DATABASE_URL is not a valid host name'),
    ("bad percent", "the password in DATABASE_URL has a '%' that does not start a "
                    "percent-encoding (%XX): write a literal % as %25"),
])
def test_what_waiting_cannot_fix_stops_run_with_one_line_and_exit_2(
        password_cluster: PgCluster, pg_cluster: PgCluster, tmp_path: Path, case: str,
        expected: str) -> None:
    auth, trust = password_cluster.port, pg_cluster.port
    url, secrets = {
        "wrong password": (f"postgresql://postgres:wrong-s3cret@127.0.0.1:{auth}/postgres",
                           ["wrong-s3cret"]),
        "missing database": (f"postgresql://postgres:right%25s3cret@127.0.0.1:{auth}/no_such_db",
                             ["right%s3cret", "right%25s3cret"]),
        "missing role": (f"postgresql://no_such_role:any-s3cret@127.0.0.1:{trust}/postgres",
                         ["any-s3cret"]),
        "invalid host": ("postgresql://postgres:any-s3cret@bad..host:5432/postgres",
                         ["any-s3cret"]),
        # libpq would quote this whole password in its error.
        "bad percent": (f"postgresql://postgres:s3cret%zz@127.0.0.1:{auth}/postgres",
                        ["s3cret"]),
    }[case]
    result = reactor_command("run", cwd=tmp_path, EMAIL_PROVIDER="file", DATABASE_URL=url)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    for secret in secrets:
        assert secret not in result.stderr + result.stdout


@pytest.mark.parametrize(("error", "expected"), [
    # psycopg's own resolver and libpq's, word for word.
    ("failed to resolve host 'db.example': [Errno -2] Name or service not known",
     'the host "db.example" in DATABASE_URL is unknown'),
    ('could not translate host name "db.example" to address: Name or service not known',
     'the host "db.example" in DATABASE_URL is unknown'),
    ("failed to resolve host 'db': [Errno -3] Temporary failure in name resolution", None),
    ('connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  '
     "the database system is starting up", None),
    ('connection failed: connection to server at "127.0.0.1", port 5432 failed: '
     "fe_sendauth: no password supplied", "asks for a password and DATABASE_URL has none"),
    ('connection failed: connection to server at "10.0.0.5", port 5432 failed: FATAL:  no '
     'pg_hba.conf entry for host "10.0.0.9", user "app", database "app", no encryption',
     "(no pg_hba.conf entry): allow it in pg_hba.conf"),
])
def test_start_failures_are_told_apart_by_what_waiting_can_fix(
        error: str, expected: str | None) -> None:
    # A real name lookup would leave this machine: the messages are classified as they come.
    line = refusal(psycopg.OperationalError(error), "postgresql://app:pw@db.example:5432/app")
    if expected is None:
        assert line is None
    else:
        assert line is not None
        assert expected in line


@pytest.mark.process
def test_unmigrated_database_is_refused_naming_the_fix(
        empty_database_url: str, tmp_path: Path) -> None:
    result = reactor_command("run", cwd=tmp_path, EMAIL_PROVIDER="file",
                             DATABASE_URL=empty_database_url)
    assert result.returncode == 2
    assert "run `reactor migrate`" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("url", [
    "postgresql://app:p%40ss%25word@db.example:5432/app",
    "postgresql://app:pw@[::1]:5432/app",
    "postgresql://app:pw@h1:5432,h2:5433/app?target_session_attrs=read-write",
    "postgresql://app@/app?host=/var/run/postgresql",
    "postgresql://app@пример.рф/app",
    "host=db.example user=app password=p%zz dbname=app",  # key=value: no URL decoding
])
def test_valid_database_urls_are_not_refused(url: str) -> None:
    assert url_problem(url) is None
