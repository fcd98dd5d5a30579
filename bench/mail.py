"""Mail through the whole pipeline (render, ledger, send) against a relay with
40 ms of latency per reply (SMTP_POOL_SIZE 1, 5 and 20; and 5 against a relay
that does not offer PIPELINING) and against a zero-latency local sink
(SMTP_POOL_SIZE 1, 3 = the default, 5 and 20).

The ceiling a pool can reach against a relay is pool ÷ (round trips per mail
× latency): each connection carries one mail at a time and waits one
latency per round trip. The relay counts the round trips it answered: 2 a
mail when it offers PIPELINING (MAIL, RCPT and DATA in one write, then the
message), 4 when it does not.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import psycopg

from bench.common import Child, MissingDependency, Result, baseline_checkout, spread
from bench.floor import READY_TIMEOUT_S
from bench.peers import DRAIN_TIMEOUT_S

__all__ = ["mail", "side_by_side"]

POOLS = (1, 5, 20)
DEFAULT_POOL = 3  # SMTP_POOL_SIZE's default
SINK_POOLS = (1, DEFAULT_POOL, 5, 20)
NO_PIPELINING_POOL = 5
LATENCY_MS = 40.0
SECONDS_PER_RUN = 8.0  # against the relay: enough mails for ~8 s at the ceiling
SINK_MAILS = 1500
ROUNDS = 3


def _fill(url: str, n: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE pgmq.q_email_queue, pgmq.a_email_queue, public.email_ledger")
        conn.execute(
            "SELECT pgmq.send('email_queue', jsonb_build_object('to', 'parent' || i || "
            "'@example.com', 'template', 'checkup_completed', 'locale', 'ru', "
            "'variables', jsonb_build_object('full_name', 'Анна Петрова', "
            "'assessment_id', gen_random_uuid()))) FROM generate_series(1, %s) i", (n,))
        conn.execute("CHECKPOINT")


def _sent(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM public.email_ledger WHERE status = 'sent'"
                           ).fetchone()
    return int(row[0]) if row else 0


@dataclass(frozen=True)
class Drained:
    mails_per_s: float
    round_trips_per_mail: float
    cpu_ms_per_mail: float  # the reactor process's, user + system, every thread


def _run(url: str, pool: int, n: int, delay_ms: float, pipelining: bool = True,
         checkout: Path | None = None,
         attach: Callable[[int], AbstractContextManager[object]] | None = None) -> Drained:
    """n mails through one reactor process (this checkout's, or `checkout`'s) to a relay.
    attach: entered with the reactor process's pid before it starts (a profiler)."""
    _fill(url, n)
    with Child("bench.slow_smtp", "--delay-ms", str(delay_ms),
               *([] if pipelining else ["--no-pipelining"])) as relay:
        port = int(relay.expect("READY", 30)[0])
        with Child("bench.mail_drain", url, str(port), str(pool), str(n),
                   *([str(checkout)] if checkout else [])) as reactor:
            reactor.expect("READY", READY_TIMEOUT_S)
            with attach(reactor.proc.pid) if attach else nullcontext():
                reactor.send("go")
                elapsed, cpu = map(float, reactor.expect("DONE", DRAIN_TIMEOUT_S))
                reactor.wait(60)
        relay.end_input()  # it prints STATS and exits
        mails, round_trips, connections = map(int, relay.expect("STATS", 30))
    sent = _sent(url)
    if mails != n or sent != n:
        raise RuntimeError(f"pool {pool}: relay got {mails}, ledger says {sent} sent, of {n}")
    # Each connection costs the greeting, EHLO and QUIT: three round trips of its own.
    return Drained(n / elapsed, (round_trips - 3 * connections) / mails, cpu / n * 1000)


def side_by_side(url: str, rounds: int = ROUNDS) -> list[Result]:
    """This checkout's pipeline and BENCH_BASELINE's (another checkout of the repository)
    to the local sink at the default pool, interleaved (A B, A B, ...) so the machine's
    drift hits both alike: medians, with the lowest and highest in parentheses."""
    baseline = baseline_checkout()
    if baseline is None:
        raise MissingDependency("mail-baseline compares with another checkout: set "
                                "BENCH_BASELINE=<its directory>")
    runs: dict[str, list[Drained]] = {"baseline": [], "this": []}
    for _ in range(rounds):
        runs["baseline"].append(_run(url, DEFAULT_POOL, SINK_MAILS, 0, checkout=baseline))
        runs["this"].append(_run(url, DEFAULT_POOL, SINK_MAILS, 0))
    base_rate = statistics.median(r.mails_per_s for r in runs["baseline"])
    results: list[Result] = []
    for label, drained in (("baseline: " + str(baseline), runs["baseline"]),
                           ("this checkout", runs["this"])):
        rates = spread([r.mails_per_s for r in drained])
        results.append({"reactor": label, "SMTP_POOL_SIZE": DEFAULT_POOL,
                        "mails": SINK_MAILS, "rounds": rounds,
                        "mails_per_s": f"{rates.median:,.1f} ({rates.low:,.1f}–{rates.high:,.1f})",
                        "x_baseline": round(rates.median / base_rate, 2),
                        "cpu_ms_per_mail": round(statistics.median(
                            r.cpu_ms_per_mail for r in drained), 2)})
    return results


def mail(url: str) -> list[Result]:
    results: list[Result] = []
    relay_runs = [(pool, True) for pool in POOLS] + [(NO_PIPELINING_POOL, False)]
    for pool, pipelining in relay_runs:
        ceiling_guess = pool / ((2 if pipelining else 4) * LATENCY_MS / 1000)
        n = max(40, int(ceiling_guess * SECONDS_PER_RUN))
        run = _run(url, pool, n, LATENCY_MS, pipelining)
        rate, per_mail = run.mails_per_s, run.round_trips_per_mail
        ceiling = pool / (per_mail * LATENCY_MS / 1000)
        results.append({"relay": f"{LATENCY_MS:g} ms per reply",
                        "PIPELINING": "offered" if pipelining else "not offered",
                        "SMTP_POOL_SIZE": pool, "mails": n,
                        "round_trips_per_mail": round(per_mail, 2),
                        "ceiling_mails_per_s": round(ceiling, 1),
                        "mails_per_s": round(rate, 1),
                        "of_ceiling_pct": round(rate / ceiling * 100)})
    for pool in SINK_POOLS:
        run = _run(url, pool, SINK_MAILS, 0)
        results.append({"relay": "local sink, no delay", "PIPELINING": "offered",
                        "SMTP_POOL_SIZE": pool, "mails": SINK_MAILS,
                        "round_trips_per_mail": round(run.round_trips_per_mail, 2),
                        "ceiling_mails_per_s": "—", "mails_per_s": round(run.mails_per_s, 1),
                        "of_ceiling_pct": "—"})
    return results
