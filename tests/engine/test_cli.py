"""`reactor enqueue`, `reactor status` and `reactor dlq list|replay|purge` against a real
database."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import psycopg
import pytest
import trio

from tests import factories as f
from tests.harness import (
    of_type,
    reactor_command,
    running_reactor,
    scripted_processor,
    send,
    wait_for,
)

# Every test here runs the `reactor` command line as a child process.
pytestmark = pytest.mark.process


def cli(url: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return reactor_command(*args, cwd=cwd, DATABASE_URL=url)


def test_enqueue_puts_a_message_and_wakes(database_url: str, db: psycopg.Connection,
                                          tmp_path: Path) -> None:
    db.execute("LISTEN reactor_wakeup")
    result = cli(database_url, "enqueue", "analytics_queue", '{"event": "cli"}', cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f.queued(db, "analytics_queue") == [{"event": "cli"}]
    assert [n.payload for n in db.notifies(timeout=30, stop_after=1)] == ["analytics_queue"]


def test_enqueue_delay_keeps_the_message_invisible_for_that_long(
        database_url: str, db: psycopg.Connection, tmp_path: Path) -> None:
    result = cli(database_url, "enqueue", "analytics_queue", '{"event": "later"}',
                 "--delay", "600", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    msg_id = int(result.stdout.strip())
    row = db.execute("SELECT message, extract(epoch FROM vt - enqueued_at) "
                     "FROM pgmq.q_analytics_queue WHERE msg_id = %s", (msg_id,)).fetchone()
    assert row is not None
    assert row[0] == {"event": "later"}
    assert 599 <= row[1] <= 601
    assert db.execute("SELECT count(*) FROM pgmq.read('analytics_queue', 30, 10)"
                      ).fetchone() == (0,)


def dead_letters(conn: psycopg.Connection, count: int) -> list[int]:
    """`count` dead letters in analytics_queue_dlq, as the drainer writes them."""
    rows = conn.execute(
        "SELECT pgmq.send('analytics_queue_dlq', jsonb_build_object("
        "'original', jsonb_build_object('event', 'replayed', 'n', i), 'error', 'bad', "
        "'attempts', 1, 'failed_at', now(), 'source_msg_id', 1000 + i)) "
        "FROM generate_series(1, %s) AS i", (count,)).fetchall()
    return [int(r[0]) for r in rows]


def test_dlq_replay_id_replays_that_letter_only(database_url: str, db: psycopg.Connection,
                                                tmp_path: Path) -> None:
    _, second, _ = dead_letters(db, 3)
    result = cli(database_url, "dlq", "replay", "analytics_queue", "--id", str(second),
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"replayed dlq #{second} (msg #1002) onto analytics_queue as msg #" in result.stdout
    assert "replayed 1 message(s)" in result.stdout
    assert f.queued(db, "analytics_queue") == [{"event": "replayed", "n": 2}]
    assert [m["source_msg_id"] for m in f.queued(db, "analytics_queue_dlq")] == [1001, 1003]
    again = cli(database_url, "dlq", "replay", "analytics_queue", "--id", str(second),
                cwd=tmp_path)
    assert again.returncode == 1
    assert f"no replayable dead letter with dlq id {second}" in again.stderr


def test_dlq_replay_takes_every_letter_not_the_first_thousand(
        database_url: str, db: psycopg.Connection, tmp_path: Path) -> None:
    total = 1_200
    dead_letters(db, total)
    result = cli(database_url, "dlq", "replay", "analytics_queue", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"replayed {total} message(s) onto analytics_queue" in result.stdout
    assert len(f.queued(db, "analytics_queue")) == total
    assert f.queued(db, "analytics_queue_dlq") == []


def test_enqueue_refuses_bad_input_in_one_line(database_url: str, tmp_path: Path) -> None:
    for args, expected in [
        (("enqueue", "analytics_queue", "{nope"), "JSON is not valid"),
        (("enqueue", "analytics_queue", "[1]"), "JSON must be an object"),
        (("enqueue", "nope_queue", "{}"), "unknown queue 'nope_queue'"),
    ]:
        result = cli(database_url, *args, cwd=tmp_path)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1
        assert expected in result.stderr


async def test_dead_letters_list_replay_and_purge(database_url: str, tmp_path: Path) -> None:
    async with running_reactor(database_url) as reactor:
        with reactor.bus.subscribe() as sub:
            bad = await send(database_url, "analytics_queue", {"evnt": "typo"})
            await wait_for(sub, of_type("job.dead_lettered", bad))

    listed = await trio.to_thread.run_sync(
        lambda: cli(database_url, "dlq", "list", "analytics_queue", "--json", cwd=tmp_path))
    [letter] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert letter["original"] == {"evnt": "typo"}
    assert letter["source_msg_id"] == bad
    assert "event: Field required" in letter["error"]

    # The app's bug is fixed (here: the message is corrected in the DLQ), then replayed.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE pgmq.q_analytics_queue_dlq SET message = jsonb_set(message, "
                     "'{original}', '{\"event\": \"fixed\"}')")
    async with running_reactor(database_url) as reactor:
        with reactor.bus.subscribe() as sub:
            replay = await trio.to_thread.run_sync(
                lambda: cli(database_url, "dlq", "replay", "analytics_queue", cwd=tmp_path))
            assert replay.returncode == 0, replay.stderr
            assert "replayed 1 message(s)" in replay.stdout
            [done] = await wait_for(sub, of_type("job.succeeded"))
    assert done["attempt"] == 1  # a fresh attempt count
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert conn.execute("SELECT event FROM public.analytics_events").fetchall() == [
            ("fixed",)]
        assert f.queued(conn, "analytics_queue_dlq") == []
        conn.execute("SELECT pgmq.send('analytics_queue_dlq', '{\"original\": {}}')")

    refused = cli(database_url, "dlq", "purge", "analytics_queue", cwd=tmp_path)
    assert refused.returncode == 1
    assert "--yes" in refused.stderr
    purged = cli(database_url, "dlq", "purge", "analytics_queue", "--yes", cwd=tmp_path)
    assert purged.returncode == 0
    assert "purged 1 dead letter(s)" in purged.stdout
    assert "no dead letters" in cli(database_url, "dlq", "list", "analytics_queue",
                                    cwd=tmp_path).stdout


def test_status_shows_queues_without_a_running_reactor(database_url: str, db: psycopg.Connection,
                                                       tmp_path: Path) -> None:
    db.execute("SELECT public.enqueue('analytics_queue', '{\"event\": \"waiting\"}')")
    db.execute("SELECT pgmq.send('email_queue_dlq', '{\"original\": {}}')")
    result = cli(database_url, "status", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    [analytics] = [line for line in lines if line.startswith("analytics_queue ")]
    assert analytics.split()[1] == "1"  # depth
    [mail] = [line for line in lines if line.startswith("email_queue ")]
    assert mail.split()[-1] == "1"  # one dead letter
    assert "pg_cron is not installed in this database" in result.stdout
    data = json.loads(cli(database_url, "status", "--json", cwd=tmp_path).stdout)
    assert {q["queue"]: q["depth"] for q in data["queues"]}["analytics_queue"] == 1


async def test_status_separates_done_dead_lettered_and_retrying(database_url: str) -> None:
    scripted = scripted_processor()
    async with running_reactor(database_url, {"analytics_queue": scripted},
                               RETRY_BASE_S=600) as reactor:
        with reactor.bus.subscribe() as sub:
            for body in ({}, {}, {"permanent": True}, {"fail_times": 100}):
                await send(database_url, "analytics_queue", body)
            outcomes = await wait_for(  # in whatever order they are recorded
                sub, lambda e: e["type"] in ("job.succeeded", "job.dead_lettered",
                                             "job.retrying"), count=4)
    assert sorted(e["type"] for e in outcomes) == [
        "job.dead_lettered", "job.retrying", "job.succeeded", "job.succeeded"]
    result = await trio.to_thread.run_sync(lambda: cli(database_url, "status"))
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split()[:9] == ["queue", "depth", "retrying", "oldest", "done", "1h", "dead",
                                  "1h", "done"]
    line = next(r for r in rows if r.startswith("analytics_queue"))
    depth, retrying, _oldest, done_1h, dead_1h, done_24h, dead_24h, dlq = line.split()[1:9]
    assert (depth, retrying, done_1h, dead_1h, done_24h, dead_24h, dlq) == (
        "1", "1", "2", "1", "2", "1", "1")
    as_json = await trio.to_thread.run_sync(lambda: cli(database_url, "status",
                                                                "--json"))
    analytics = next(q for q in json.loads(as_json.stdout)["queues"]
                     if q["queue"] == "analytics_queue")
    assert (analytics["done_1h"], analytics["dead_lettered_1h"], analytics["retrying"]) == (
        2, 1, 1)


async def test_dlq_list_shows_both_ids_and_replay_takes_the_message_id(
        database_url: str) -> None:
    async with running_reactor(database_url) as reactor:
        with reactor.bus.subscribe() as sub:
            for _ in range(2):
                await send(database_url, "analytics_queue", {"event": "ok"})
            bad = await send(database_url, "analytics_queue", {"no_event": True})
            await wait_for(sub, of_type("job.dead_lettered", bad))
    listed = await trio.to_thread.run_sync(lambda: cli(database_url, "dlq", "list",
                                                               "analytics_queue"))
    header, row, hint = listed.stdout.splitlines()
    assert header.split()[:4] == ["dlq", "id", "msg", "id"]
    dlq_id, msg_id = row.split()[:2]
    assert int(msg_id) == bad
    assert int(dlq_id) != bad  # two different ids, each in its own labelled column
    assert "event: Field required" in row
    assert "--msg-id" in hint
    unknown = await trio.to_thread.run_sync(lambda: cli(
        database_url, "dlq", "replay", "analytics_queue", "--msg-id", "999999"))
    assert unknown.returncode == 1
    assert "no replayable dead letter of message 999999" in unknown.stderr
    replayed = await trio.to_thread.run_sync(lambda: cli(
        database_url, "dlq", "replay", "analytics_queue", "--msg-id", str(bad)))
    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed dlq #{dlq_id} (msg #{bad}) onto analytics_queue as msg #" in replayed.stdout
    after = await trio.to_thread.run_sync(lambda: cli(database_url, "dlq", "list",
                                                              "analytics_queue"))
    assert after.stdout.strip() == "no dead letters in analytics_queue"
