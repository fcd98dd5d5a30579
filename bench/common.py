"""What every scenario shares: the bench cluster's queues, filling them, statistics.

The bench database is a throwaway cluster (reactor.engine.pgcluster, fsync on), so
the SQL here is bench-only set-up and measurement, not the product's SQL.
"""

from __future__ import annotations

import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

__all__ = ["QUEUE", "Child", "MissingDependency", "Result", "Spread", "baseline_checkout",
           "cpu_s", "fill_pgmq",
           "fill_pgqueuer", "pct", "require", "reset_pgmq", "reset_pgqueuer", "rss_kib",
           "spread"]

QUEUE = "analytics_queue"
ROOT = Path(__file__).resolve().parent.parent

Result = dict[str, Any]


class MissingDependency(Exception):
    """A bench-only package is not installed; the message names the fix."""


def require(module: str, package: str) -> None:
    """Refuse to start a scenario whose peer is not installed (before any child fails)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingDependency(f"{package} is not installed: run `make bench`, or "
                                f"pip install -e '.[bench]'")


def baseline_checkout() -> Path | None:
    """BENCH_BASELINE: another checkout of the repository whose reactor runs beside this
    one's, in the same run (floor, replicas, mail-baseline); None when it is not set."""
    base = os.environ.get("BENCH_BASELINE")
    return Path(base).resolve() if base else None


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 < q < 100) of values, 0.1 % resolution."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000)[int(q * 10) - 1]


@dataclass(frozen=True)
class Spread:
    """Median of repeated runs and their range, for 'median of 3 (min–max)'."""

    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:,.0f} ({self.low:,.0f}–{self.high:,.0f})"


def spread(values: Sequence[float]) -> Spread:
    return Spread(statistics.median(values), min(values), max(values))


def reset_pgmq(url: str) -> None:
    """Empty the bench queue and its archive so every run starts alike."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE pgmq.q_{QUEUE}, pgmq.a_{QUEUE}")


def fill_pgmq(url: str, n: int) -> None:
    """n small messages, committed in one transaction, then a checkpoint so the
    worker does not pay for the filler's dirty pages."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"INSERT INTO pgmq.q_{QUEUE} (vt, message) SELECT clock_timestamp(), "
                     "jsonb_build_object('event', 'bench', 'properties', "
                     "jsonb_build_object('n', i)) FROM generate_series(1, %s) i", (n,))
        conn.execute(f"VACUUM ANALYZE pgmq.q_{QUEUE}")
        conn.execute("CHECKPOINT")


def reset_pgqueuer(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE pgqueuer, pgqueuer_log, pgqueuer_statistics")


def fill_pgqueuer(url: str, n: int) -> None:
    """n queued no-op jobs, the same shape PgQueuer's enqueue writes."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO pgqueuer (priority, entrypoint, payload, status) "
                     "SELECT 0, 'noop', convert_to(jsonb_build_object('n', i)::text, 'UTF8'), "
                     "'queued' FROM generate_series(1, %s) i", (n,))
        conn.execute("VACUUM ANALYZE pgqueuer")
        conn.execute("CHECKPOINT")


def rss_kib(pid: int | None = None) -> int:
    """Resident set size in KiB (VmRSS) of pid, default this process."""
    status = Path(f"/proc/{pid or os.getpid()}/status").read_text(encoding="ascii")
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/PID/status")


def cpu_s(pid: int | None = None) -> float:
    """CPU time (user + system, every thread) of pid, default this process, in seconds:
    utime + stime of /proc/<pid>/stat (fields 14 and 15, in clock ticks)."""
    stat = Path(f"/proc/{pid or os.getpid()}/stat").read_text(encoding="ascii")
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Child:
    """A bench process (python -m bench.workers …) that talks in lines on stdout.

    Every read has a deadline, so a stuck child fails the scenario instead of
    hanging the bench; the child is killed on the way out in any case.
    """

    def __init__(self, *argv: str, env: dict[str, str] | None = None,
                 quiet: bool = False, cwd: Path | None = None) -> None:
        """quiet: its stderr (e.g. a log line per job) goes to /dev/null. cwd: another
        checkout of the repository to run (its `reactor` and `bench` are imported:
        `python -m` puts the working directory first on the path)."""
        self.proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=cwd or ROOT,
                                     stdout=subprocess.PIPE, stdin=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL if quiet else None,
                                     text=True, env={**os.environ, **(env or {})})
        self.name = " ".join(argv[:2])
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def expect(self, word: str, timeout_s: float) -> list[str]:
        """Wait for a line starting with word; return its other fields."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{self.name}: no {word} within {timeout_s:g}s") from None
            if line is None:
                raise RuntimeError(f"{self.name} exited ({self.proc.wait()}) before {word}")
            fields = line.split()
            if fields and fields[0] == word:
                return fields[1:]

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def end_input(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def wait(self, timeout_s: float) -> int:
        return self.proc.wait(timeout_s)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)
        for stream in (self.proc.stdout, self.proc.stdin):
            if stream is not None and not stream.closed:
                stream.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
