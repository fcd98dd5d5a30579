"""`reactor watch`: the feed as lines in a terminal or as JSON, filtered, replayed,
with a token, quiet when nothing changes, gone quietly when its stdout closes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import trio

from reactor.engine.watch import format_event
from tests.harness import (
    eventually,
    read_line,
    running_reactor,
    send,
)


def watch_process(port: int, *args: str) -> subprocess.Popen[bytes]:
    """`reactor watch`; read its lines with `watch_line` (a read with a timeout)."""
    return subprocess.Popen(
        [sys.executable, "-m", "reactor", "watch", "--port", str(port), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"PATH": os.environ["PATH"]})


async def watch_line(proc: subprocess.Popen[bytes], within_s: float = 30) -> str:
    assert proc.stdout is not None
    return await trio.to_thread.run_sync(read_line, proc.stdout, within_s)


def stop_watch(proc: subprocess.Popen[bytes]) -> str:
    """Terminate it; its stderr."""
    if proc.poll() is None:
        proc.terminate()
    _, stderr = proc.communicate(timeout=30)
    return stderr.decode()


@pytest.mark.process
async def test_watch_prints_events_as_json_lines(database_url: str) -> None:
    async with running_reactor(database_url) as reactor:
        proc = watch_process(reactor.feed_port, "--json", "--type", "job.succeeded")
        try:
            await eventually(lambda: reactor.bus.subscriber_count >= 1)
            msg_id = await send(database_url, "analytics_queue", {"event": "watched"})
            line = await watch_line(proc)
        finally:
            stop_watch(proc)
    event = json.loads(line)
    assert (event["type"], event["msg_id"]) == ("job.succeeded", msg_id)


@pytest.mark.process
async def test_watch_queue_shows_only_that_queue(database_url: str) -> None:
    async with running_reactor(database_url) as reactor:
        # Jobs only: the reactor's own events (email_queue's depth) may come first on a
        # slow machine. The other two jobs pass that filter and not --queue.
        proc = watch_process(reactor.feed_port, "--json", "--queue", "email_queue",
                             "--type", "job.")
        try:
            await eventually(lambda: reactor.bus.subscriber_count >= 1)
            reactor.bus.publish("job.succeeded", "analytics_queue", 1, 1, 1.0)
            reactor.bus.publish("job.retrying", "payment_processing_queue", 2, 1, 1.0)
            reactor.bus.publish("job.succeeded", "email_queue", 3, 1, 1.0)
            first = json.loads(await watch_line(proc))
        finally:
            stop_watch(proc)
    # Published in order on one bus: had the others passed the filter, they came first.
    assert (first["queue"], first["msg_id"]) == ("email_queue", 3)


@pytest.mark.process
async def test_watch_replay_first_shows_the_last_events(database_url: str) -> None:
    async with running_reactor(database_url) as reactor:
        for n in range(1, 6):
            reactor.bus.publish("job.succeeded", "analytics_queue", n, 1, 1.0)
        proc = watch_process(reactor.feed_port, "--json", "--replay", "2", "--type", "job.")
        try:
            replayed = [json.loads(await watch_line(proc)) for _ in range(2)]
            await eventually(lambda: reactor.bus.subscriber_count >= 1)
            reactor.bus.publish("job.succeeded", "analytics_queue", 6, 1, 1.0)
            live = json.loads(await watch_line(proc))
        finally:
            stop_watch(proc)
    assert [e["msg_id"] for e in replayed] == [4, 5]  # the last two, oldest first
    assert live["msg_id"] == 6


@pytest.mark.process
async def test_watch_token_is_sent_in_a_header_and_a_wrong_one_is_named(
        database_url: str) -> None:
    async with running_reactor(database_url, FEED_TOKEN="t0ken-for-watch") as reactor:
        # Only job.succeeded: the reactor's own events (a queue depth, a health change)
        # may come first when the machine is slow (soak run 4 saw one).
        proc = watch_process(reactor.feed_port, "--json", "--token", "t0ken-for-watch",
                             "--type", "job.succeeded")
        try:
            await eventually(lambda: reactor.bus.subscriber_count >= 1)
            reactor.bus.publish("job.succeeded", "email_queue", 7, 1, 1.0)
            event = json.loads(await watch_line(proc))
        finally:
            stop_watch(proc)
        wrong = await trio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "reactor", "watch", "--port", str(reactor.feed_port),
             "--token", "not-the-token"], capture_output=True, text=True,
            env={"PATH": os.environ["PATH"]}, timeout=60, check=False))
    assert event["msg_id"] == 7
    assert wrong.returncode != 0
    [line] = wrong.stderr.strip().splitlines()
    assert "token" in line.lower()
    assert "not-the-token" not in line


@pytest.mark.process
async def test_watch_is_quiet_when_nothing_changes(database_url: str) -> None:
    async with running_reactor(database_url) as reactor:
        queue = "a_rather_long_queue_name_for_the_terminal"
        # This queue only: the reactor's own queues report their depths too, whenever a
        # slow machine gets to it.
        proc = watch_process(reactor.feed_port, "--queue", queue)
        try:
            await eventually(lambda: reactor.bus.subscriber_count >= 1)
            for depth in (0, 0, 0, 3, 3, 3, 0):
                reactor.bus.publish("queue.depth", queue, depth=depth, oldest_age_s=1)
            reactor.bus.publish("job.succeeded", queue, 41, 1, 2.0)
            lines: list[str] = []
            while not lines or "job.succeeded" not in lines[-1]:
                lines.append(await watch_line(proc))
        finally:
            stop_watch(proc)
    depth_lines = [line for line in lines if "queue.depth" in line]
    assert [line.split("depth ")[-1].split()[0] for line in depth_lines] == ["0", "3", "0"]
    assert all(queue + "  " in line for line in lines)  # the long name fits its column
    assert "msg #41" in lines[-1]


@pytest.mark.process
async def test_watch_exits_quietly_when_its_stdout_closes(database_url: str) -> None:
    async with running_reactor(database_url) as reactor:
        proc = watch_process(reactor.feed_port, "--json", "--type", "job.succeeded")
        try:
            await eventually(lambda: reactor.bus.subscriber_count >= 1)
            reactor.bus.publish("job.succeeded", "email_queue", 1, 1, 1.0)
            assert "job.succeeded" in await watch_line(proc)
            assert proc.stdout is not None
            proc.stdout.close()  # like `reactor watch | head -1`
            # Events keep coming until it notices (its next write fails) and leaves.
            n = 2
            while proc.poll() is None and n < 10_000:
                reactor.bus.publish("job.succeeded", "email_queue", n, 1, 1.0)
                n += 1
                await trio.sleep(0.01)
            code = await trio.to_thread.run_sync(lambda: proc.wait(timeout=30))
        finally:
            stderr = stop_watch(proc)
    assert code == 0
    assert stderr == ""


@pytest.mark.process
def test_watch_explains_an_unreachable_feed() -> None:
    with socket.socket() as closed:  # bound, never listened on: connections are refused
        closed.bind(("127.0.0.1", 0))
        result = subprocess.run([sys.executable, "-m", "reactor", "watch", "--port",
                                 str(closed.getsockname()[1])], capture_output=True, text=True,
                                env={"PATH": os.environ["PATH"]}, timeout=30, check=False)
    assert result.returncode == 1
    assert "cannot reach the feed" in result.stderr
    assert "FEED_PORT" in result.stderr


def test_watch_line_format() -> None:
    line = format_event({"ts": 1795680000.25, "type": "job.retrying", "queue": "email_queue",
                         "msg_id": 42, "attempt": 2, "duration_ms": 12.34,
                         "error": "SMTP timed out"}, color=False)
    assert "email_queue" in line
    assert "job.retrying" in line
    assert "msg #42" in line
    assert "try 2" in line
    assert "12.3 ms" in line
    assert line.endswith("SMTP timed out")
    assert format_event({"type": "job.succeeded"}, color=True).startswith("\x1b[32m")
