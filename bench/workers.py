"""The workers the peers scenario races, each run in a process of its own.

    python -m bench.workers reactor URL N [KEY=VALUE ...]     drain N no-op jobs
    python -m bench.workers bare URL N [durable|async]        the bare LISTEN + pgmq loop
    python -m bench.workers pgqueuer URL N BATCH              PgQueuer, drain mode
    python -m bench.workers reactor-latency URL N OUT
    python -m bench.workers bare-latency URL N OUT [durable|async]
    python -m bench.workers pgqueuer-latency URL N OUT BATCH
    python -m bench.workers reactor-replica URL               drain until told to stop
    python -m bench.workers produce URL pgmq|pgqueuer RATE N START OUT
    python -m bench.workers memory URL N1 N2                  RSS after N1 and N2 jobs

Throughput workers print `READY <unix time>` taken before they connect (the
start of the clock), then `CPU <seconds>` (user + system CPU of the process,
/proc/self/stat, from READY until the jobs are drained and recorded) and exit;
the parent reads the end of the clock from the database (the last archive or
completion log row). Latency workers print `WARM` once they have handled a
first job, record the wall-clock start of every later job and write
`{id: start}` as JSON to OUT. A producer sends N jobs at RATE a second from
the unix time START, each in a transaction of its own (pgmq.send and
pg_notify for pgmq, PgQueuer's INSERT and its trigger's NOTIFY), and writes
`{id: commit time}` to OUT.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import psycopg
import trio

from bench.common import QUEUE, cpu_s, rss_kib

__all__ = ["main"]


def say(*fields: object) -> None:
    print(*fields, flush=True)


# -- the reactor -------------------------------------------------------------------------
def reactor_app(url: str, extra: dict[str, str]) -> Any:
    """Defaults (LOG_LEVEL=info included), except: no HTTP/feed ports to collide on,
    fallback poll 60 s."""
    from reactor.clinic.app import build
    from reactor.clinic.settings import load_settings

    env: dict[str, Any] = {"DATABASE_URL": url, "WORKER_INTERVAL_MS": 60_000,
                           "FEED_PORT": 0, "METRICS_PORT": 0}
    return build(load_settings(_env_file=None, **(env | extra)))


def reactor_runner(url: str, target: int, extra: dict[str, str], *,
                   on_job: Any = None, marks: tuple[int, ...] = (),
                   until: Callable[[], Any] | None = None,
                   counted: list[int] | None = None) -> Callable[[], None]:
    """A function that drains `target` jobs with a no-op processor (default
    concurrency), then stops. Everything is imported and built here, so the
    clock started after this measures the work, not Python's imports.

    on_job(msg_id, count) is called at the start of every job; at each count in
    marks the process prints `RSS <count> <KiB>`. With `until` (an async function)
    it drains until that returns instead of until `target` jobs, and appends the
    number of handler calls to `counted`.
    """
    from reactor.engine.logs import configure_logging
    from reactor.engine.processor import Job, MessageModel, Processor
    from reactor.engine.runtime import Reactor

    class AnyMessage(MessageModel):
        pass

    # CONCURRENCY=N (a bench knob, not a setting) overrides the processor's concurrency.
    concurrency = int(extra.pop("CONCURRENCY", Processor.concurrency))

    class Noop(Processor[AnyMessage]):
        queue = QUEUE
        model = AnyMessage
        count: ClassVar[int] = 0
        done: ClassVar[trio.Event]

        async def handle(self, job: Job[AnyMessage]) -> None:
            cls = type(self)
            cls.count += 1
            if on_job is not None:
                on_job(job.msg_id, cls.count)
            if cls.count in marks:
                say("RSS", cls.count, rss_kib())
            if cls.count == target:
                cls.done.set()

    Noop.concurrency = concurrency
    app = reactor_app(url, extra)
    configure_logging(app.settings.log_level, "json")  # as `reactor run` does

    async def main() -> None:
        Noop.done = trio.Event()
        reactor = Reactor(app, processors={QUEUE: Noop})
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(reactor.run, handle_signals=False))
            await (Noop.done.wait() if until is None else until())
            reactor.stop()  # archives what finished, then returns
        if counted is not None:
            counted.append(Noop.count)

    return partial(trio.run, main)


def count_calls() -> Callable[[], dict[str, int]]:
    """Count, from now on, what a drain costs the reactor process: thread hops
    (trio.to_thread.run_sync), statements (psycopg execute, in a thread or on the
    trio-native connection) and their wall time,
    events published, and GC generation-0 collections (each one means ~700 more container objects
    allocated than freed). Returns a function that reads the counts."""
    import gc

    import psycopg

    from reactor.engine.events import EventBus

    counts = {"thread_hops": 0, "statements": 0, "events": 0, "statement_us": 0}

    def counting(owner: Any, name: str, key: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[key] += 1
            if key != "statements":
                return original(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:  # wall time of the round trip, in the worker thread
                counts["statement_us"] += int((time.perf_counter() - t0) * 1e6)

        setattr(owner, name, wrapper)

    def counting_async(owner: Any, name: str, key: str) -> None:
        original = getattr(owner, name)

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[key] += 1
            t0 = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:  # wall time of the round trip, on the trio thread
                counts["statement_us"] += int((time.perf_counter() - t0) * 1e6)

        setattr(owner, name, wrapper)

    counting(trio.to_thread, "run_sync", "thread_hops")
    counting(psycopg.Connection, "execute", "statements")
    counting_async(psycopg.AsyncCursor, "execute", "statements")  # Database.fetch
    counting(EventBus, "publish", "events")
    gen0 = gc.get_stats()[0]["collections"]
    return lambda: counts | {"gc_gen0_collections": gc.get_stats()[0]["collections"] - gen0}


def reactor_throughput(url: str, n: str, *pairs: str) -> None:
    """With BENCH_HOLD=1 it waits for a line on stdin after `HOLD` (so a profiler
    can attach first); with BENCH_COUNT=1 it prints `COUNTS k=v ...` at the end."""
    import os

    extra = dict(pair.split("=", 1) for pair in pairs)
    run = reactor_runner(url, int(n), extra)
    read_counts = count_calls() if os.environ.get("BENCH_COUNT") else None
    if os.environ.get("BENCH_HOLD"):
        say("HOLD")
        sys.stdin.readline()
    say("READY", repr(time.time()))
    cpu0 = cpu_s()
    run()
    say("CPU", cpu_s() - cpu0)
    if read_counts is not None:
        say("COUNTS", *(f"{k}={v}" for k, v in read_counts().items()))


def reactor_latency(url: str, n: str, out: str) -> None:
    starts: dict[int, float] = {}

    def on_job(msg_id: int, count: int) -> None:
        if count == 1:
            say("WARM")
        else:
            starts[msg_id] = time.time()

    reactor_runner(url, int(n) + 1, {}, on_job=on_job)()
    Path(out).write_text(json.dumps(starts), encoding="utf-8")


def reactor_replica(url: str, *pairs: str) -> None:
    """One of several reactor processes on one database: `READY` once built, drains
    from `go` (a line on stdin) until `stop`, then prints `DONE <handler calls> <CPU s>`
    (CPU from go to the end of its last archive)."""
    extra = dict(pair.split("=", 1) for pair in pairs)
    counted: list[int] = []

    async def until_stop() -> None:
        await trio.to_thread.run_sync(sys.stdin.readline)

    run = reactor_runner(url, 0, extra, until=until_stop, counted=counted)
    say("READY", repr(time.time()))
    sys.stdin.readline()  # go
    cpu0 = cpu_s()
    run()
    say("DONE", counted[0], cpu_s() - cpu0)


def memory(url: str, n1: str, n2: str) -> None:
    reactor_runner(url, int(n2), {}, marks=(int(n1), int(n2)))()


# -- the bare pgmq loop ----------------------------------------------------------------------
def _bare_loop(url: str, target: int, commit: str = "durable",
               on_read: Callable[[list[int]], None] | None = None) -> None:
    """The floor: one psycopg connection that LISTENs on the reactor's channel, reads
    100 messages with pgmq.read(q, 30, 100), archives them with one
    pgmq.archive(q, ids[]), and, when a read finds nothing, waits for the next
    notification. Returns once `target` messages are archived. No dispatch, no
    bookkeeping: what any pgmq consumer has to do. commit=async turns
    synchronous_commit off for the session, as the reactor's archive+read does."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("LISTEN reactor_wakeup")
        if commit == "async":  # what the reactor does for its own bookkeeping
            conn.execute("SET synchronous_commit = off")
        done = 0
        while done < target:
            rows = conn.execute("SELECT * FROM pgmq.read(%s, 30, 100)", (QUEUE,)).fetchall()
            if not rows:
                # Notifications that came while it was busy are returned at once (the
                # read after them finds nothing and it waits again); a timeout only
                # guards against a lost one.
                for _ in conn.notifies(timeout=5.0, stop_after=1):
                    pass
                continue
            ids = [r[0] for r in rows]
            if on_read is not None:
                on_read(ids)
            conn.execute("SELECT pgmq.archive(%s, %s::bigint[])", (QUEUE, ids))
            done += len(ids)


