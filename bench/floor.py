"""The reactor against the floor (issue 30): a bare LISTEN + pgmq loop, beside PgQueuer.

The floor is the least a pgmq consumer can do: one psycopg connection that
LISTENs, reads 100 messages with `pgmq.read`, archives them with one
`pgmq.archive(queue, ids[])`, and waits for the next notification when the queue
is empty (bench/workers.py, `_bare_loop`). Every figure is taken for every
system in the same run, runs interleaved (A B C, A B C, …), median of 3 with
the lowest and highest in parentheses, and reported as a ratio to the floor of
the same run: the machine drifts, the ratios hold.

- `floor`: throughput and worker CPU per 1,000 jobs (a committed backlog, drained
  by a worker process of its own; CPU is user + system of that process from
  /proc, between its READY and the end of its drain), idle wake latency (one job
  every 20 ms), and latency under a steady offered load (4 producer processes, one
  connection each, one transaction per job, its commit not waiting for the WAL
  flush, for 10 s: 1,500 jobs/s in all, and 80 %
  of PgQueuer's maximum measured in the same run), p50/p95/p99/max and the rates
  the producers and the worker achieved.
- `replicas`: 1, 2 and 4 reactor processes on one database draining 100,000 jobs;
  each job done exactly once, counted three ways (handler calls summed over the
  processes, archive rows and distinct ids in the archive, and pgmq's read_ct).

With BENCH_BASELINE=<another checkout of the repository> the reactor of that
checkout runs too, as "reactor (baseline)", side by side in the same run: how
issue 30's engine changes were measured before against after.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from bench.common import (
    QUEUE,
    Child,
    Result,
    baseline_checkout,
    fill_pgmq,
    fill_pgqueuer,
    pct,
    reset_pgmq,
    reset_pgqueuer,
    spread,
)
from bench.peers import DRAIN_TIMEOUT_S, PGQUEUER, _finished, install_pgqueuer

__all__ = ["floor", "replicas"]

THROUGHPUT_JOBS = 50_000
WAKE_JOBS = 600
WAKE_GAP_S = 0.02
LOAD_S = 10.0
LOAD_PRODUCERS = 4
LOAD_RATE = 1500
REPLICA_JOBS = 100_000
# A worker's imports on a machine shared with test suites (load average 20) took > 60 s.
READY_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class System:
    label: str
    store: str  # "pgmq" or "pgqueuer"
    drain: tuple[str, ...]  # bench.workers kind and arguments after URL N
    latency: tuple[str, ...]  # bench.workers kind, then arguments after URL N OUT
    cwd: Path | None = None  # another checkout (the baseline)


BARE = System("bare LISTEN + pgmq loop (the floor)", "pgmq", ("bare",), ("bare-latency",))
# The floor's reads and archives wait for the WAL flush at every commit, which the
# reactor's take and archive do not (synchronous_commit off, for its bookkeeping only):
# where the disk flushes slowly, a wake-up of the floor waits for a flush. This one
# does not, so each figure has a floor that pays what the reactor pays.
BARE_ASYNC = System("bare LISTEN + pgmq loop, synchronous_commit=off (as the reactor's "
                    "take and archive)", "pgmq", ("bare", "async"), ("bare-latency", "async"))
REACTOR = System("reactor, defaults", "pgmq", ("reactor",), ("reactor-latency",))
PGQ = System(f"{PGQUEUER}, batch_size=1000, asyncpg + uvloop", "pgqueuer",
             ("pgqueuer", "1000"), ("pgqueuer-latency", "1000"))


def systems() -> tuple[System, ...]:
    base = baseline_checkout()
    if base is None:
        return (BARE, BARE_ASYNC, REACTOR, PGQ)
    baseline = System("reactor, defaults (baseline)", "pgmq", ("reactor",),
                      ("reactor-latency",), base)
    return (BARE, BARE_ASYNC, baseline, REACTOR, PGQ)


def _reset_fill(url: str, store: str, n: int) -> None:
    if store == "pgmq":
        reset_pgmq(url)
        if n:
            fill_pgmq(url, n)
    else:
        reset_pgqueuer(url)
        if n:
            fill_pgqueuer(url, n)


# -- throughput and CPU ------------------------------------------------------------------
def drain(url: str, system: System, n: int) -> tuple[float, float]:
    """One drain of n committed jobs: (jobs/s, worker CPU ms per 1,000 jobs)."""
    _reset_fill(url, system.store, n)
    kind, *args = system.drain
    with Child("bench.workers", kind, url, str(n), *args, quiet=True, cwd=system.cwd) as child:
        t0 = float(child.expect("READY", READY_TIMEOUT_S)[0])
        cpu = float(child.expect("CPU", DRAIN_TIMEOUT_S)[0])
        code = child.wait(60)
    end, done, left = _finished(url, system.store)
    if code != 0 or done != n or left:
        raise RuntimeError(f"{system.label}: exit {code}, {done} of {n} done, {left} left")
    return n / (end - t0), cpu * 1000 / n * 1000


# -- latency -------------------------------------------------------------------------------
def _send_statement(store: str) -> str:
    if store == "pgmq":  # what public.enqueue does: send and notify, one transaction
        return (f"SELECT pgmq.send('{QUEUE}', '{{}}'::jsonb), "
                f"pg_notify('reactor_wakeup', '{QUEUE}')")
    return ("INSERT INTO pgqueuer (priority, entrypoint, payload, status) "
            "VALUES (0, 'noop', NULL, 'queued') RETURNING id")


def latency_run(url: str, system: System, *, rate: float | None = None,
                n: int = WAKE_JOBS) -> dict[str, float]:
    """Commit → handler start, ms. rate None: n jobs one every WAKE_GAP_S from one
    connection (idle wake-ups); else LOAD_PRODUCERS processes offering `rate` jobs/s in
    all for LOAD_S. Returns the percentiles and, under load, the rates achieved."""
    _reset_fill(url, system.store, 0)
    send = _send_statement(system.store)
    if rate is not None:
        per = round(rate * LOAD_S / LOAD_PRODUCERS)
        n = per * LOAD_PRODUCERS
    kind, *args = system.latency
    with tempfile.TemporaryDirectory(prefix="reactor-bench-") as tmp:
        out = Path(tmp) / "starts.json"
        committed: dict[int, float] = {}
        start = 0.0
        with Child("bench.workers", kind, url, str(n), str(out), *args, quiet=True,
                   cwd=system.cwd) as child, psycopg.connect(url, autocommit=True) as conn:
            conn.execute(send)
            child.expect("WARM", READY_TIMEOUT_S)  # listening and warmed up
            if rate is None:
                for _ in range(n):
                    row = conn.execute(send).fetchone()
                    assert row is not None
                    committed[int(row[0])] = time.time()
                    time.sleep(WAKE_GAP_S)
            else:
                start = time.time() + 1.5  # the producers are started and connected
                producers = [Child("bench.workers", "produce", url, system.store,
                                   str(rate / LOAD_PRODUCERS), str(per), repr(start),
                                   str(Path(tmp) / f"sent-{i}.json"))
                             for i in range(LOAD_PRODUCERS)]
                try:
                    for i, producer in enumerate(producers):
                        if producer.wait(LOAD_S * 30) != 0:
                            raise RuntimeError("a producer failed")
                        sent = json.loads((Path(tmp) / f"sent-{i}.json").read_text("utf-8"))
                        committed.update({int(k): v for k, v in sent.items()})
                finally:
                    for producer in producers:
                        producer.close()
            if child.wait(300) != 0:
                raise RuntimeError(f"{system.label}: the latency worker failed")
        starts = {int(k): v for k, v in json.loads(out.read_text(encoding="utf-8")).items()}
    lat = [(starts[i] - t) * 1000 for i, t in committed.items()]
    result = {"p50": pct(lat, 50), "p95": pct(lat, 95), "p99": pct(lat, 99), "max": max(lat)}
    if rate is not None:
        result["offered"] = n / (max(committed.values()) - start)
        result["done"] = n / (max(starts.values()) - start)
    return result


def _ratio(value: float, floor: float) -> str:
    return f"{value / floor:.2f}×" if floor else "—"


def _ms(values: list[float]) -> str:
    s = spread(values)
    return f"{s.median:.2f} ({s.low:.2f}–{s.high:.2f})"


def floor(url: str, runs: int = 3) -> list[Result]:
    """Throughput, CPU per 1,000 jobs, idle wake and latency under load, against the floor."""
    install_pgqueuer(url)
    every = systems()
    results, pgq_max = _throughput(url, every, runs)
    return results + _latency(url, every, runs, pgq_max)


def floor_latency(url: str, runs: int = 3) -> list[Result]:
    """The latency half of `floor` alone; BENCH_PGQ_MAX gives PgQueuer's maximum (jobs/s)
    measured elsewhere, else it is measured here first (3 drains)."""
    install_pgqueuer(url)
    every = systems()
    given = os.environ.get("BENCH_PGQ_MAX")
    if given:
        pgq_max = float(given)
    else:
        pgq_max = statistics.median(drain(url, PGQ, THROUGHPUT_JOBS)[0] for _ in range(runs))
    return _latency(url, every, runs, pgq_max)


def _throughput(url: str, every: tuple[System, ...], runs: int) -> tuple[list[Result], float]:
    rates: dict[str, list[float]] = {}
    cpus: dict[str, list[float]] = {}
    for _ in range(runs):
        for system in every:
            rate, cpu = drain(url, system, THROUGHPUT_JOBS)
            rates.setdefault(system.label, []).append(rate)
            cpus.setdefault(system.label, []).append(cpu)
            print(f"  … {system.label}: {rate:,.0f} jobs/s, {cpu:.1f} ms CPU/1000",
                  flush=True)
    results: list[Result] = []
    floor_rate = statistics.median(rates[BARE.label])
    floor_cpu = statistics.median(cpus[BARE.label])
    async_rate = statistics.median(rates[BARE_ASYNC.label])
    async_cpu = statistics.median(cpus[BARE_ASYNC.label])
    for system in every:
        r, c = spread(rates[system.label]), spread(cpus[system.label])
        results.append({"figure": f"throughput, {THROUGHPUT_JOBS:,} jobs", "system": system.label,
                        "value": f"{r} jobs/s", "x_floor": _ratio(r.median, floor_rate),
                        "x_floor_async": _ratio(r.median, async_rate)})
        results.append({"figure": "worker CPU per 1,000 jobs (user + system)",
                        "system": system.label,
                        "value": f"{c.median:.1f} ({c.low:.1f}–{c.high:.1f}) ms",
                        "x_floor": _ratio(c.median, floor_cpu),
                        "x_floor_async": _ratio(c.median, async_cpu)})
    return results, statistics.median(rates[PGQ.label])


def _latency(url: str, every: tuple[System, ...], runs: int, pgq_max: float) -> list[Result]:
    results: list[Result] = []
    loads: list[tuple[str, float | None]] = [
        (f"idle wake, {WAKE_JOBS:,} jobs one every {WAKE_GAP_S * 1000:g} ms", None),
        (f"under load, {LOAD_RATE:,} jobs/s offered for {LOAD_S:g} s by {LOAD_PRODUCERS} "
         "producers", float(LOAD_RATE)),
        (f"under load, {round(0.8 * pgq_max):,} jobs/s offered (80 % of PgQueuer's "
         f"{pgq_max:,.0f}) for {LOAD_S:g} s by {LOAD_PRODUCERS} producers",
         round(0.8 * pgq_max)),
    ]
    for label, offered in loads:
        got: dict[str, dict[str, list[float]]] = {}
        for _ in range(runs):
            for system in every:
                res = latency_run(url, system, rate=offered)
                for k, v in res.items():
                    got.setdefault(system.label, {}).setdefault(k, []).append(v)
                print(f"  … {label}: {system.label}: "
                      + ", ".join(f"{k} {v:,.2f}" for k, v in res.items()), flush=True)
        base = {k: statistics.median(v) for k, v in got[BARE.label].items()}
        base_async = {k: statistics.median(v) for k, v in got[BARE_ASYNC.label].items()}
        for system in every:
            m = got[system.label]
            row: Result = {"figure": label, "system": system.label,
                           "value": " / ".join(_ms(m[k]) for k in ("p50", "p95", "p99", "max"))
                           + " ms (p50 / p95 / p99 / max)",
                           "x_floor": " / ".join(_ratio(statistics.median(m[k]), base[k])
                                                 for k in ("p50", "p95", "p99", "max")),
                           "x_floor_async": " / ".join(
                               _ratio(statistics.median(m[k]), base_async[k])
                               for k in ("p50", "p95", "p99", "max"))}
            if offered is not None:
                row["value"] += (f"; offered {spread(m['offered'])} jobs/s achieved, "
                                 f"done {spread(m['done'])} jobs/s")
            results.append(row)
    return results


# -- replicas ------------------------------------------------------------------------------
def replica_run(url: str, processes: int, n: int, cwd: Path | None = None) -> Result:
    """n committed jobs drained by `processes` reactor processes started together."""
    reset_pgmq(url)
    fill_pgmq(url, n)
    children = [Child("bench.workers", "reactor-replica", url, quiet=True, cwd=cwd)
                for _ in range(processes)]
    try:
        for child in children:
            child.expect("READY", READY_TIMEOUT_S)
        t0 = time.time()
        for child in children:
            child.send("go")
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        with psycopg.connect(url, autocommit=True) as conn:
            while True:
                row = conn.execute(f"SELECT count(*) FROM pgmq.a_{QUEUE}").fetchone()
                if row is not None and row[0] >= n:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{processes} replicas: {row} of {n} after the timeout")
                time.sleep(0.25)
        calls, cpu = 0, 0.0
        for child in children:
            child.send("stop")
        for child in children:
            fields = child.expect("DONE", 120)
            calls += int(fields[0])
            cpu += float(fields[1])
            if child.wait(60) != 0:
                raise RuntimeError("a replica failed")
    finally:
        for child in children:
            child.close()
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            f"SELECT extract(epoch FROM max(archived_at))::float8, count(*), "
            f"count(DISTINCT msg_id), max(read_ct), (SELECT count(*) FROM pgmq.q_{QUEUE}) "
            f"FROM pgmq.a_{QUEUE}").fetchone()
    assert row is not None
    end, archived, distinct, max_read, left = row
    once = calls == archived == distinct == n and max_read == 1 and left == 0
    if not once:
        raise RuntimeError(f"{processes} replicas: not exactly once: {calls} handler calls, "
                           f"{archived} archived ({distinct} distinct), max read_ct "
                           f"{max_read}, {left} left")
    return {"rate": n / (float(end) - t0), "cpu": cpu * 1000 / n * 1000, "calls": calls,
            "archived": archived, "max_read": max_read}


def replicas(url: str, runs: int = 3, n: int = REPLICA_JOBS) -> list[Result]:
    """1, 2 and 4 reactor processes draining n jobs; every job exactly once."""
    which = [(s.label, s.cwd) for s in systems() if s.drain[0] == "reactor"]
    got: dict[tuple[str, int], list[Result]] = {}
    for _ in range(runs):
        for label, cwd in which:
            for k in (1, 2, 4):
                res = replica_run(url, k, n, cwd)
                got.setdefault((label, k), []).append(res)
                print(f"  … {label}, {k} processes: {res['rate']:,.0f} jobs/s, "
                      f"{res['cpu']:.1f} ms CPU/1000 (all processes)", flush=True)
    results: list[Result] = []
    for label, _ in which:
        one = statistics.median(r["rate"] for r in got[(label, 1)])
        for k in (1, 2, 4):
            rs = got[(label, k)]
            rate = spread([r["rate"] for r in rs])
            cpu = spread([r["cpu"] for r in rs])
            results.append({
                "system": label, "processes": k, "jobs": f"{n:,}",
                "jobs_per_s": str(rate), "x_one_process": f"{rate.median / one:.2f}×",
                "cpu_ms_per_1000_all_processes": f"{cpu.median:.1f} ({cpu.low:.1f}–"
                                                 f"{cpu.high:.1f})",
                "exactly_once": f"{runs} of {runs} runs: handler calls = archived = distinct "
                                f"ids = {n:,}, max read_ct 1, none left"})
    return results
