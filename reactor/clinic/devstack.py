"""`reactor dev`: the whole system on one machine, with demo data.

A private Postgres cluster with pg_cron under `.reactor/` (loopback only),
migrated; the reactor with the file outbox, the feed and the dashboard; demo
families whose consultations, checkup and payments flow through every queue.
Ctrl-C stops everything; the data stays for the next run; `--reset` starts
over. One stack per directory (`dev.lock`): a second `reactor dev` there
stops at once, naming the first one's pid.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psycopg
import trio

from reactor.clinic import queries
from reactor.clinic.app import build
from reactor.clinic.schema import migrate
from reactor.clinic.settings import Settings, load_settings
from reactor.engine.files import write_whole_sync
from reactor.engine.logs import configure_logging
from reactor.engine.pgcluster import CRON_DATABASE, SERVER_USER, PgCluster, free_port
from reactor.engine.runtime import Reactor
from reactor.engine.watch import format_event

__all__ = ["DevStack", "DevStackBusy", "claim", "run_dev"]

DEMO_MARKER = "demo-ru@example.com"


@dataclass
class DevStack:
    """Where the dev stack keeps its state."""

    home: Path

    @property
    def outbox(self) -> Path:
        return self.home / "outbox"

    @property
    def reports(self) -> Path:
        return self.home / "reports"

    def cluster_dir(self) -> Path:
        """`.reactor/pg`, unless the postgres user cannot enter it (a home under /root)."""
        wanted = self.home / "pg"
        if os.geteuid() != 0 or _postgres_can_enter(self.home):
            return wanted
        digest = hashlib.sha256(str(self.home).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"reactor-dev-{digest}"

    def cluster(self) -> PgCluster:
        base = self.cluster_dir()
        port_file = self.home / "pg-port"
        if port_file.exists():
            port = int(port_file.read_text())
        else:
            port = free_port()
            write_whole_sync(port_file, str(port).encode())
        return PgCluster(base, port, durable=True)


def _postgres_can_enter(path: Path) -> bool:
    probe = subprocess.run(["runuser", "-u", SERVER_USER, "--", "test", "-x",
                            str(path.parent)], capture_output=True, check=False)
    return probe.returncode == 0


def _port_or_free(port: int) -> int:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return free_port()
    return port


def load_demo(url: str) -> bool:
    """Two families (ru and en) whose data exercises every queue. False if already there."""
    with psycopg.connect(url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM public.profiles WHERE email = %s",
                        (DEMO_MARKER,)).fetchone():
            return False
        with conn.transaction():
            ru = conn.execute(
                "INSERT INTO public.profiles (email, full_name, locale) "
                "VALUES (%s, 'Анна Петрова', 'ru') RETURNING id", (DEMO_MARKER,)).fetchone()
            en = conn.execute(
                "INSERT INTO public.profiles (email, full_name, locale) "
                "VALUES ('demo-en@example.com', 'John Smith', 'en') RETURNING id").fetchone()
            assert ru is not None
            assert en is not None
            ru_id, en_id = ru[0], en[0]
            # A consultation tomorrow and one in 50 minutes (confirmation mails now,
            # reminders from send_appointment_reminders below).
            tomorrow = conn.execute(
                "INSERT INTO public.appointments (user_id, specialist_name, scheduled_at, status)"
                " VALUES (%s, 'Д-р Елена Иванова', now() + interval '23 hours', 'pending_payment')"
                " RETURNING id", (ru_id,)).fetchone()
            conn.execute(
                "INSERT INTO public.appointments (user_id, specialist_name, scheduled_at, status)"
                " VALUES (%s, 'Dr. Sarah Brown', now() + interval '50 minutes', 'scheduled')",
                (en_id,))
            assert tomorrow is not None
            # A payment staff confirm, and one that fails.
            paid = conn.execute(
                "INSERT INTO public.payments (user_id, appointment_id, amount, currency) "
                "VALUES (%s, %s, 3500, 'RUB') RETURNING id", (ru_id, tomorrow[0])).fetchone()
            assert paid is not None
            conn.execute(queries.QUEUE_PAYMENT_VERIFY, {"payment_id": paid[0]})
            failing = conn.execute(
                "INSERT INTO public.payments (user_id, amount, currency) "
                "VALUES (%s, 4200, 'RUB') RETURNING id", (en_id,)).fetchone()
            assert failing is not None
        # PAYMENT_PROVIDER=manual: staff decide, as they would in the admin app (the
        # verify queued above only checks that nothing is left for the reactor to do).
        conn.execute("UPDATE public.payments SET status = 'completed' WHERE id = %s",
                     (paid[0],))
        conn.execute("UPDATE public.payments SET status = 'failed', "
                     "status_reason = 'demo: card declined' WHERE id = %s", (failing[0],))
        # A completed checkup with scores: PDF report, two mails, analytics.
        conn.execute(
            "INSERT INTO public.assessments (user_id, status, results) "
            "VALUES (%s, 'completed', %s)",
            (ru_id, psycopg.types.json.Jsonb({
                "child_name": "Маша Петрова",
                "scores": [
                    {"domain": "Эмоциональное состояние", "score": 12, "max": 20,
                     "band": "moderate"},
                    {"domain": "Поведение", "score": 6, "max": 20, "band": "low"},
                    {"domain": "Внимание и концентрация", "score": 17, "max": 20,
                     "band": "high"},
                    {"domain": "Сон", "score": 8, "max": 20, "band": "low"},
                ],
                "summary": "Маша в целом хорошо справляется; стоит обратить внимание на "
                           "концентрацию внимания.",
                "recommendations": ["Обсудить со специалистом трудности с концентрацией.",
                                    "Поддерживать режим сна и ежедневные прогулки."],
            })))
        conn.execute("SELECT public.send_appointment_reminders()")
    return True


def dev_settings(stack: DevStack, url: str) -> Settings:
    settings = load_settings(
        DATABASE_URL=url, EMAIL_PROVIDER="file", EMAIL_OUTBOX_DIR=str(stack.outbox),
        REPORTS_DIR=str(stack.reports), PAYMENT_PROVIDER="manual",
        FEED_HOST="127.0.0.1", FEED_PORT=_port_or_free(8765),
        METRICS_PORT=_port_or_free(8766), WORKER_INTERVAL_MS=5000,
        LOG_LEVEL="warning", LOG_FORMAT="console")
    # SMTP_FROM / SMTP_FROM_NAME / SMTP_REPLY_TO from the environment or .env shape the
    # demo mails as they will look in production; only a missing sender gets a default.
    if settings.smtp_from is None:
        settings = settings.model_copy(update={"smtp_from": "noreply@localhost"})
    return settings


async def _follow(reactor: Reactor, out: Any) -> None:
    color = out.isatty()
    with reactor.bus.subscribe(10_000) as sub:
        async for event in sub.receive:
            if event["type"] in ("queue.depth", "wakeup"):
                continue
            out.write(format_event(event, color=color) + "\n")
            out.flush()


async def _main(stack: DevStack, cluster: PgCluster) -> None:
    url = cluster.url(CRON_DATABASE)
    reactor = Reactor(build(dev_settings(stack, url)), freeze_heap=True)
    async with trio.open_nursery() as nursery:

        async def run_reactor(task_status: trio.TaskStatus[Reactor]) -> None:
            await reactor.run(task_status=task_status, handle_signals=True)
            nursery.cancel_scope.cancel()  # stopped (Ctrl-C): stop following too

        await nursery.start(run_reactor)
        nursery.start_soon(_follow, reactor, sys.stdout)
        loaded = await trio.to_thread.run_sync(load_demo, url)
        print(f"""
