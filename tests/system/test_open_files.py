"""`reactor run` raises its soft open-files limit to the hard one (74cce37 and its review).

A connection flood on the HTTP port (the payment webhook puts it on the internet)
must not cut the reactor off its database; raising the limit only helps if nothing in
the process breaks once its descriptors are numbered above 1,024 (select() cannot
wait on those); and a flood beyond even the raised limit must not leave the reactor
cut off once it stops.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import psycopg
import pytest

from tests import factories as f
from tests.conftest import SmtpServer
from tests.harness import ports, reactor_process, scalar, wait_healthy, wait_until


def cut_every_connection_and_enqueue(url: str, event: str) -> None:
    """Terminate every other client connection to the test database (the reactor's
    pool, trio-native and listener connections), then enqueue an analytics `event`."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                     "AND backend_type = 'client backend'")
        conn.execute("SELECT public.enqueue('analytics_queue', jsonb_build_object('event', "
                     "%s::text))", (event,))


class _Flood:
    """Holds up to `size` idle TCP connections to a port, opening new ones as the
    server closes old ones (a slow-loris: the HTTP server closes a connection that
    sends no request within 5 s), in a thread of its own."""

    def __init__(self, port: int, size: int) -> None:
        self.port, self.size, self.held_most = port, size, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._hold, daemon=True)

    def __enter__(self) -> _Flood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _hold(self) -> None:
        held: list[socket.socket] = []
        try:
            while not self._stop.is_set():
                while len(held) < self.size and not self._stop.is_set():
                    try:
                        sock = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
                    except OSError:
                        break  # the server's backlog is full: try again below
                    sock.setblocking(False)  # the check below must not wait
                    held.append(sock)
                self.held_most = max(self.held_most, len(held))
                for sock in list(held):  # drop what the server closed
                    try:
                        closed = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
                    except BlockingIOError:
                        closed = False
                    except OSError:
                        closed = True
                    if closed:
                        sock.close()
                        held.remove(sock)
                self._stop.wait(0.2)
        finally:
            for sock in held:
                sock.close()


@contextmanager
def _soft_open_files_limit(soft: int) -> Iterator[None]:
    """This process's soft limit of open files lowered while a child is started."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


@pytest.mark.process
def test_a_connection_flood_on_the_http_port_does_not_cut_the_reactor_off_its_database(
        database_url: str, tmp_path: Path) -> None:
    """Payment webhooks put the HTTP port on the internet, and systemd starts a service
    with a soft limit of 1,024 open files. `reactor run` raises its soft limit to the
    hard one: with 400 connections held open against the HTTP port (more than the soft
    limit it was started with, 256), the reactor still reconnects to Postgres after
    losing every connection, and handles the next message."""
    log = tmp_path / "reactor.log"
    with ExitStack() as stack:
        with _soft_open_files_limit(256):  # what the child starts with (it inherits it)
            proc = stack.enter_context(reactor_process(database_url, log))
        http = ports(proc, log).http
        with _Flood(http, 400) as flood:
            wait_until(lambda: flood.held_most >= 400, what="400 connections held")
            # Accepted by the reactor (not only queued by the kernel): over the 256 it
            # started with.
            wait_until(lambda: len(os.listdir(f"/proc/{proc.pid}/fd")) > 300,
                       what="the reactor holding over 300 open files")
            # Every connection of the reactor's is cut: it must open new ones, now.
            cut_every_connection_and_enqueue(database_url, "during_flood")
            wait_until(lambda: scalar(database_url, "SELECT count(*) FROM "
                                      "public.analytics_events WHERE event = 'during_flood'"),
                       within_s=60, what="the message sent during the flood")
            assert proc.poll() is None
        assert "Too many open files" not in log.read_text()


# Every descriptor up to this one is taken in the child right after it raised its limit.
HOLD = 1500

# `reactor run` with descriptors 3..HOLD taken right after the limit is raised: whatever
# the reactor opens from then on (sockets, its event loops, files) is numbered above HOLD.
HIGH_FDS = """
import os, runpy, sys
import reactor.engine.startup as startup
raise_limit = startup.raise_open_files_limit
def raise_then_hold():
    soft = raise_limit()
    while os.open(os.devnull, os.O_RDONLY) < int(os.environ["REVIEW_HOLD"]):
        pass
    return soft