def bare(url: str, n: str, commit: str = "durable") -> None:
    """Drain n committed messages with the bare LISTEN + pgmq loop."""
    say("READY", repr(time.time()))
    cpu0 = cpu_s()
    _bare_loop(url, int(n), commit)
    say("CPU", cpu_s() - cpu0)


def bare_latency(url: str, n: str, out: str, commit: str = "durable") -> None:
    starts: dict[int, float] = {}
    seen = 0

    def on_read(ids: list[int]) -> None:
        nonlocal seen
        now = time.time()
        for msg_id in ids:
            seen += 1
            if seen == 1:
                say("WARM")
            else:
                starts[msg_id] = now

    _bare_loop(url, int(n) + 1, commit, on_read=on_read)
    Path(out).write_text(json.dumps(starts), encoding="utf-8")


# -- the producers of the latency-under-load runs --------------------------------------------
def produce(url: str, store: str, rate: str, n: str, start: str, out: str) -> None:
    """n jobs at `rate` a second from unix time `start` (late ones go at once: the rate
    achieved is what the parent reports), one transaction each. Its commits do not wait
    for the WAL flush (synchronous_commit off for the producer's session only): with
    fsync on, this VM's disk flushes a few hundred commits a second, which would cap
    the offered load far below 1,500 jobs/s; the workers' own commits keep their
    settings (durable for the bare loop and PgQueuer)."""
    send = (f"SELECT pgmq.send('{QUEUE}', '{{}}'::jsonb), "
            f"pg_notify('reactor_wakeup', '{QUEUE}')") if store == "pgmq" else (
        "INSERT INTO pgqueuer (priority, entrypoint, payload, status) "
        "VALUES (0, 'noop', NULL, 'queued') RETURNING id")
    gap = 1.0 / float(rate)
    t0 = float(start)
    committed: dict[int, float] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        for i in range(int(n)):
            delay = t0 + i * gap - time.time()
            if delay > 0:
                time.sleep(delay)
            row = conn.execute(send).fetchone()
            assert row is not None
            committed[int(row[0])] = time.time()
    Path(out).write_text(json.dumps(committed), encoding="utf-8")


