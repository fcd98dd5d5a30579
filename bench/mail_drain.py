"""`python -m bench.mail_drain URL PORT POOL N [CHECKOUT]`: one reactor process sends N
queued mails through the whole pipeline (render, ledger, build, send) to the SMTP
server on PORT. It prints `READY` once its imports are done, starts on a line `go` on
stdin (a profiler attaches in between: bench/profile.py), then prints
`DONE <seconds> <CPU seconds>`.

A process of its own, so its CPU is the pipeline's alone (Postgres and the relay run
elsewhere) and so CHECKOUT, another checkout of the repository, can run instead of
this one: its `reactor` is imported first (`BENCH_BASELINE`, bench/mail.py), while this
module's harness stays the same for both.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from typing import Any, ClassVar


def drain(url: str, port: int, pool: int, n: int) -> tuple[float, float]:
    """Run the reactor's email queue until n mails are handled: (seconds, CPU seconds)."""
    import trio

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

    print("READY", flush=True)
    sys.stdin.readline()

    async def main() -> tuple[float, float]:
        CountingEmail.count, CountingEmail.done = 0, trio.Event()
        reactor = Reactor(build(settings), processors={"email_queue": CountingEmail})
        async with trio.open_nursery() as nursery:
            t0, cpu0 = time.perf_counter(), time.process_time()
            await nursery.start(partial(reactor.run, handle_signals=False))
            with trio.fail_after(600):
                await CountingEmail.done.wait()
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            reactor.stop()
        return elapsed, cpu

    return trio.run(main)


def main(argv: list[str]) -> None:
    url, port, pool, n, *checkout = argv
    if checkout:
        sys.path.insert(0, checkout[0])  # before the editable install's finder
    elapsed, cpu = drain(url, int(port), int(pool), int(n))
    print(f"DONE {elapsed:.6f} {cpu:.6f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
