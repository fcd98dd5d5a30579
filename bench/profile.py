"""Where a reactor drain spends its time: counts per message, then a py-spy profile.

The mail pipeline is profiled the same way (py-spy on this process while
it sends to the zero-latency sink).

Pass 1 counts, inside the worker, the thread hops, statements, events and
GC generation-0 collections per message, and, from Postgres, transactions
per message. Pass 2 drains the same N again under py-spy (attached before
the clock starts, sampling idle threads too, so shares are of wall time) and ranks
the frames by samples. The raw profile is kept for flame graphs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from bench.common import Child, MissingDependency, Result, fill_pgmq, reset_pgmq

__all__ = ["profile", "profile_mail"]

# Inclusive shares worth knowing, by a substring of py-spy's frame name.
WATCH = {
    "job handling (Drainer._process)": "Drainer._process ",
    "read loop (Drainer._read_loop)": "Drainer._read_loop ",
    "events (EventBus.publish)": "EventBus.publish ",
    "metrics sink (Metrics.observe)": "Metrics.observe ",
    "SQL in worker threads (Database._call)": "Database._call ",
    "rows → Message (queues._messages)": "_messages ",
    "trio: thread hand-off (to_thread / thread cache)": "_thread_cache",
    "trio: scheduler (unrolled_run, not in a task)": "unrolled_run (trio/_core/_run.py:2",
}


def _py_spy() -> str:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise MissingDependency("py-spy is not installed: run `make bench`, or "
                                "pip install -e '.[bench]'")
    return spy


def _xacts(url: str) -> int:
    time.sleep(1.5)  # backends publish their statistics within a second
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database "
                           "WHERE datname = current_database()").fetchone()
    return int(row[0]) if row else 0


def _count(url: str, n: int) -> list[Result]:
    reset_pgmq(url)
    fill_pgmq(url, n)
    before = _xacts(url)
    with Child("bench.workers", "reactor", url, str(n), env={"BENCH_COUNT": "1"},
               quiet=True) as child:
        t0 = float(child.expect("READY", 60)[0])
        counts = dict(field.split("=") for field in child.expect("COUNTS", 1200))
        elapsed = time.time() - t0
        child.wait(60)
    per = {k: round(int(v) / n, 3) for k, v in counts.items()}
    per["ms_per_statement"] = round(int(counts["statement_us"]) / 1000
                                    / max(1, int(counts["statements"])), 2)
    # Net container objects left per message ≈ collections × 700 / n (gross allocations
    # are not counted: CPython has no counter for them).
    per["gc_gen0_collections_in_drain"] = int(counts["gc_gen0_collections"])
    del per["gc_gen0_collections"]
    per["transactions"] = round((_xacts(url) - before - 1) / n, 3)
    return [{"what": "jobs/s while counting", "value": round(n / elapsed)}] + [
        {"what": f"per message: {k}" if not k.startswith(("ms_", "gc_")) else k, "value": v}
        for k, v in per.items()]


def _state(main: bool, frames: list[str]) -> str:
    leaf = frames[-1]
    if main:
        return "waiting (epoll: for a worker thread or a wake-up)" \
            if "EpollIOManager.get_events" in leaf else "running Python"
    if "WorkerThread._work" in leaf:
        return "idle, waiting for work"
    if any("Connection.wait" in f or "PGconn" in f for f in frames[-3:]):
        return "waiting for Postgres"
    return "running Python"


MAIL_WATCH = {
    "the SMTP conversation, handed to the asyncio thread (SmtpConnection.sendmail)":
        "SmtpConnection.sendmail ",
    "hand-offs to the asyncio thread (AsyncioThread._call)": "AsyncioThread._call ",
    "waiting for a pooled connection, NOOP or connect (SmtpMailer._checkout)":
        "SmtpMailer._checkout ",
    "MIME build (build_message)": "build_message ",
    "template render (EmailRenderer.render)": "EmailRenderer.render ",
    "ledger verdicts, group-committed (EmailProcessor._record_sent)":
        "EmailProcessor._record_sent ",
    "statements on trio-native connections (Database.fetch)": "Database.fetch ",
    "database hops to worker threads (Database.run)": "Database.run ",
    "events (EventBus.publish)": "EventBus.publish ",
}


def _summarize(raw: Path, top: int, watch: dict[str, str] = WATCH) -> list[Result]:
    """Wall-time shares per thread and state, what the trio thread runs, its top frames."""
    states: Counter[tuple[str, str]] = Counter()
    per_thread: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for line in raw.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        n = int(count)
        main = frames[0].endswith("MainThread")
        if main and not any(f.startswith("run (trio/_core/_run.py") for f in frames):
            continue  # before the drain started (held for py-spy) or after it ended
        thread = "trio thread" if main else "worker threads (all)"
        state = _state(main, frames)
        states[(thread, state)] += n
        per_thread[thread] += n
        if main and state == "running Python":
            joined = ";".join(frames[1:]) + " "
            for label, needle in watch.items():
                if needle in joined:
                    inclusive[label] += n
            leaves[frames[-1]] += n
    rows: list[Result] = [
        {"what": f"{thread}: {state}",
         "value": f"{c / per_thread[thread] * 100:.1f} % of its wall time"}
        for (thread, state), c in sorted(states.items())]
    main_total = per_thread["trio thread"] or 1
    rows += [{"what": f"trio thread, inside {label}",
              "value": f"{inclusive[label] / main_total * 100:.1f} %"} for label in watch]
    rows += [{"what": f"trio thread, self: {frame}", "value": f"{c / main_total * 100:.1f} %"}
             for frame, c in leaves.most_common(top)]
    return rows


def profile(url: str, n: int = 20_000, rate: int = 500, top: int = 25) -> list[Result]:
    """Counts per message, then py-spy samples of a drain of n no-op jobs."""
    spy = _py_spy()
    rows = _count(url, n)
    reset_pgmq(url)
    fill_pgmq(url, n)
    raw = Path(tempfile.gettempdir()) / f"reactor-drain-profile-{int(time.time())}.txt"
    with Child("bench.workers", "reactor", url, str(n), env={"BENCH_HOLD": "1"},
               quiet=True) as child:
        child.expect("HOLD", 60)
        sampler = subprocess.Popen(
            [spy, "record", "--pid", str(child.proc.pid), "--threads", "--idle",
             "--rate", str(rate), "--format", "raw", "-o", str(raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(2)  # py-spy attached
            child.send("go")
            child.expect("READY", 60)
            if child.wait(1200) != 0:
                raise RuntimeError("the profiled worker failed")
            sampler.wait(60)
        finally:
            if sampler.poll() is None:
                sampler.terminate()
                sampler.wait()
    rows.append({"what": "raw py-spy profile (flamegraph.pl / speedscope input)",
                 "value": str(raw)})
    return rows + _summarize(raw, top) + profile_mail(url)


def profile_mail(url: str, pool: int = 3, n: int = 3000, top: int = 15) -> list[Result]:
    """py-spy on the reactor process while it sends n mails to the zero-latency sink, at
    the default SMTP_POOL_SIZE."""
    from bench.mail import _run

    spy = _py_spy()
    raw = Path(tempfile.gettempdir()) / f"reactor-mail-profile-{int(time.time())}.txt"

    @contextmanager
    def sampled(pid: int) -> Iterator[None]:
        sampler = subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--threads", "--idle", "--nonblocking",
             "--rate", "200", "--format", "raw", "-o", str(raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(2)  # py-spy attached
            yield
            sampler.wait(60)  # it writes its output when the process ends
        finally:
            if sampler.poll() is None:
                sampler.terminate()
                sampler.wait()

    run = _run(url, pool, n, 0, attach=sampled)
    rows: list[Result] = [{"what": f"mails/s to the sink, SMTP_POOL_SIZE={pool}, profiled",
                           "value": round(run.mails_per_s)},
                          {"what": "reactor process CPU per mail, profiled",
                           "value": f"{run.cpu_ms_per_mail:.2f} ms"},
                          {"what": "raw py-spy profile", "value": str(raw)}]
    return rows + _summarize(raw, top, MAIL_WATCH)
