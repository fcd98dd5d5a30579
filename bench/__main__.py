"""`python -m bench [scenario ...]`: the reactor beside its peers, mail, PDF, memory.

Each scenario runs against a private Postgres cluster of its own, with stock
durability (fsync on), on this machine, started under a temporary directory and
removed afterwards.
Prints Markdown tables to paste into docs/benchmarks.md. Scenarios:

- peers: jobs/s of PgQueuer, the bare pgmq loop and the reactor (bench/peers.py)
- wake: commit → handler start, one job every 20 ms, PgQueuer vs the reactor
- floor: against the bare LISTEN + pgmq loop: throughput, CPU per 1,000 jobs, idle
  wake and latency under load (bench/floor.py)
- replicas: 1, 2 and 4 reactor processes on one database, every job exactly once
- mail: the email pipeline against a 40 ms relay and a local sink (bench/mail.py)
- mail-baseline: with BENCH_BASELINE=<another checkout>, its pipeline and this one's
  to the local sink, side by side (interleaved, 3 rounds)
- pdf: render time of the standard and the largest report
- idle: CPU of `reactor run` with nothing to do
- analytics, old, feed: the analytics handler, the old Node design, feed clients
- memory: RSS after 100,000 and 1,000,000 jobs (a few minutes)
- profile (only when named): per-message counts and a py-spy profile of a drain, then
  of the mail pipeline (profile-mail: that one alone)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import psycopg
import trio

from bench import floor, mail, peers, profile, resources
from bench.common import MissingDependency, baseline_checkout
from reactor.clinic.analytics import AnalyticsProcessor
from reactor.clinic.app import build
from reactor.clinic.schema import migrate
from reactor.clinic.settings import load_settings
from reactor.engine import queues
from reactor.engine.logs import configure_logging
from reactor.engine.pgcluster import PgCluster, free_port
from reactor.engine.processor import Job, MessageModel, Processor
from reactor.engine.runtime import Reactor

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


def app(url: str, **env: Any) -> Any:
    """The clinic app on these settings (the benchmarks drain their own processors)."""
    return build(load_settings(_env_file=None, DATABASE_URL=url, WORKER_INTERVAL_MS=60_000,
                               LOG_LEVEL="warning", **env))


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


# -- scenarios ---------------------------------------------------------------------------
def throughput(url: str, processor: type[NoopProcessor | CountingAnalytics], n: int,
               label: str, **env: Any) -> Result:
    """A burst of n messages committed first, then drained by one process."""
    reset(url)
    fill(url, n)

    async def main() -> float:
        processor.expect(n)
        reactor = Reactor(app(url, **env), processors={processor.queue: processor})
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
            reactor = Reactor(app(url, FEED_PORT=feed_port, METRICS_PORT=0),
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


def pg_version(url: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]).split()[0] if row else "?"


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


SCENARIOS: dict[str, Callable[[str], Result | list[Result]]] = {
    "peers": peers.throughput,
    "wake": peers.latency,
    "floor": floor.floor,
    "floor-latency": floor.floor_latency,
    "replicas": floor.replicas,
    "mail": mail.mail,
    "mail-baseline": mail.side_by_side,
    "pdf": resources.pdf,
    "idle": resources.idle_cpu,
    "analytics": lambda url: throughput(url, CountingAnalytics, 20_000,
                                        "burst 20,000, analytics handler, one process"),
    "old": old_design,
    "feed": feed_load,
    "memory": resources.memory,
    "profile": profile.profile,
    "profile-mail": profile.profile_mail,
}
# Not in a plain `make bench`: profiling is for whoever changes the drainer; floor-latency
# is a part of floor.
LONG = {"profile", "profile-mail", "floor-latency"}
# Run when BENCH_BASELINE names another checkout to compare with.
BASELINE = {"mail-baseline"}


def table(results: list[Result]) -> str:
    """Results as a Markdown table (the keys of the first row are the columns)."""
    columns = list(dict.fromkeys(k for row in results for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in results]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help=f"any of {', '.join(SCENARIOS)} (default: all but "
                        f"{', '.join(sorted(LONG))})")
    args = parser.parse_args()
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario {', '.join(sorted(unknown))}")
    configure_logging("warning", "json")
    first = True
    default = [s for s in SCENARIOS if s not in LONG
               and (s not in BASELINE or baseline_checkout() is not None)]
    for name in args.scenarios or default:
        # A cluster of its own for each scenario: what one leaves behind (WAL to
        # checkpoint, tables for autovacuum) must not weigh on the next one's figures.
        with _private_cluster() as url:
            if first:
                print(f"machine: {machine()}; PostgreSQL {pg_version(url)} on the same "
                      f"machine, fsync on, a fresh cluster for each scenario; load average "
                      f"at start {os.getloadavg()[0]:.2f}\n", flush=True)
                first = False
            started = time.monotonic()
            try:
                result = SCENARIOS[name](url)
            except MissingDependency as exc:
                parser.exit(2, f"python -m bench {name}: {exc}\n")
            rows = result if isinstance(result, list) else [result]
            print(f"### {name} ({time.monotonic() - started:.0f} s)\n\n{table(rows)}\n",
                  flush=True)


@contextmanager
def _private_cluster() -> Iterator[str]:
    """A migrated PostgreSQL 15 with stock durability (fsync on), removed afterwards."""
    cluster = PgCluster(Path(tempfile.mkdtemp(prefix="reactor-bench-")), free_port(),
                        durable=True)
    cluster.init()
    cluster.start()
    try:
        url = cluster.url()
        migrate(url)
        yield url
    finally:
        cluster.remove()

if __name__ == "__main__":
    main()
