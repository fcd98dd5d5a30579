"""`reactor enqueue` and `reactor dlq list|replay|purge` against a real database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import trio

from tests import factories as f
from tests.harness import of_type, running_reactor, send, wait_for


def cli(url: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reactor", *args], capture_output=True,
                          text=True, env={"PATH": os.environ["PATH"], "DATABASE_URL": url},
                          cwd=cwd, check=False, timeout=60)


def test_enqueue_puts_a_message_and_wakes(database_url: str, db: psycopg.Connection,
                                          tmp_path: Path) -> None:
    db.execute("LISTEN reactor_wakeup")
    result = cli(database_url, "enqueue", "analytics_queue", '{"event": "cli"}', cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f.queued(db, "analytics_queue") == [{"event": "cli"}]
    assert [n.payload for n in db.notifies(timeout=1, stop_after=1)] == ["analytics_queue"]


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
