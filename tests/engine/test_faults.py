"""Fault injection against real components: the faults production brings every
month must not end `reactor run`, lose a message or do anything twice.

Each scenario starts from a clean database: a Postgres flipped read-only in the
middle of a drain, a real PgBouncer in transaction mode, a poison message
between good ones, a slow SMTP relay with jobs waiting past their timeout, and
SIGTERM in the middle of the largest report the reactor accepts.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import psycopg
import pytest
import trio
from psycopg.types.json import Jsonb

from reactor.clinic.analytics import AnalyticsProcessor
from reactor.clinic.app import build
from reactor.clinic.email import CLAIM_BOUND_S, EmailProcessor
from reactor.clinic.reports import (
    MAX_DOMAIN_CHARS,
    MAX_RECOMMENDATIONS,
    MAX_RESULTS_BYTES,
    MAX_SCORES,
    MAX_TEXT_CHARS,
)
from reactor.engine import queues
from reactor.engine.pgcluster import PgCluster
from reactor.engine.processor import PermanentError
from tests import factories
from tests.conftest import SmtpServer
from tests.harness import (
    eventually,
    log_lines,
    of_type,
    patience,
    ports,
    reactor_process,
    running_reactor,
    send,
    settings_for,
    sql,
    wait_for,
    wait_until,
)
from tests.pgbouncer import pgbouncer

ANALYTICS_ONLY: dict[str, Any] = {"analytics_queue": AnalyticsProcessor}


def _count(url: str, query: str, params: Any = None) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
    assert row is not None
    return int(row[0])


def _enqueue_analytics(url: str, total: int, event: str = "drain") -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT public.enqueue('analytics_queue', jsonb_build_object("
                     "'event', %s::text, 'properties', jsonb_build_object('n', i))) "
                     "FROM generate_series(1, %s) AS i", (event, total))


def _set_read_only(cluster: PgCluster, on: bool) -> None:
    """What a failover to a standby looks like to clients: every write refused."""
    with psycopg.connect(cluster.url(), autocommit=True,
                         options="-c default_transaction_read_only=off") as conn:
        if on:
            conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        else:
            conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
        conn.execute("SELECT pg_reload_conf()")


# -- 1. the database turns read-only in the middle of a drain ------------------------------
async def test_a_read_only_database_for_10s_mid_drain_loses_and_doubles_nothing(
        private_cluster: PgCluster) -> None:
    url = private_cluster.url()
    total = 3000
    _enqueue_analytics(url, total)
    flipped_at = recovered_at = 0.0
    seen_read_only = False
    try:
        async with running_reactor(url, ANALYTICS_ONLY, MAX_TASKS_PER_CYCLE=50) as reactor:
            with reactor.bus.subscribe() as sub:
                done = 0
                with trio.fail_after(60):
                    async for event in sub.receive:
                        done += event["type"] == "job.succeeded"
                        if done >= 300:
                            break
            await trio.to_thread.run_sync(_set_read_only, private_cluster, True)
            flipped_at = time.monotonic()
            processed_at_flip = _count(url, "SELECT count(*) FROM public.analytics_events")
            assert processed_at_flip < total, "the flip came too late to prove anything"
            while time.monotonic() - flipped_at < 10:
                seen_read_only = seen_read_only or "database_read_only" in reactor.health.reasons()
                await trio.sleep(0.2)
            assert seen_read_only, reactor.health.faults
            assert not reactor.health.healthy
            await trio.to_thread.run_sync(_set_read_only, private_cluster, False)
            recovered_at = time.monotonic()
            await eventually(lambda: _count(url, "SELECT count(*) FROM pgmq.q_analytics_queue")
                             == 0, within_s=90, every_s=0.2)
            await eventually(lambda: reactor.health.healthy, within_s=30)
            caught_up_s = time.monotonic() - recovered_at
    finally:
        _set_read_only(private_cluster, False)
    rows, distinct = (_count(url, "SELECT count(*) FROM public.analytics_events"),
                      _count(url, "SELECT count(DISTINCT source_msg_id) "
                                  "FROM public.analytics_events"))
    assert (rows, distinct) == (total, total)  # nothing lost, nothing doubled
    assert _count(url, "SELECT count(DISTINCT msg_id) FROM pgmq.a_analytics_queue") == total
    assert _count(url, "SELECT count(*) FROM pgmq.q_analytics_queue_dlq") == 0
    print(f"read-only 10 s mid-drain: caught up {caught_up_s:.1f} s after the database "
          f"was writable again; lost 0, doubled 0")


# -- 2. behind a real PgBouncer in transaction mode ----------------------------------------
@pytest.mark.process
async def test_behind_pgbouncer_in_transaction_mode_it_drains_on_the_poll(
        private_cluster: PgCluster) -> None:
    total = 500
    with pgbouncer(private_cluster) as pooled_url:
        async with running_reactor(pooled_url, ANALYTICS_ONLY, WORKER_INTERVAL_MS=300,
                                   MAX_TASKS_PER_CYCLE=20, DB_POOL_SIZE=4) as reactor:
            # The listener's probe cannot come back through the pooler: said once, on the poll.
            assert "pooler" in reactor.health.reasons()
            assert reactor.health.healthy  # degraded, not down
            # Enqueued on the direct connection, in several transactions: no NOTIFY reaches
            # the reactor, only the poll finds them.
            for _ in range(5):
                _enqueue_analytics(private_cluster.url(), total // 5, "pooled")
            await eventually(lambda: _count(private_cluster.url(),
                                            "SELECT count(*) FROM public.analytics_events")
                             == total, within_s=90, every_s=0.2)
        # The pooler's server connections carry no session state of ours.
        with psycopg.connect(pooled_url, autocommit=True) as other_client:
            row = other_client.execute("SHOW statement_timeout").fetchone()
        assert row == ("0",)
    assert _count(private_cluster.url(),
                  "SELECT count(DISTINCT source_msg_id) FROM public.analytics_events") == total


# -- 3. untrusted message bodies -------------------------------------------------------------
POISON_SQL = ("SELECT pgmq.send('analytics_queue', ('{\"event\": \"poison\", \"properties\": "
              "{\"deep\": ' || repeat('[', 1200) || repeat(']', 1200) || '}}')::jsonb)")
HUGE_SQL = ("SELECT pgmq.send('analytics_queue', jsonb_build_object('event', 'huge', "
            "'properties', jsonb_build_object('blob', repeat('x', 300000))))")


async def test_a_poison_message_is_dead_lettered_and_the_batch_goes_on(
        database_url: str) -> None:
    for n in range(5):
        await send(database_url, "analytics_queue", {"event": "good", "properties": {"n": n}})
    [(poison_id,)] = await sql(database_url, POISON_SQL)
    [(huge_id,)] = await sql(database_url, HUGE_SQL)
    await sql(database_url, "SELECT pgmq.send('analytics_queue', '\"just a string\"'::jsonb)")
    for n in range(5, 10):
        await send(database_url, "analytics_queue", {"event": "good", "properties": {"n": n}})
    async with running_reactor(database_url, ANALYTICS_ONLY):
        await eventually(lambda: _count(database_url, "SELECT count(*) FROM "
                                        "pgmq.q_analytics_queue") == 0)
    assert _count(database_url, "SELECT count(*) FROM public.analytics_events "
                                "WHERE event = 'good'") == 10
    letters = {m.body["source_msg_id"]: m.body for m in await trio.to_thread.run_sync(
        _peek_dlq, database_url)}
    assert set(letters) >= {poison_id, huge_id}
    assert "nests deeper than 64 levels" in letters[poison_id]["error"]
    assert letters[poison_id]["original"] is None
    assert letters[poison_id]["original_text"].startswith('{"event": "poison"')
    assert "over the limit of 262144 bytes" in letters[huge_id]["error"]
    # A restart reads past them: nothing of theirs is delivered again, new work is done.
    async with running_reactor(database_url, ANALYTICS_ONLY):
        await send(database_url, "analytics_queue", {"event": "after_restart"})
        await eventually(lambda: _count(database_url, "SELECT count(*) FROM "
                                        "public.analytics_events WHERE event = 'after_restart'")
                         == 1)
    assert _count(database_url, "SELECT count(*) FROM public.analytics_events "
                                "WHERE event IN ('poison', 'huge')") == 0


def _peek_dlq(url: str) -> list[queues.Message]:
    with psycopg.connect(url, autocommit=True) as conn:
        return queues.peek(conn, "analytics_queue_dlq")


def test_enqueue_refuses_a_message_over_256_kib(db: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.ProgramLimitExceeded,
                       match=r"more than the limit of 262144 bytes"):
        db.execute("SELECT public.queue_analytics_event('big', NULL, %s)",
                   (Jsonb({"blob": "x" * 270_000}),))
    assert factories.queued(db, "analytics_queue") == []


async def test_a_message_that_keeps_killing_its_worker_is_dead_lettered_in_any_queue(
        database_url: str) -> None:
    """Three deliveries that ended in nothing (simulated: read, never settled)."""
    crasher = await send(database_url, "payment_processing_queue",
                         {"payment_id": "00000000-0000-0000-0000-000000000000"})
    await sql(database_url, "SELECT count(*) FROM pgmq.read('payment_processing_queue', 0, 1), "
                            "pgmq.read('payment_processing_queue', 0, 1) AS b, "
                            "pgmq.read('payment_processing_queue', 0, 1) AS c")
    [(read_ct,)] = await sql(database_url, "SELECT read_ct FROM "
                                           "pgmq.q_payment_processing_queue")
    assert read_ct == 3
    processors = {q: build(settings_for(database_url)).processors[q]
                  for q in ("payment_processing_queue",)}
    async with running_reactor(database_url, processors) as reactor:
        with reactor.bus.subscribe() as sub:
            [event] = await wait_for(sub, of_type("job.dead_lettered", crasher))
    assert "may crash its worker" in event["error"]
    [(error,)] = await sql(database_url, "SELECT last_error FROM reactor.job_failures "
                                         "WHERE msg_id = %s AND dead_lettered", (crasher,))
    assert "3 deliveries ended with no outcome" in error


async def test_retries_with_recorded_outcomes_are_not_taken_for_a_crash(
        database_url: str) -> None:
    """A message retried through a long outage has a high read_ct but no lost delivery."""
    msg_id = await send(database_url, "analytics_queue", {"event": "survivor"}, notify=False)
    await sql(database_url, "UPDATE pgmq.q_analytics_queue SET read_ct = 9")
    await sql(database_url, "INSERT INTO reactor.job_failures (queue, msg_id, enqueued_at, "
                            "outcomes, last_attempt, last_error) SELECT 'analytics_queue', msg_id,"
                            " enqueued_at, 9, 9, 'SMTP down' FROM pgmq.q_analytics_queue")
    async with running_reactor(database_url, ANALYTICS_ONLY, OUTAGE_MAX_ATTEMPTS=30):
        await eventually(lambda: _count(database_url, "SELECT count(*) FROM "
                                        "public.analytics_events WHERE source_msg_id = %s",
                                        (msg_id,)) == 1)


# -- 4. a slow mail relay -----------------------------------------------------------------------
class QuickEmail(EmailProcessor):
    """The email processor with a 1 s job timeout: every queued mail waits past it."""

    timeout_s = 1.0


async def test_a_slow_relay_with_jobs_past_their_timeout_sends_each_mail_once(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    relay = smtp_server(delay_ms=1200)  # each DATA answered 1.2 s later
    total = 5
    for n in range(total):
        await send(database_url, "email_queue", {
            "to": f"parent{n}@example.com", "subject": f"Slow {n}", "template":
            "checkup_completed", "locale": "en",
            "variables": {"full_name": "Anna", "assessment_id": "a-1"}})
    events: list[dict[str, Any]] = []
    async with running_reactor(database_url, {"email_queue": QuickEmail},
                               EMAIL_PROVIDER="smtp", SMTP_HOST="127.0.0.1",
                               SMTP_PORT=relay.port, SMTP_SECURITY="none", SMTP_POOL_SIZE=1,
                               SMTP_FROM="noreply@family.example", MAX_ATTEMPTS=50,
                               RETRY_MAX_S=1) as reactor:
        reactor.bus.sinks.append(events.append)
        await eventually(lambda: _count(database_url, "SELECT count(*) FROM pgmq.q_email_queue")
                         == 0, within_s=90, every_s=0.2)
    # Every delivery was settled exactly once. A mail still waiting for the one pooled
    # connection when its time ran out is retried (nothing was started for it); a mail
    # whose conversation ran past the timeout finished it and counted as sent.
    settles = [(e["msg_id"], e["attempt"]) for e in events
               if e["type"] in ("job.succeeded", "job.retrying", "job.dead_lettered")]
    assert len(settles) == len(set(settles)), events
    assert all("timed out after 1s" in e["error"] for e in events if e["type"] == "job.retrying")
    succeeded = [e["msg_id"] for e in events if e["type"] == "job.succeeded"]
    assert len(succeeded) == len(set(succeeded)) == total
    recipients = [str(m["To"]) for m in relay.mails()]
    assert sorted(recipients) == sorted(f"parent{n}@example.com" for n in range(total))
    assert _count(database_url, "SELECT count(*) FROM public.email_ledger "
                                "WHERE status = 'sent'") == total
    assert _count(database_url, "SELECT count(*) FROM pgmq.q_email_queue_dlq") == 0


# -- 5. SIGTERM during the largest report accepted --------------------------------------------
def _largest_accepted_results() -> dict[str, Any]:
    """Every cap of the report processor at once, within MAX_RESULTS_BYTES."""
    words = "Рекомендация для родителей с длинным текстом. "
    recommendations = MAX_RECOMMENDATIONS
    while True:
        results = {
            "child_name": "Маша", "summary": (words * 50)[:MAX_TEXT_CHARS],
            "scores": [{"domain": ("Внимание и концентрация " * 10)[:MAX_DOMAIN_CHARS],
                        "score": i % 20, "max": 20, "band": ("low", "moderate", "high")[i % 3]}
                       for i in range(MAX_SCORES)],
            "recommendations": [(words * 50)[:MAX_TEXT_CHARS]] * recommendations,
        }
        if len(json.dumps(results, ensure_ascii=False).encode()) <= MAX_RESULTS_BYTES:
            return results
        recommendations -= 1


@pytest.mark.process
def test_sigterm_during_the_largest_report_exits_within_the_grace(
        database_url: str, tmp_path: Path) -> None:
    grace_s = 0.5  # shorter than the render: the job is cancelled, the thread abandoned
    with psycopg.connect(database_url, autocommit=True) as conn:
        user = factories.profile(conn)
        checkup = factories.assessment(conn, user, results=_largest_accepted_results())
    log = tmp_path / "reactor.log"
    with reactor_process(database_url, log, LOG_LEVEL="debug", SHUTDOWN_GRACE_S=str(grace_s),
                         REPORTS_DIR=str(tmp_path / "reports")) as proc:
        ports(proc, log)  # started
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("UPDATE public.assessments SET status = 'completed', "
                         "completed_at = now() WHERE id = %s", (checkup,))
        wait_until(lambda: any(e.get("event") == "job.started"
                               and e.get("queue") == "report_generation_queue"
                               for e in log_lines(log)), what="the report job to start")
        sent_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=grace_s + patience(20))
        exit_s = time.monotonic() - sent_at
    assert code == 0, log.read_text()[-2000:]
    assert exit_s < grace_s + patience(2), f"exited {exit_s:.1f} s after SIGTERM"
    print(f"SIGTERM during the largest report: exit 0 after {exit_s:.1f} s "
          f"(SHUTDOWN_GRACE_S={grace_s:g})")


# -- found by review: each of these once ended the process or did something twice -----------
class SlowAnalytics(AnalyticsProcessor):
    """A job that runs long without the database (an SMTP send, a provider call)."""

    timeout_s = 60.0
    calls: ClassVar[list[int]] = []

    async def handle(self, job: Any) -> None:
        type(self).calls.append(job.msg_id)
        if job.message.event == "slow":
            await trio.sleep(6)
        await super().handle(job)


async def test_a_lease_lost_during_an_outage_does_not_run_the_job_twice(
        private_cluster: PgCluster) -> None:
    """Read-only longer than the visibility timeout: the running job's lease cannot be
    renewed and runs out; the next read must not hand its message out again."""
    url = private_cluster.url()
    SlowAnalytics.calls = []
    try:
        async with running_reactor(url, {"analytics_queue": SlowAnalytics},
                                   VISIBILITY_TIMEOUT_S=2) as reactor:
            slow = await send(url, "analytics_queue", {"event": "slow"})
            await eventually(lambda: slow in SlowAnalytics.calls)
            await trio.to_thread.run_sync(_set_read_only, private_cluster, True)
            await trio.sleep(3.5)  # the 2 s lease runs out meanwhile
            await trio.to_thread.run_sync(_set_read_only, private_cluster, False)
            await send(url, "analytics_queue", {"event": "wake"})
            await eventually(lambda: _count(url, "SELECT count(*) FROM public.analytics_events")
                             == 2, within_s=30, every_s=0.2)
            assert reactor.drainers["analytics_queue"].finished.is_set() is False
    finally:
        _set_read_only(private_cluster, False)
    assert SlowAnalytics.calls.count(slow) == 1


class Picky(AnalyticsProcessor):
    """Fails with reasons Postgres cannot store as they are."""

    async def handle(self, job: Any) -> None:
        if job.message.event == "nul":
            raise PermanentError("provider said \x00 here")
        if job.message.event == "surrogate":
            raise PermanentError("provider said \ud800 here")
        await super().handle(job)


async def test_an_error_text_with_nul_or_a_lone_surrogate_does_not_wedge_the_queue(
        database_url: str) -> None:
    for event in ("nul", "surrogate", "good", "good"):
        await send(database_url, "analytics_queue", {"event": event})
    async with running_reactor(database_url, {"analytics_queue": Picky}):
        await eventually(lambda: _count(database_url, "SELECT count(*) FROM "
                                        "pgmq.q_analytics_queue_dlq") == 2, every_s=0.2)
        await eventually(lambda: _count(database_url, "SELECT count(*) FROM "
                                        "public.analytics_events") == 2, every_s=0.2)
    errors = sorted(m.body["error"] for m in await trio.to_thread.run_sync(
        _peek_dlq, database_url))
    assert errors == ["provider said ? here", "provider said \\0 here"]


class NurseryHang(AnalyticsProcessor):
    """Hangs inside a nursery of its own: its cancellation arrives as an exception group."""

    timeout_s = 0.5

    async def handle(self, job: Any) -> None:
        if job.delivery.attempt == 1:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep_forever)
                nursery.start_soon(trio.sleep_forever)
        await super().handle(job)


async def test_a_timeout_inside_a_handlers_nursery_is_retried(database_url: str) -> None:
    msg_id = await send(database_url, "analytics_queue", {"event": "grouped"})
    async with running_reactor(database_url, {"analytics_queue": NurseryHang}) as reactor:
        with reactor.bus.subscribe() as sub:
            [retry] = await wait_for(sub, of_type("job.retrying", msg_id))
            await wait_for(sub, of_type("job.succeeded", msg_id), within_s=15)
    assert "timed out after 0.5s" in retry["error"]


async def test_mail_waiting_for_a_pooled_connection_claims_nothing_and_stops_in_time(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    """Pool of 1, a relay taking 3 s a mail, 6 mails, SIGTERM-like stop with 1 s grace:
    only the mail in conversation is 'sending'; the others never started. (Which mails
    went out before the stop depends on how fast this machine is: what is asserted is
    that every claimed mail was sent and recorded, and every other one is back.)"""
    relay = smtp_server(delay_ms=3000)
    for n in range(6):
        await send(database_url, "email_queue", {
            "to": f"wait{n}@example.com", "template": "checkup_completed", "locale": "en",
            "variables": {"full_name": "A", "assessment_id": "1"}})
    async with running_reactor(database_url, {"email_queue": EmailProcessor},
                               EMAIL_PROVIDER="smtp", SMTP_HOST="127.0.0.1",
                               SMTP_PORT=relay.port, SMTP_SECURITY="none", SMTP_POOL_SIZE=1,
                               SMTP_FROM="noreply@family.example", SHUTDOWN_GRACE_S=1) as reactor:
        await eventually(lambda: _count(database_url, "SELECT count(*) FROM "
                                        "public.email_ledger") >= 1, every_s=0.1)
        # One connection: at most one claimed mail is unsent at any moment.
        assert _count(database_url, "SELECT count(*) FROM public.email_ledger "
                                    "WHERE status = 'sending'") <= 1
        stopped_at = trio.current_time()
        reactor.stop()
    took_s = trio.current_time() - stopped_at
    # grace + one conversation + the slack a loaded machine needs
    assert took_s < 1 + 3 + patience(2), f"stopping took {took_s:.1f} s"
    ledger = await sql(database_url, "SELECT status FROM public.email_ledger")
    # the conversation under way finished and was recorded; nothing else was claimed
    assert ledger
    assert ledger == [("sent",)] * len(ledger)
    assert len(relay.mails()) == len(ledger)
    # The ones that waited are visible again at once, with no 'sending' left behind.
    assert _count(database_url, "SELECT count(*) FROM pgmq.q_email_queue "
                                "WHERE vt <= clock_timestamp()") == 6 - len(ledger)


async def test_a_claim_stuck_on_the_ledger_delays_a_shutdown_by_its_bound_at_most(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    """The ledger claim's answer is awaited through a shutdown (a claim committed but not
    read would leave 'sending' for a mail never sent), but within CLAIM_BOUND_S: with
    email_ledger locked, a claim is cut at that bound and retried, saying the database
    did not answer; two stops end the reactor within the grace and that bound; the
    claim is rolled back (no row) and the mail waits on the queue, unsent."""
    relay = smtp_server()
    await send(database_url, "email_queue", {
        "to": "stuck@example.com", "template": "checkup_completed", "locale": "en",
        "variables": {"full_name": "A", "assessment_id": "1"}})
    locker = await trio.to_thread.run_sync(lambda: psycopg.connect(database_url))
    try:
        await trio.to_thread.run_sync(
            locker.execute, "LOCK TABLE public.email_ledger IN ACCESS EXCLUSIVE MODE")
        async with running_reactor(database_url, {"email_queue": EmailProcessor},
                                   EMAIL_PROVIDER="smtp", SMTP_HOST="127.0.0.1",
                                   SMTP_PORT=relay.port, SMTP_SECURITY="none",
                                   SMTP_FROM="noreply@family.example",
                                   SHUTDOWN_GRACE_S=0.5) as reactor:
            with reactor.bus.subscribe() as sub:
                [retrying] = await wait_for(sub, of_type("job.retrying"), within_s=30)
                await eventually(lambda: _count(
                    database_url, "SELECT count(*) FROM pg_stat_activity WHERE "
                    "wait_event_type = 'Lock' AND query LIKE '%%email_ledger%%'") == 1)
                stopped_at = trio.current_time()
                reactor.stop()
                reactor.stop()  # a second SIGTERM
        took_s = trio.current_time() - stopped_at
    finally:
        await trio.to_thread.run_sync(locker.close)
    assert f"did not answer within {CLAIM_BOUND_S:g}s" in retrying["error"]
    assert "SMTP" not in retrying["error"]
    assert took_s < 0.5 + CLAIM_BOUND_S + patience(2), f"stopping took {took_s:.1f} s"
    assert _count(database_url, "SELECT count(*) FROM public.email_ledger") == 0
    assert relay.mails() == []
    assert _count(database_url, "SELECT count(*) FROM pgmq.q_email_queue") == 1


async def test_a_read_only_spell_right_after_sends_still_records_them_as_sent(
        private_cluster: PgCluster, smtp_server: Callable[..., SmtpServer]) -> None:
    url = private_cluster.url()
    relay = smtp_server(delay_ms=2000)
    for n in range(3):
        await send(url, "email_queue", {
            "to": f"ro{n}@example.com", "template": "checkup_completed", "locale": "en",
            "variables": {"full_name": "A", "assessment_id": "1"}})
    try:
        async with running_reactor(url, {"email_queue": EmailProcessor},
                                   EMAIL_PROVIDER="smtp", SMTP_HOST="127.0.0.1",
                                   SMTP_PORT=relay.port, SMTP_SECURITY="none", SMTP_POOL_SIZE=3,
                                   SMTP_FROM="noreply@family.example"):
            await eventually(lambda: _count(url, "SELECT count(*) FROM public.email_ledger")
                             == 3, every_s=0.1)
            await trio.to_thread.run_sync(_set_read_only, private_cluster, True)
            await trio.sleep(3)  # the three sends finish meanwhile; 'sent' cannot be written
            await trio.to_thread.run_sync(_set_read_only, private_cluster, False)
            await eventually(lambda: _count(url, "SELECT count(*) FROM public.email_ledger "
                                            "WHERE status = 'sent'") == 3, within_s=30,
                             every_s=0.2)
            await eventually(lambda: _count(url, "SELECT count(*) FROM pgmq.q_email_queue")
                             == 0, within_s=30, every_s=0.2)
    finally:
        _set_read_only(private_cluster, False)
    assert len(relay.mails()) == 3
    assert _count(url, "SELECT count(*) FROM pgmq.q_email_queue_dlq") == 0