startup.raise_open_files_limit = raise_then_hold
sys.argv = ["reactor", "run"]
runpy.run_module("reactor", run_name="__main__")
"""

CHECKUP = {
    "child_name": "Маша Петрова",
    "scores": [{"domain": "Поведение", "score": 5, "max": 20, "band": "low"}],
    "summary": "Всё хорошо.", "recommendations": ["Ежедневные прогулки."],
}


def socket_fds(pid: int) -> list[int]:
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                found.append(int(name))
        except FileNotFoundError:  # closed meanwhile
            pass
    return found


@pytest.mark.process
def test_every_part_of_the_reactor_works_with_its_descriptors_above_1024(
        database_url: str, tmp_path: Path, smtp_server: Callable[..., SmtpServer]) -> None:
    """The raised limit is used: nothing may wait with select() (psycopg's and libpq's
    waits, trio, Hypercorn, asyncio under aiosmtplib, fpdf2's files). A checkup's report
    (PDF, file, two mails over SMTP), /healthz, and every database connection cut and
    opened again, all with every socket of the reactor's numbered above 1,500."""
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < HOLD + 500:
        pytest.skip(f"the hard open-files limit is below {HOLD + 500}")
    server = smtp_server()
    log = tmp_path / "reactor.log"
    with psycopg.connect(database_url, autocommit=True) as conn:
        user = f.profile(conn, email="mama@example.com", locale="ru")
        checkup = f.assessment(conn, user, results=CHECKUP)
    env = {"EMAIL_PROVIDER": "smtp", "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(server.port),
           "SMTP_SECURITY": "none", "SMTP_FROM": "noreply@family.example",
           "SMTP_TIMEOUT_S": "5", "REPORTS_DIR": str(tmp_path / "reports")}
    with reactor_process(database_url, log, python_c=HIGH_FDS, REVIEW_HOLD=str(HOLD),
                         **env) as proc:
        http = ports(proc, log).http
        assert min(socket_fds(proc.pid)) > HOLD
        assert httpx.get(f"http://127.0.0.1:{http}/healthz", timeout=10).status_code == 200
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("UPDATE public.assessments SET status = 'completed' WHERE id = %s",
                         (checkup,))
        # "checkup completed" (the trigger's) and "report ready" (after the PDF).
        wait_until(lambda: len(server.mails()) >= 2, within_s=60, what="two mails")
        assert list((tmp_path / "reports").rglob("*.pdf"))
        cut_every_connection_and_enqueue(database_url, "above_1024")
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM public.analytics_events "
                                                "WHERE event = 'above_1024'"),
                   within_s=60, what="the message sent after every connection was cut")
        assert min(socket_fds(proc.pid)) > HOLD
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    text = log.read_text()
    assert "out of range" not in text
    assert "Traceback" not in text


@pytest.mark.process
def test_a_flood_beyond_a_low_hard_limit_cuts_the_reactor_off_only_while_it_lasts(
        database_url: str, tmp_path: Path) -> None:
    """LimitNOFILE=256 (an operator's choice): raising to the hard limit cannot help,
    and 400 connections held against the HTTP port exhaust it (accept itself fails).
    Every database connection is cut meanwhile; once the flood stops the reactor opens
    new ones on its own, handles the message, and is healthy."""
    log = tmp_path / "reactor.log"
    with reactor_process(database_url, log) as proc:
        http = ports(proc, log).http
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (256, 256))
        with _Flood(http, 400):
            wait_until(lambda: "Too many open files" in log.read_text(), within_s=60,
                       what="the reactor out of descriptors")
            cut_every_connection_and_enqueue(database_url, "during_flood")
        def handled() -> int:
            assert proc.poll() is None, f"reactor run ended:\n{log.read_text()[-3000:]}"
            return scalar(database_url, "SELECT count(*) FROM public.analytics_events "
                                        "WHERE event = 'during_flood'")
        wait_until(handled, within_s=60, what="the message sent during the flood")
        wait_healthy(http, proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
