"""The reactor beside PgQueuer and the bare pgmq loop: throughput and wake latency.

Method (the same for every worker): N no-op jobs are committed first; the
worker runs in a process of its own; the clock starts when that process is
ready, before it connects, and stops at the last completion as the database
recorded it (`archived_at` of the last pgmq archive, `created` of the last
PgQueuer log row), so a worker cannot stop its own clock early. Each figure
is the median of 3 runs, interleaved so that drift on a shared machine hits
every worker alike; the spread is the lowest and highest of the 3.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from bench.common import (
    QUEUE,
    Child,
    Result,
    Spread,
    fill_pgmq,
    fill_pgqueuer,
    pct,
    require,
    reset_pgmq,
    reset_pgqueuer,
    spread,
)

__all__ = ["latency", "throughput"]

PGQUEUER = "PgQueuer 1.6.0"
DRAIN_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Worker:
    label: str
    kind: str  # a bench.workers kind
    args: tuple[str, ...]
    store: str  # "pgmq" or "pgqueuer": where its jobs live and where the clock stops
    every_size: bool = True  # False: only at the smallest size (to keep the run short)


PGQ_BEST = Worker(f"{PGQUEUER}, batch_size=1000, asyncpg + uvloop", "pgqueuer", ("1000",),
                  "pgqueuer")
PGQ_DEFAULT = Worker(f"{PGQUEUER}, batch_size=10 (its default)", "pgqueuer", ("10",),
                     "pgqueuer", every_size=False)
BARE = Worker("bare loop: LISTEN, pgmq.read(q, 30, 100) + pgmq.archive(q, ids), one "
              "psycopg connection, no dispatch", "bare", (), "pgmq")
BARE_ASYNC = Worker("the same bare loop with synchronous_commit=off (the reactor's "
                    "bookkeeping commits so)", "bare", ("async",), "pgmq")
REACTOR = Worker("reactor, defaults (MAX_TASKS_PER_CYCLE=100, LOG_LEVEL=info)", "reactor",
                 (), "pgmq")
REACTOR_500 = Worker("reactor, MAX_TASKS_PER_CYCLE=500", "reactor",
                     ("MAX_TASKS_PER_CYCLE=500",), "pgmq", every_size=False)
WORKERS = (PGQ_BEST, PGQ_DEFAULT, BARE, BARE_ASYNC, REACTOR, REACTOR_500)


def install_pgqueuer(url: str) -> None:
    for module, package in (("pgqueuer", "PgQueuer"), ("asyncpg", "asyncpg"),
                            ("uvloop", "uvloop")):
        require(module, package)
    with Child("bench.workers", "pgqueuer-install", url) as child:
        child.expect("INSTALLED", 120)


def _finished(url: str, store: str) -> tuple[float, int, int]:
    """(unix time of the last completion, jobs completed, jobs left)."""
    if store == "pgmq":
        query = (f"SELECT extract(epoch FROM max(archived_at))::float8, count(*), "
                 f"(SELECT count(*) FROM pgmq.q_{QUEUE}) FROM pgmq.a_{QUEUE}")
    else:
        query = ("SELECT extract(epoch FROM max(created))::float8, count(*), "
                 "(SELECT count(*) FROM pgqueuer) FROM pgqueuer_log WHERE status = 'successful'")
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return float(row[0] or 0), int(row[1]), int(row[2])


def drain_once(url: str, worker: Worker, n: int) -> float:
    """One run: fill, start the worker, wait for it to exit; jobs per second."""
    if worker.store == "pgmq":
        reset_pgmq(url)
        fill_pgmq(url, n)
    else:
        reset_pgqueuer(url)
        fill_pgqueuer(url, n)
    with Child("bench.workers", worker.kind, url, str(n), *worker.args, quiet=True) as child:
        t0 = float(child.expect("READY", 60)[0])
        code = child.wait(DRAIN_TIMEOUT_S)
    end, done, left = _finished(url, worker.store)
    if code != 0 or done != n or left:
        raise RuntimeError(f"{worker.label}: exit {code}, {done} of {n} done, {left} left")
    return n / (end - t0)


def throughput(url: str, sizes: tuple[int, ...] = (20_000, 100_000), runs: int = 3,
               workers: tuple[Worker, ...] = WORKERS) -> list[Result]:
    """Jobs/s per worker and size (median of `runs`), with ratios to PgQueuer and bare."""
    install_pgqueuer(url)
    rates: dict[tuple[str, int], list[float]] = {}
    for size in sizes:
        for _ in range(runs):
            for worker in workers:
                if worker.every_size or size == min(sizes):
                    rate = drain_once(url, worker, size)
                    rates.setdefault((worker.label, size), []).append(rate)
                    print(f"  … {worker.label} {size:,}: {rate:,.0f}/s", flush=True)
    results: list[Result] = []
    for size in sizes:
        best = spread(rates[(PGQ_BEST.label, size)]).median
        floor = spread(rates[(BARE.label, size)]).median
        for worker in workers:
            if (worker.label, size) not in rates:
                continue
            s: Spread = spread(rates[(worker.label, size)])
            results.append({"worker": worker.label, "jobs": size, "jobs_per_s": str(s),
                            "x_pgqueuer_best": round(s.median / best, 2),
                            "x_bare_loop": round(s.median / floor, 2)})
    return results


def latency_once(url: str, kind: str, args: tuple[str, ...], n: int, gap_s: float) -> list[float]:
    """Commit → handler start, ms, for n jobs sent one every gap_s."""
    pgqueuer = kind.startswith("pgqueuer")
    reset_pgqueuer(url) if pgqueuer else reset_pgmq(url)
    send = ("INSERT INTO pgqueuer (priority, entrypoint, payload, status) "
            "VALUES (0, 'noop', NULL, 'queued') RETURNING id") if pgqueuer \
        else f"SELECT public.enqueue('{QUEUE}', '{{}}')"
    with tempfile.TemporaryDirectory(prefix="reactor-bench-") as tmp:
        out = Path(tmp) / "starts.json"
        with Child("bench.workers", kind, url, str(n), str(out), *args, quiet=True) as child, \
                psycopg.connect(url, autocommit=True) as conn:
            conn.execute(send)
            child.expect("WARM", 120)  # listening and warmed up
            committed: dict[int, float] = {}
            for _ in range(n):
                row = conn.execute(send).fetchone()
                assert row is not None
                committed[int(row[0])] = time.time()
                time.sleep(gap_s)
            code = child.wait(120)
            if code != 0:
                raise RuntimeError(f"{kind}: exit {code}")
        starts = {int(k): v for k, v in json.loads(out.read_text(encoding="utf-8")).items()}
    return [(starts[i] - t) * 1000 for i, t in committed.items()]


def latency(url: str, n: int = 2000, gap_s: float = 0.02, runs: int = 3) -> list[Result]:
    """Wake latency p50/p99 of each worker (fallback poll 60 s for the reactor).

    2,000 wake-ups a run, so that a run's p99 rests on its 20 slowest: with 500 it
    was the 5th slowest, set by one or two of the VM's scheduling hiccups (each
    delays a few consecutive wake-ups of every worker alike) and flipped between
    runs. The runs interleave the workers, so a noisy minute hits each of them."""
    install_pgqueuer(url)
    cases = [(PGQ_BEST.label, "pgqueuer-latency", ("1000",)),
             (PGQ_DEFAULT.label, "pgqueuer-latency", ("10",)),
             ("reactor, defaults, WORKER_INTERVAL_MS=60000",
              "reactor-latency", ()),
             ("bare LISTEN + pgmq loop", "bare-latency", ())]
    p50: dict[str, list[float]] = {}
    p99: dict[str, list[float]] = {}
    for _ in range(runs):
        for label, kind, args in cases:
            lat = latency_once(url, kind, args, n, gap_s)
            p50.setdefault(label, []).append(pct(lat, 50))
            p99.setdefault(label, []).append(pct(lat, 99))
    return [{"worker": label, "jobs": f"{n}, one every {gap_s * 1000:g} ms",
             "p50_ms": _ms(p50[label]), "p99_ms": _ms(p99[label])} for label, _, _ in cases]


def _ms(values: list[float]) -> str:
    s = spread(values)
    return f"{s.median:.2f} ({s.low:.2f}–{s.high:.2f})"
