"""`python -m bench [scenario ...]`: wake latency, throughput, the old design.

Runs against a private Postgres cluster with stock durability (fsync on) on
this machine, started under a temporary directory and removed afterwards.
Prints a Markdown table to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import psycopg
import trio

from reactor import queues
from reactor.config import load_settings
from reactor.core.app import Reactor
from reactor.logs import configure_logging
from reactor.migrate import migrate
from reactor.pgcluster import PgCluster, free_port
from reactor.processors.analytics import AnalyticsProcessor
from reactor.processors.base import Job, MessageModel, Processor

Result = dict[str, Any]


class AnyMessage(MessageModel):
    pass


class Counted:
    """Counts finished jobs; `done` is set when `target` of them have finished."""

    count: ClassVar[int] = 0
    target: ClassVar[int] = 0
    done: ClassVar[trio.Event]

    @classmethod
    def expect(cls, target: int) -> None:
        """Call inside trio.run, before the jobs start."""
        cls.count, cls.target, cls.done = 0, target, trio.Event()

    @classmethod
    def tick(cls) -> None:
        cls.count += 1
        if cls.count == cls.target:
            cls.done.set()


class NoopProcessor(Counted, Processor[AnyMessage]):
    """Does nothing but note when it started (for the latency run)."""

    queue = "analytics_queue"
    model = AnyMessage
    concurrency = 100
    started_at: ClassVar[dict[int, float]] = {}

    async def handle(self, job: Job[AnyMessage]) -> None:
        type(self).started_at[job.msg_id] = time.perf_counter()
        self.tick()


class CountingAnalytics(Counted, AnalyticsProcessor):
    async def handle(self, job: Job[Any]) -> None:
        await super().handle(job)
        self.tick()


def settings(url: str, **env: Any) -> Any:
    return load_settings(_env_file=None, DATABASE_URL=url, WORKER_INTERVAL_MS=60_000,
                         LOG_LEVEL="warning", **env)


def reset(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM pgmq.q_analytics_queue; DELETE FROM pgmq.a_analytics_queue; "
                     "DELETE FROM public.analytics_events")
        conn.execute("VACUUM ANALYZE pgmq.q_analytics_queue")


def fill(url: str, n: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pgmq.send('analytics_queue', jsonb_build_object('event', 'bench', "
                     "'properties', jsonb_build_object('n', i))) FROM generate_series(1, %s) i",
                     (n,))


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 10) - 1] if len(values) > 1 else values[0]


# -- scenarios -----------------------------------------------------------------------
def wake_latency(url: str, n: int = 500, gap_s: float = 0.01) -> Result:
    """Commit → handler start, one message at a time, fallback poll at 60 s."""
    reset(url)
    NoopProcessor.started_at = {}
    committed: dict[int, float] = {}

    def sender() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            for _ in range(n):
                row = conn.execute("SELECT public.enqueue('analytics_queue', '{}')").fetchone()
                committed[row[0]] = time.perf_counter()  # type: ignore[index]
                time.sleep(gap_s)

    async def main() -> None:
        NoopProcessor.expect(n)
        reactor = Reactor(settings(url), processors={NoopProcessor.queue: NoopProcessor})
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(reactor.run, handle_signals=False))
            await trio.to_thread.run_sync(sender)
            with trio.fail_after(30):
                await NoopProcessor.done.wait()
            reactor.stop()

    trio.run(main)
    lat = [(NoopProcessor.started_at[i] - t) * 1000 for i, t in committed.items()]
    return {"scenario": f"wake latency, {n} msgs one by one, poll 60 s",
            "p50_ms": round(pct(lat, 50), 2), "p99_ms": round(pct(lat, 99), 2),
            "max_ms": round(max(lat), 2)}


def throughput(url: str, processor: type[NoopProcessor | CountingAnalytics], n: int,
               label: str, **env: Any) -> Result:
    """A burst of n messages committed first, then drained by one process."""
    reset(url)
    fill(url, n)

    async def main() -> float:
        processor.expect(n)
        reactor = Reactor(settings(url, **env), processors={processor.queue: processor})
        async with trio.open_nursery() as nursery:
            t0 = time.perf_counter()
            await nursery.start(partial(reactor.run, handle_signals=False))
            with trio.fail_after(600):
                await processor.done.wait()
            reactor.stop()
        return time.perf_counter() - t0  # includes the last archive flush

    elapsed = trio.run(main)
    with psycopg.connect(url, autocommit=True) as conn:
        left = conn.execute("SELECT count(*) FROM pgmq.q_analytics_queue").fetchone()
    assert left == (0,), left
    return {"scenario": label, "messages": n, "seconds": round(elapsed, 2),
            "msgs_per_s": round(n / elapsed)}


def bare_loop(url: str, n: int = 20_000) -> Result:
    """pgmq.read(100) + pgmq.archive(ids) on one connection: the floor of any worker."""
    reset(url)
    fill(url, n)
    with psycopg.connect(url, autocommit=True) as conn:
        t0 = time.perf_counter()
        while True:
            msgs = queues.read(conn, "analytics_queue", 30, 100)
            if not msgs:
                break
            queues.archive(conn, "analytics_queue", [m.msg_id for m in msgs])
        elapsed = time.perf_counter() - t0
    return {"scenario": "bare loop read(100)+archive, no dispatch", "messages": n,
            "seconds": round(elapsed, 2), "msgs_per_s": round(n / elapsed)}


def old_design(url: str, n: int = 30, spread_s: float = 15.0) -> Result:
    """The Node worker: every 5 s read 10 messages, handle, archive; no NOTIFY."""
    reset(url)
    committed: dict[int, float] = {}
    handled: dict[int, float] = {}
    stop = threading.Event()

    def sender() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            for i in range(n):
                row = conn.execute("SELECT pgmq.send('analytics_queue', '{}')").fetchone()
                committed[row[0]] = time.perf_counter()  # type: ignore[index]
                time.sleep(spread_s / n * (0.5 + (i * 7919 % 100) / 100))

    def worker() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            while not stop.is_set() and len(handled) < n:
                time.sleep(5)
                msgs = queues.read(conn, "analytics_queue", 30, 10)
                for m in msgs:
                    handled[m.msg_id] = time.perf_counter()
                queues.archive(conn, "analytics_queue", [m.msg_id for m in msgs])

    threads = [threading.Thread(target=sender), threading.Thread(target=worker)]
    for t in threads:
        t.start()
    threads[0].join()
    threads[1].join(timeout=120)
    stop.set()
    lat = [(handled[i] - t) * 1000 for i, t in committed.items() if i in handled]
    return {"scenario": "old design: poll 5 s, 10 per cycle", "p50_ms": round(pct(lat, 50)),
            "p99_ms": round(pct(lat, 99)), "msgs_per_s": 2}


def smtp(url: str, n: int = 2000) -> Result:
    """Mails/s to a local SMTP server (aiosmtpd sink): one connection vs the pool."""
    import subprocess
    import sys

    from reactor.processors.email import EmailProcessor

    class CountingEmail(Counted, EmailProcessor):
        async def handle(self, job: Job[Any]) -> None:
            await super().handle(job)
            self.tick()

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "aiosmtpd", "-n", "-l",
                               f"127.0.0.1:{port}", "-c", "aiosmtpd.handlers.Sink"])
    time.sleep(1.0)
    results = []
    try:
        for pool in (1, 3, 8):
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("DELETE FROM pgmq.q_email_queue; DELETE FROM public.email_ledger")
                conn.execute(
                    "SELECT pgmq.send('email_queue', jsonb_build_object('to', 'parent' || i || "
                    "'@example.com', 'template', 'checkup_completed', 'locale', 'ru', "
                    "'variables', jsonb_build_object('full_name', 'Анна', 'assessment_id', i))) "
                    "FROM generate_series(1, %s) i", (n,))
            async def main(pool: int = pool) -> float:
                CountingEmail.expect(n)
                env = {"EMAIL_PROVIDER": "smtp", "SMTP_HOST": "127.0.0.1", "SMTP_PORT": port,
                       "SMTP_SECURITY": "none", "SMTP_FROM": "noreply@example.com",
                       "SMTP_POOL_SIZE": pool}
                reactor = Reactor(settings(url, **env), processors={"email_queue": CountingEmail})
                async with trio.open_nursery() as nursery:
                    t0 = time.perf_counter()
                    await nursery.start(partial(reactor.run, handle_signals=False))
                    with trio.fail_after(600):
                        await CountingEmail.done.wait()
                    reactor.stop()
                return time.perf_counter() - t0

            elapsed = trio.run(main)
            results.append(f"pool {pool}: {round(n / elapsed)}/s")
    finally:
        server.terminate()
        server.wait()
    return {"scenario": f"SMTP, {n} mails rendered + sent + ledgered", "mails_per_s":
            ", ".join(results)}


def feed_load(url: str, n: int = 10_000) -> Result:
    """10,000 messages drained with no feed client, then with ten (one never reading)."""
    import subprocess
    import sys

    rates = []
    dropped = 0
    for clients in (0, 10):
        reset(url)
        fill(url, n)
        feed_port = free_port()
        proc = None

        async def main(clients: int = clients, feed_port: int = feed_port) -> float:
            nonlocal proc
            NoopProcessor.expect(n)
            reactor = Reactor(settings(url, FEED_PORT=feed_port, METRICS_PORT=0),
                              processors={NoopProcessor.queue: NoopProcessor})
            reactor.drainers[NoopProcessor.queue]._wake_pending = False  # wait for the clients
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(reactor.run, handle_signals=False))
                if clients:
                    proc = await trio.lowlevel.open_process(
                        [sys.executable, "-m", "bench.feed_clients", str(feed_port),
                         str(clients - 1)], stdout=subprocess.PIPE)
                    assert proc.stdout is not None
                    assert b"READY" in await proc.stdout.receive_some()
                t0 = time.perf_counter()
                reactor.drainers[NoopProcessor.queue].wake()
                with trio.fail_after(600):
                    await NoopProcessor.done.wait()
                elapsed = time.perf_counter() - t0
                nonlocal dropped
                dropped = reactor.bus.dropped_count
                reactor.stop()
            return elapsed

        elapsed = trio.run(main)
        if proc is not None:
            proc.terminate()
        rates.append(n / elapsed)
    return {"scenario": f"{n} msgs, no-op: no feed client vs 10 (one never reading)",
            "without_msgs_per_s": round(rates[0]), "with_msgs_per_s": round(rates[1]),
            "change_pct": round((rates[1] / rates[0] - 1) * 100, 1),
            "clients_dropped": dropped}


def pdf_render(url: str, n: int = 50) -> Result:
    """Median time to render a typical checkup report (Russian, four domains)."""
    from datetime import UTC, datetime

    from reactor.paths import TEMPLATES_DIR
    from reactor.services.pdf import ReportData, Score, find_fonts, prepare_fonts, render_report

    fonts = prepare_fonts(find_fonts(Path("/usr/share/fonts/truetype/dejavu")),
                          Path(tempfile.gettempdir()) / "reactor-fonts")
    data = ReportData("a1", "Маша Петрова", "Анна Петрова", datetime.now(UTC), [
        Score("Эмоциональное состояние", 12, 20, "moderate"), Score("Поведение", 6, 20, "low"),
        Score("Внимание и концентрация", 17, 20, "high"), Score("Сон", 8, 20, "low")],
        "Маша в целом хорошо справляется; стоит обратить внимание на концентрацию.",
        ["Обсудить со специалистом трудности с концентрацией.", "Режим сна и прогулки."])
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        render_report(data, locale="ru", fonts=fonts, templates_dir=TEMPLATES_DIR,
                      app_name="Family Mind")
        times.append((time.perf_counter() - t0) * 1000)
    return {"scenario": f"PDF report render, {n} runs", "median_ms":
            round(statistics.median(times), 1), "p90_ms": round(pct(times, 90), 1)}


def machine() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    pg = psycopg.__version__
    return (f"{platform.platform()}, {os.cpu_count()} cores ({cpu}), Python "
            f"{platform.python_version()}, psycopg {pg}, trio {trio.__version__}")


SCENARIOS: dict[str, Callable[[str], Result]] = {
    "latency": wake_latency,
    "bare": bare_loop,
    "noop": lambda url: throughput(url, NoopProcessor, 20_000,
                                   "burst 20,000, no-op handler, one process"),
    "analytics": lambda url: throughput(url, CountingAnalytics, 20_000,
                                        "burst 20,000, analytics handler, one process"),
    "old": old_design,
    "smtp": smtp,
    "feed": feed_load,
    "pdf": pdf_render,
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help=f"any of {', '.join(SCENARIOS)} (default: all)")
    args = parser.parse_args()
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario {', '.join(sorted(unknown))}")
    configure_logging("warning", "json")
    cluster = PgCluster(Path(tempfile.mkdtemp(prefix="reactor-bench-")), free_port(),
                        durable=True)
    cluster.init()
    cluster.start()
    try:
        url = cluster.url()
        migrate(url)
        print(f"machine: {machine()}; PostgreSQL 15 on the same machine, fsync on\n")
        for name in args.scenarios or SCENARIOS:
            result = SCENARIOS[name](url)
            print(" | ".join(f"{k}={v}" for k, v in result.items()), flush=True)
    finally:
        cluster.remove()


if __name__ == "__main__":
    main()