# -- PgQueuer ----------------------------------------------------------------------------------
async def _pgqueuer(url: str, batch: int, stop_after: int | None,
                    on_job: Any = None) -> None:
    """PgQueuer as its docs run it: asyncpg, one QueueManager, one entrypoint.
    (Imported by the caller before the clock starts.)"""
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries
    from pgqueuer.types import QueueExecutionMode

    conn = await asyncpg.connect(url)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))
    count = 0

    @qm.entrypoint("noop")
    async def noop(job: Job) -> None:
        nonlocal count
        count += 1
        if on_job is not None:
            on_job(job.id, count)
        if stop_after is not None and count >= stop_after:
            qm.shutdown.set()

    mode = QueueExecutionMode.drain if stop_after is None else QueueExecutionMode.continuous
    try:
        await qm.run(batch_size=batch, mode=mode)
    finally:
        await conn.close()


def _uvloop_run(coro: Any) -> None:
    import uvloop

    uvloop.run(coro)


def pgqueuer_throughput(url: str, n: str, batch: str) -> None:
    del n  # drain mode stops when the queue is empty
    import asyncpg  # noqa: F401  (import before the clock)
    import pgqueuer.qm  # noqa: F401
    import uvloop  # noqa: F401

    say("READY", repr(time.time()))
    cpu0 = cpu_s()
    _uvloop_run(_pgqueuer(url, int(batch), None))
    say("CPU", cpu_s() - cpu0)


def pgqueuer_latency(url: str, n: str, out: str, batch: str) -> None:
    starts: dict[int, float] = {}

    def on_job(job_id: int, count: int) -> None:
        if count == 1:
            say("WARM")
        else:
            starts[int(job_id)] = time.time()

    _uvloop_run(_pgqueuer(url, int(batch), int(n) + 1, on_job))
    Path(out).write_text(json.dumps(starts), encoding="utf-8")


def pgqueuer_install(url: str) -> None:
    """PgQueuer's tables, durable (all logged, like pgmq's), as `pgq install` makes them."""
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    async def install() -> None:
        conn = await asyncpg.connect(url)
        try:
            queries = Queries(AsyncpgDriver(conn))
            if not await queries.schema_is_installed():
                await queries.install()
        finally:
            await conn.close()

    _uvloop_run(install())
    say("INSTALLED")


KINDS: dict[str, Callable[..., None]] = {
    "pgqueuer-install": pgqueuer_install,
    "reactor": reactor_throughput,
    "reactor-latency": reactor_latency,
    "memory": memory,
    "bare": bare,
    "bare-latency": bare_latency,
    "reactor-replica": reactor_replica,
    "produce": produce,
    "pgqueuer": pgqueuer_throughput,
    "pgqueuer-latency": pgqueuer_latency,
}


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] not in KINDS:
        sys.exit(f"usage: python -m bench.workers {{{'|'.join(KINDS)}}} URL ...")
    KINDS[sys.argv[1]](*sys.argv[2:])


if __name__ == "__main__":
    main()