reactor dev stack is up{' with fresh demo data' if loaded else ' (demo data from last run)'}
  dashboard  http://127.0.0.1:{reactor.http_port}/
  feed       ws://127.0.0.1:{reactor.feed_port}/events   (reactor watch --port {reactor.feed_port})
  mails      {stack.outbox}/*.eml
  reports    {stack.reports}/
  database   {url}
Ctrl-C stops everything; data stays in {stack.home} (reactor dev --reset starts over).
""", flush=True)


LOCK_FILE = "dev.lock"


class DevStackBusy(Exception):
    """Another `reactor dev` runs on the same directory; `str()` names its pid and the fix."""


def claim(home: Path) -> IO[str]:
    """Hold `<home>/dev.lock` while this process lives (the kernel drops it at exit, even
    on kill -9): two stacks on one directory would fight over its cluster and ports.

    Raises:
        DevStackBusy: naming the pid of the `reactor dev` that holds it.
    """
    home.mkdir(parents=True, exist_ok=True)
    lock = (home / LOCK_FILE).open("a+", encoding="utf-8")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        pid = lock.read().strip() or "unknown"
        lock.close()
        raise DevStackBusy(
            f"another `reactor dev` (pid {pid}) is already running in {home}: stop it with "
            "Ctrl-C, or give this one its own directory with --dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def run_dev(home: Path, reset: bool) -> int:
    """Start the stack; return the exit code (0 after Ctrl-C)."""
    import shutil

    from reactor.engine.pgcluster import PgClusterError

    stack = DevStack(home.resolve())
    try:
        lock = claim(stack.home)  # before --reset: never wipe a running stack's data
    except DevStackBusy as exc:
        print(f"reactor: {exc}", file=sys.stderr)
        return 1
    if reset:
        old = stack.cluster() if (stack.home / "pg-port").exists() else None
        if old is not None:
            old.remove()
        for entry in stack.home.iterdir():
            if entry.name != LOCK_FILE:  # the lock stays held across the reset
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
    configure_logging("warning", "console")
    try:
        cluster = stack.cluster()
        cluster.init()
        if cluster.running():
            # Left behind by a `reactor dev` that was killed (kill -9): ours; reuse it.
            print(f"reusing the Postgres server already running in {cluster.data_dir}",
                  flush=True)
        else:
            cluster.start()
    except PgClusterError as exc:
        print(f"reactor: {exc}", file=sys.stderr)
        lock.close()
        return 1
    try:
        migrate(cluster.url(CRON_DATABASE))
        for folder in (stack.outbox, stack.reports):
            folder.mkdir(parents=True, exist_ok=True)
        # The reactor handles SIGINT itself; a second Ctrl-C cancels at once.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        trio.run(_main, stack, cluster)
    finally:
        cluster.stop()
        lock.close()
    return 0
