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

import time
from functools import partial
from typing import Any, ClassVar

import psycopg
import trio

from bench.common import Child, Result

__all__ = ["mail"]

POOLS = (1, 5, 20)
SINK_POOLS = (1, 3, 5, 20)  # 3 is the default SMTP_POOL_SIZE
NO_PIPELINING_POOL = 5
LATENCY_MS = 40.0
SECONDS_PER_RUN = 8.0  # against the relay: enough mails for ~8 s at the ceiling
SINK_MAILS = 1500


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


def _drain(url: str, port: int, pool: int, n: int) -> float:
    """Run the reactor's email queue until n mails are done; seconds taken."""
    from reactor.clinic.app import build
    from reactor.clinic.email import EmailProcessor
    from reactor.clinic.settings import load_settings
    from reactor.engine.processor import Job
    from reactor.engine.runtime import Reactor

    class CountingEmail(EmailProcessor):
        count: ClassVar[int] = 0
        done: ClassVar[trio.Event]

        async def handle(self, job: Job[Any]) -> None:
            await super().handle(job)
            cls = type(self)
            cls.count += 1
            if cls.count == n:
                cls.done.set()

    settings = load_settings(
        _env_file=None, DATABASE_URL=url, WORKER_INTERVAL_MS=60_000, LOG_LEVEL="warning",
        FEED_PORT=0, METRICS_PORT=0, EMAIL_PROVIDER="smtp", SMTP_HOST="127.0.0.1",
        SMTP_PORT=port, SMTP_SECURITY="none", SMTP_FROM="noreply@example.com",
        SMTP_FROM_NAME="Family Mind", SMTP_POOL_SIZE=pool)

    async def main() -> float:
        CountingEmail.count, CountingEmail.done = 0, trio.Event()
        reactor = Reactor(build(settings), processors={"email_queue": CountingEmail})
        async with trio.open_nursery() as nursery:
            t0 = time.perf_counter()
            await nursery.start(partial(reactor.run, handle_signals=False))
            with trio.fail_after(600):
                await CountingEmail.done.wait()
            elapsed = time.perf_counter() - t0
            reactor.stop()
        return elapsed

    return trio.run(main)


def _run(url: str, pool: int, n: int, delay_ms: float,
         pipelining: bool = True) -> tuple[float, float]:
    """(mails per second, round trips per mail) for one pool size and relay."""
    _fill(url, n)
    with Child("bench.slow_smtp", "--delay-ms", str(delay_ms),
               *([] if pipelining else ["--no-pipelining"])) as relay:
        port = int(relay.expect("READY", 30)[0])
        elapsed = _drain(url, port, pool, n)
        relay.end_input()  # it prints STATS and exits
        mails, round_trips, connections = map(int, relay.expect("STATS", 30))
    sent = _sent(url)
    if mails != n or sent != n:
        raise RuntimeError(f"pool {pool}: relay got {mails}, ledger says {sent} sent, of {n}")
    # Each connection costs the greeting, EHLO and QUIT: three round trips of its own.
    per_mail = (round_trips - 3 * connections) / mails
    return n / elapsed, per_mail


def mail(url: str) -> list[Result]:
    results: list[Result] = []
    relay_runs = [(pool, True) for pool in POOLS] + [(NO_PIPELINING_POOL, False)]
    for pool, pipelining in relay_runs:
        ceiling_guess = pool / ((2 if pipelining else 4) * LATENCY_MS / 1000)
        n = max(40, int(ceiling_guess * SECONDS_PER_RUN))
        rate, per_mail = _run(url, pool, n, LATENCY_MS, pipelining)
        ceiling = pool / (per_mail * LATENCY_MS / 1000)
        results.append({"relay": f"{LATENCY_MS:g} ms per reply",
                        "PIPELINING": "offered" if pipelining else "not offered",
                        "SMTP_POOL_SIZE": pool, "mails": n,
                        "round_trips_per_mail": round(per_mail, 2),
                        "ceiling_mails_per_s": round(ceiling, 1),
                        "mails_per_s": round(rate, 1),
                        "of_ceiling_pct": round(rate / ceiling * 100)})
    for pool in SINK_POOLS:
        rate, per_mail = _run(url, pool, SINK_MAILS, 0)
        results.append({"relay": "local sink, no delay", "PIPELINING": "offered",
                        "SMTP_POOL_SIZE": pool, "mails": SINK_MAILS,
                        "round_trips_per_mail": round(per_mail, 2),
                        "ceiling_mails_per_s": "—", "mails_per_s": round(rate, 1),
                        "of_ceiling_pct": "—"})
    return results
