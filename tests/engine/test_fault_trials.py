"""The second round of fault trials (issue 29), kept as the project's own tests against
real components: a feed client that never reads during a 20,000-job burst, a table lock
held on one queue for 20 s while the others flow, every connection slot taken while the
reactor's backends are killed, a 200,000-message backlog at start, and a multi-host
DATABASE_URL whose first host is down.

Each proves the same three things: nothing lost, nothing done twice, and the reactor
stays up (and healthy again once the fault ends). Trials of the first round live beside
their subjects: a stalled feed client (http/test_feed.py), a lock past the statement
deadline (take/test_drainer.py, take/test_prepared_take.py), a Postgres restart
(test_resilience.py), a frozen replica (clinic/email/test_email.py).
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio

from reactor.engine.pgcluster import PgCluster
from tests.engine.http.feed_client import stalled_client
from tests.harness import (
    eventually,
    log_lines,
    of_type,
    ports,
    reactor_process,
    running_reactor,
    scalar,
    scripted_processor,
    send,
    sql,
    wait_for,
    wait_healthy,
    wait_until,
)

# Bigger takes and more connections: analytics jobs are one INSERT each, and the pool is
# their limit (on 2 shared cores: ~800 jobs/s with the defaults, ~1,200 with these).
FAST = {"MAX_TASKS_PER_CYCLE": "500", "DB_POOL_SIZE": "8"}


def _enqueue_analytics(url: str, total: int, event: str) -> None:
    """`total` analytics events in one statement, through public.enqueue (with NOTIFY)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT public.enqueue('analytics_queue', jsonb_build_object("
                     "'event', %s::text, 'properties', jsonb_build_object('n', i))) "
                     "FROM generate_series(1, %s) AS i", (event, total))


def _analytics_done_once(url: str, total: int) -> None:
    """Every analytics message handled and archived once, after its first and only
    delivery; none waiting, none dead-lettered."""
    assert scalar(url, "SELECT count(*) FROM pgmq.q_analytics_queue") == 0
    assert scalar(url, "SELECT count(*) FROM pgmq.q_analytics_queue_dlq") == 0
    assert scalar(url, "SELECT count(*) FROM public.analytics_events") == total
    assert scalar(url, "SELECT count(DISTINCT source_msg_id) FROM public.analytics_events") == total
    # Archived once each, and read once each: no message was delivered a second time.
    assert scalar(url, "SELECT count(*) FROM pgmq.a_analytics_queue") == total
    assert scalar(url, "SELECT count(DISTINCT msg_id) FROM pgmq.a_analytics_queue") == total
    assert scalar(url, "SELECT max(read_ct) FROM pgmq.a_analytics_queue") == 1


def _peak_rss_mb(pid: int) -> float:
    """VmHWM (the resident set's high-water mark) of a live process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def _drained(url: str, total: int) -> bool:
    return bool(scalar(url, "SELECT count(*) FROM public.analytics_events") == total
                and scalar(url, "SELECT count(*) FROM pgmq.q_analytics_queue") == 0)


def _stop(proc: Any) -> int:
    proc.send_signal(signal.SIGTERM)
    return int(proc.wait(timeout=60))


# -- 1. a feed client that never reads, during a 20,000-job burst --------------------------
@pytest.mark.process
def test_a_feed_client_that_never_reads_during_a_20000_job_burst(
        database_url: str, tmp_path: Path) -> None:
    """A websocket client completes the handshake and never reads while 20,000 jobs
    (40,000 feed events) go by: it is dropped, the burst drains, the reactor's memory
    stays bounded, and every job is done once. (Its pace is printed, never asserted:
    benchmarks live in bench/.)"""
    total = 20_000
    log = tmp_path / "reactor.log"
    with reactor_process(database_url, log, **FAST) as proc:
        port = ports(proc, log)
        wait_healthy(port.http, proc, log)
        sock = stalled_client(port.feed)
        try:
            started = time.monotonic()
            _enqueue_analytics(database_url, total, "stalled")
            wait_until(lambda: _drained(database_url, total), 180,
                       "the burst drained with a client that never reads", every_s=0.5)
            stalled_s = time.monotonic() - started
            dropped = wait_until(
                lambda: [e for e in log_lines(log) if e.get("event") == "feed client dropped"],
                30, "the stalled client dropped")
            metrics = httpx.get(f"http://127.0.0.1:{port.http}/metrics", timeout=10).text
            assert "reactor_feed_clients 0.0" in metrics
            peak_mb = _peak_rss_mb(proc.pid)
            wait_healthy(port.http, proc, log)
        finally:
            sock.close()
        assert _stop(proc) == 0
    _analytics_done_once(database_url, total)
    assert len(dropped) == 1
    assert "too slow" in dropped[0]["reason"]
    assert peak_mb < 500, f"peak RSS {peak_mb:.0f} MB"
    print(f"20,000-job burst: {stalled_s:.1f} s with a client that never reads (dropped); "
          f"peak RSS {peak_mb:.0f} MB; lost 0, doubled 0")


# -- 2. an ACCESS EXCLUSIVE lock on one queue's table for 20 s --------------------------------
async def test_a_queue_table_locked_for_20s_stalls_that_queue_alone(database_url: str) -> None:
    """LOCK TABLE pgmq.q_email_queue IN ACCESS EXCLUSIVE MODE for 20 s (a migration, a
    VACUUM FULL): analytics jobs sent meanwhile are each handled within seconds; the
    locked queue's messages are handled once each after the lock goes; nothing is
    dead-lettered and the reactor ends healthy."""
    locked_total = 20
    analytics = scripted_processor(concurrency=8)
    email = scripted_processor(concurrency=8)
    processors = {"analytics_queue": analytics, "email_queue": email}
    async with running_reactor(database_url, processors) as reactor:
        with reactor.bus.subscribe(buffer=10_000) as sub:
            # After its first drain: its next read is on a wake-up (the poll is 60 s).
            await eventually(lambda: reactor.drainers["email_queue"].idle, within_s=20)
            rows = await sql(database_url, "SELECT pgmq.send('email_queue', "
                             "jsonb_build_object('n', i)) FROM generate_series(1, %s) AS i",
                             (locked_total,))
            locked_ids = sorted(int(msg_id) for (msg_id,) in rows)
            with psycopg.connect(database_url) as locker:
                await trio.to_thread.run_sync(
                    locker.execute, "LOCK TABLE pgmq.q_email_queue IN ACCESS EXCLUSIVE MODE")
                # Wake the locked queue's drainer: its take now waits on the lock.
                await sql(database_url, "SELECT pg_notify('reactor_wakeup', 'email_queue')")

                async def take_waits_on_the_lock() -> bool:
                    return await sql(database_url, "SELECT count(*) > 0 FROM pg_stat_activity "
                                     "WHERE application_name = 'reactor' "
                                     "AND wait_event_type = 'Lock'") == [(True,)]

                await eventually(take_waits_on_the_lock, within_s=20)
                locked_at = time.monotonic()
                flowed: list[int] = []
                slowest = 0.0
                while time.monotonic() - locked_at < 20:
                    sent = time.monotonic()
                    msg_id = await send(database_url, "analytics_queue", {"n": len(flowed)})
                    await wait_for(sub, of_type("job.succeeded", msg_id), within_s=10)
                    slowest = max(slowest, time.monotonic() - sent)
                    flowed.append(msg_id)
                    with trio.move_on_after(0.2):
                        await trio.sleep_forever()  # a steady trickle, not a flood
                assert email.seen == []  # the lock held it all along
                await trio.to_thread.run_sync(locker.rollback)
            await eventually(lambda: sorted(email.finished) == locked_ids, within_s=30)
            await eventually(lambda: reactor.health.healthy, within_s=30)
            faults_at_end = reactor.health.faults
    assert sorted(analytics.seen) == [(i, 1) for i in sorted(flowed)]
    assert sorted(email.seen) == [(i, 1) for i in locked_ids]
    assert await sql(database_url, "SELECT count(*) FROM pgmq.q_email_queue_dlq") == [(0,)]
    assert await sql(database_url, "SELECT count(*) FROM pgmq.q_email_queue") == [(0,)]
    assert faults_at_end == []
    print(f"email_queue locked 20 s: {len(flowed)} analytics jobs meanwhile, slowest "
          f"{slowest:.2f} s from send to success; {locked_total} locked jobs once each after")


# -- 3. every connection slot taken while the reactor's backends are killed ----------------
MAX_CONNECTIONS = 16


@contextmanager
def _slots_taken(url: str) -> Iterator[psycopg.Connection]:
    """Open idle sessions until the server refuses another; yields one of them (the
    test's own, to act with). As the superuser: the reserved slots are taken too."""
    held: list[psycopg.Connection] = []
    try:
        while True:
            try:
                held.append(psycopg.connect(url, autocommit=True, application_name="filler"))
            except psycopg.OperationalError as exc:
                refusal = str(exc)
                break
            assert len(held) <= MAX_CONNECTIONS, "the server takes more than max_connections"
        assert "too many clients" in refusal or "connection slots" in refusal, refusal
        assert held, "not a single slot was free"
        yield held[0]
    finally:
        for conn in held:
            conn.close()


def _fill_again(url: str, control: psycopg.Connection, more: list[psycopg.Connection]) -> int:
    """Take every slot a killed backend freed, killing whatever the reactor reopened
    meanwhile, until the server is full and none of the reactor's sessions is left;
    the reactor's sessions killed in all.

    Each kill waits for the backend to exit (its slot is free before the refill), and
    "none left" must hold twice a second apart: a reactor backend still starting holds
    a slot before pg_stat_activity lists it (soak run 5 found one that way)."""
    killed = 0
    while True:
        row = control.execute("SELECT count(pg_terminate_backend(pid, 5000)) "
                              "FROM pg_stat_activity "
                              "WHERE application_name LIKE 'reactor%'").fetchone()
        killed += int(row[0]) if row else 0
        while True:
            try:
                more.append(psycopg.connect(url, autocommit=True, application_name="filler"))
            except psycopg.OperationalError:
                break
        if _reactor_sessions(control) == 0:
            time.sleep(1)
            if _reactor_sessions(control) == 0:
                return killed


def _reactor_sessions(control: psycopg.Connection) -> int:
    row = control.execute("SELECT count(*) FROM pg_stat_activity "
                          "WHERE application_name LIKE 'reactor%'").fetchone()
    return int(row[0]) if row else 0


async def test_every_connection_slot_taken_while_the_reactors_backends_are_killed(
        private_cluster: PgCluster) -> None:
    """max_connections = 16, every slot held by idle sessions, the reactor's own sessions
    killed (pg_terminate_backend): it reports the database as unreachable, keeps
    retrying, and once slots free it reconnects, handles every message once, and is
    healthy again."""
    url = private_cluster.url()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM SET max_connections = {MAX_CONNECTIONS}")
    await trio.to_thread.run_sync(private_cluster.restart)
    assert scalar(url, "SHOW max_connections") == MAX_CONNECTIONS
    total = 200
    processor = scripted_processor(concurrency=8, expected=total)
    async with running_reactor(url, {"analytics_queue": processor}, LISTENER_PROBE_S=1,
                               WORKER_INTERVAL_MS=1000) as reactor:
        with reactor.bus.subscribe(buffer=10_000) as sub:
            before = await send(url, "analytics_queue", {"n": 0})
            await wait_for(sub, of_type("job.succeeded", before), within_s=20)
            more: list[psycopg.Connection] = []
            try:
                with _slots_taken(url) as control:
                    rows = control.execute(
                        "SELECT public.enqueue('analytics_queue', jsonb_build_object('n', i)) "
                        "FROM generate_series(1, %s) AS i", (total,)).fetchall()
                    ids = sorted(int(r[0]) for r in rows)
                    killed = await trio.to_thread.run_sync(_fill_again, url, control, more)
                    assert killed >= 2  # the listener and a pooled connection at least
                    degraded = await wait_for(sub, lambda e: e["type"] == "health.degraded",
                                              within_s=30)
                    await eventually(lambda: not reactor.health.healthy, within_s=30)
                    # It keeps trying, and the full server refuses it: only the reactor
                    # connects now, so every refusal the server logs from here is its own.
                    offset = private_cluster.log_file.stat().st_size

                    def refusals() -> int:
                        with private_cluster.log_file.open("rb") as server_log:
                            server_log.seek(offset)
                            return server_log.read().count(b"too many clients already")

                    await eventually(lambda: refusals() >= 3, within_s=30, every_s=0.2)
                    assert reactor.listener.connected is False
                    assert await trio.to_thread.run_sync(_reactor_sessions, control) == 0
                    faults = sorted({f.reason for f in reactor.health.faults})
                    refused = refusals()
            finally:
                for conn in more:
                    conn.close()
            await wait_for(sub, of_type("listener.connected"), within_s=60)
            await eventually(lambda: processor.all_done.is_set(), within_s=60)
            await eventually(lambda: reactor.health.healthy and not reactor.health.faults,
                             within_s=60)
    assert degraded[0]["reason"] in ("database_unreachable", "listener_down")
    assert set(faults) <= {"database_unreachable", "listener_down"}
    handled = [msg_id for msg_id, _ in processor.seen if msg_id != before]
    assert sorted(handled) == ids  # every message once: none lost, none run twice
    assert sorted(processor.finished) == sorted([before, *ids])
    assert await sql(url, "SELECT count(*) FROM pgmq.q_analytics_queue") == [(0,)]
    assert await sql(url, "SELECT count(*) FROM pgmq.q_analytics_queue_dlq") == [(0,)]
    print(f"every slot taken, {killed} reactor sessions killed: degraded ({faults}), "
          f"{refused} reconnects refused by the full server; {total} jobs once each after "
          "the slots freed")


# -- 4. a 200,000-message backlog at start ----------------------------------------------------
@pytest.mark.process
def test_a_200000_message_backlog_at_start_is_worked_through_in_bounded_memory(
        database_url: str, tmp_path: Path) -> None:
    """`reactor run` starts on a queue of 200,000 messages: it reads them in batches (its
    memory does not grow with the backlog), works through the first 5,000 (50 batches),
    and a SIGTERM then stops it cleanly: every message it finished was done once, the rest
    still wait, nothing dead-lettered. (Draining all 200,000 takes ~4 min on the 2-core VM:
    the rate does not fall with the backlog, so the first batches show what the rest
    would.)"""
    total, worked = 200_000, 5_000
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pgmq.send_batch('analytics_queue', array_agg(jsonb_build_object("
                     "'event', 'backlog', 'properties', jsonb_build_object('n', i)))) "
                     "FROM generate_series(1, %s) AS i", (total,))
    log = tmp_path / "reactor.log"
    with reactor_process(database_url, log, **FAST) as proc:
        started = time.monotonic()
        port = ports(proc, log, within_s=60)
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM public.analytics_events")
                   >= worked, 300, "the first 5,000 of the backlog", every_s=0.5)
        work_s = time.monotonic() - started
        peak_mb = _peak_rss_mb(proc.pid)
        wait_healthy(port.http, proc, log)
        assert _stop(proc) == 0
    done = scalar(database_url, "SELECT count(*) FROM public.analytics_events")
    assert done >= worked
    assert scalar(database_url, "SELECT count(DISTINCT source_msg_id) FROM "
                                "public.analytics_events") == done
    assert scalar(database_url, "SELECT count(*) FROM pgmq.a_analytics_queue") == done
    assert scalar(database_url, "SELECT max(read_ct) FROM pgmq.a_analytics_queue") == 1
    assert scalar(database_url, "SELECT count(*) FROM pgmq.q_analytics_queue") == total - done
    assert scalar(database_url, "SELECT count(*) FROM pgmq.q_analytics_queue_dlq") == 0
    print(f"200,000-message backlog: {done:,} done in {work_s:.1f} s "
          f"({done / work_s:,.0f} jobs/s), peak RSS (VmHWM) {peak_mb:.0f} MB")
    assert peak_mb < 500, f"peak RSS {peak_mb:.0f} MB"


# -- 5. a multi-host DATABASE_URL whose first host is down ------------------------------------
async def test_a_multi_host_database_url_with_its_first_host_down(database_url: str) -> None:
    """postgresql://…@127.0.0.1:<refused>,127.0.0.1:<real>/db (libpq's multi-host form):
    the reactor connects to the second host, drains what waited, wakes on LISTEN (the
    poll is 60 s), and reconnects there after its sessions are killed."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listened on: connections are refused
        dead_port = closed.getsockname()[1]
        real = psycopg.conninfo.conninfo_to_dict(database_url)
        multi = (f"postgresql://{real['user']}@127.0.0.1:{dead_port},127.0.0.1:{real['port']}"
                 f"/{real['dbname']}")
        waiting = [await send(database_url, "analytics_queue", {"event": f"w{i}"}, notify=False)
                   for i in range(5)]
        processor = scripted_processor()
        async with running_reactor(multi, {"analytics_queue": processor},
                                   LISTENER_PROBE_S=1) as reactor:
            with reactor.bus.subscribe(buffer=10_000) as sub:
                await eventually(lambda: sorted(processor.finished) == waiting, within_s=30)
                assert reactor.listener.connected
                assert reactor.listener.notifications_work
                woken = await send(database_url, "analytics_queue", {"event": "woken"})
                await wait_for(sub, of_type("job.succeeded", woken), within_s=20)
                await sql(database_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE application_name LIKE 'reactor%'")
                await wait_for(sub, of_type("listener.lost"), within_s=30)
                await wait_for(sub, of_type("listener.connected"), within_s=30)
                after = await send(database_url, "analytics_queue", {"event": "after"})
                await wait_for(sub, of_type("job.succeeded", after), within_s=20)
                await eventually(lambda: reactor.health.healthy and not reactor.health.faults,
                                 within_s=30)
    assert sorted(processor.seen) == [(i, 1) for i in [*waiting, woken, after]]
    assert await sql(database_url, "SELECT count(*) FROM pgmq.q_analytics_queue") == [(0,)]
