"""Wait times of a running reactor: every outcome event of a first delivery says how
long it waited (enqueue to start) and how long until it was settled; /metrics has them
as histograms with the oldest visible message's age, and the dashboard's p50/p95 per
queue come from the database, so a new reactor shows them too."""

from __future__ import annotations

import httpx

from reactor.engine.events import Event
from reactor.testing import wait_for_each
from tests.harness import running_reactor, scripted_processor, send


async def test_waits_are_measured_exported_and_survive_a_restart(database_url: str) -> None:
    slow = scripted_processor(concurrency=1, expected=6)
    # One worker and batches of one: one message runs, two wait taken (prefetched), and
    # the others wait visible.
    async with running_reactor(database_url, processors={"analytics_queue": slow},
                               MAX_TASKS_PER_CYCLE=1) as reactor:
        with reactor.bus.subscribe() as sub:
            # The first runs longer than a depth tick (5 s).
            ids = [await send(database_url, "analytics_queue", {"sleep_s": 8 if i == 0 else 0})
                   for i in range(6)]
            done: list[Event] = []

            def seen_waiting(event: Event) -> bool:  # a depth tick that saw messages wait
                return (event["type"] == "queue.depth" and event["queue"] == "analytics_queue"
                        and (event.get("oldest_visible_age_s") or 0) > 0)

            def six_succeeded(event: Event) -> bool:  # every job.succeeded, in arrival order
                if event["type"] == "job.succeeded":
                    done.append(event)
                return len(done) == 6

            # Ticks come from the depth task, successes from the drainer: a tick read while
            # messages waited may be published after the first of them succeeded.
            [depth, _] = await wait_for_each(sub, seen_waiting, six_succeeded)
        assert [e["msg_id"] for e in done] == ids
        assert all(e["wait_ms"] >= 0 and e["settle_ms"] >= e["duration_ms"] for e in done)
        # The last one waited for the first to finish its 8 seconds (less the time the
        # test took to send the others).
        assert done[5]["wait_ms"] >= 5000
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
            text = (await http.get("/metrics")).text
        assert 'reactor_job_wait_seconds_count{queue="analytics_queue"} 6.0' in text
        assert 'reactor_job_settle_seconds_count{queue="analytics_queue"} 6.0' in text
        assert 'reactor_queue_oldest_visible_age_seconds{queue="analytics_queue"}' in text
        assert depth["oldest_visible_age_s"] > 0

    # Another reactor (nothing in its memory): the percentiles come from the database.
    async with running_reactor(database_url) as reactor, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        overview = (await http.get("/api/overview")).json()
    waits = overview["waits"]["analytics_queue"]
    assert waits["count"] == 6
    assert 0 <= waits["p50_s"] <= waits["p95_s"]
    assert waits["p95_s"] >= 5  # five of six waited 8 s
    assert overview["waits_window_s"] == 3600
