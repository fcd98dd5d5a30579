"""Running a reactor inside a test, and the scripted processor the tests drive."""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import httpx
import psycopg
import trio
from psycopg.types.json import Jsonb

from reactor.config import load_settings
from reactor.core.app import Reactor
from reactor.core.events import Event, Subscription
from reactor.processors.base import Job, MessageModel, PermanentError, Processor


class ScriptedMessage(MessageModel):
    """The message says how its handler behaves."""

    fail_times: int = 0          # raise a transient error on the first N deliveries
    permanent: bool = False      # raise PermanentError
    sleep_s: float = 0.0         # take this long
    hang_first: bool = False     # hang forever on the first delivery (job timeout)


class ScriptedProcessor(Processor[ScriptedMessage]):
    """Does what each message says; records every delivery it sees."""

    queue = "analytics_queue"
    model = ScriptedMessage
    seen: ClassVar[list[tuple[int, int]]]         # (msg_id, attempt) of every delivery
    finished: ClassVar[list[int]]                 # msg_ids whose handler returned
    per_instance: ClassVar[dict[int, int]]        # id(processor) → jobs: one per replica
    all_done: ClassVar[trio.Event]
    expected: ClassVar[int] = 0

    async def handle(self, job: Job[ScriptedMessage]) -> None:
        cls = type(self)
        msg = job.message
        cls.seen.append((job.msg_id, job.delivery.attempt))
        cls.per_instance[id(self)] = cls.per_instance.get(id(self), 0) + 1
        if msg.permanent:
            raise PermanentError("scripted permanent failure")
        if job.delivery.attempt <= msg.fail_times:
            raise RuntimeError(f"scripted failure {job.delivery.attempt}")
        if msg.hang_first and job.delivery.attempt == 1:
            await trio.sleep_forever()
        if msg.sleep_s:
            await trio.sleep(msg.sleep_s)
        cls.finished.append(job.msg_id)
        if len(cls.finished) == cls.expected:
            cls.all_done.set()


def scripted_processor(*, timeout_s: float = 30.0, concurrency: int = 50,
                       expected: int = 0) -> type[ScriptedProcessor]:
    """A fresh subclass (its own records); `all_done` is set after `expected` successes."""
    return type("Scripted", (ScriptedProcessor,), {
        "timeout_s": timeout_s, "concurrency": concurrency, "seen": [], "finished": [],
        "per_instance": {}, "all_done": trio.Event(), "expected": expected,
    })


def settings_for(url: str, **env: Any) -> Any:
    values: dict[str, Any] = {"DATABASE_URL": url, "WORKER_INTERVAL_MS": 60_000,
                              "RETRY_BASE_S": 1, "LOG_LEVEL": "warning", "LOG_FORMAT": "json",
                              "EMAIL_PROVIDER": "file", "FEED_PORT": 0, "METRICS_PORT": 0,
                              "EMAIL_OUTBOX_DIR": tempfile.mkdtemp(prefix="reactor-outbox-")}
    values.update(env)
    return load_settings(_env_file=None, **values)


@asynccontextmanager
async def running_reactor(url: str, processors: Mapping[str, type[Processor[Any]]] | None = None,
                          **env: Any) -> AsyncIterator[Reactor]:
    """A reactor in the test's nursery; stopped (gracefully) on exit."""
    reactor = Reactor(settings_for(url, **env), processors=processors)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(reactor.run, handle_signals=False))
        try:
            yield reactor
        finally:
            reactor.stop()


async def sql(url: str, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement in a worker thread (so the reactor keeps running)."""
    def run() -> list[tuple[Any, ...]]:
        with psycopg.connect(url, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []
    return await trio.to_thread.run_sync(run)


async def send(url: str, queue: str, body: Any, *, notify: bool = True) -> int:
    """Enqueue like the app does (public.enqueue), or with pgmq.send alone (no NOTIFY)."""
    query = ("SELECT public.enqueue(%s, %s)" if notify else "SELECT pgmq.send(%s, %s)")
    [(msg_id,)] = await sql(url, query, (queue, Jsonb(body)))
    return int(msg_id)


async def wait_for(sub: Subscription, predicate: Callable[[Event], bool], count: int = 1,
                   within_s: float = 10.0) -> list[Event]:
    """Collect `count` events matching `predicate`; fail after `within_s`."""
    found: list[Event] = []
    with trio.fail_after(within_s):
        async for event in sub.receive:
            if predicate(event):
                found.append(event)
                if len(found) >= count:
                    return found
    raise AssertionError(f"subscription ended: {sub.dropped}")


def of_type(type_: str, msg_id: int | None = None) -> Callable[[Event], bool]:
    return lambda e: e["type"] == type_ and (msg_id is None or e["msg_id"] == msg_id)


async def eventually(condition: Callable[[], Any], within_s: float = 10,
                     every_s: float = 0.02) -> Any:
    """Poll `condition` (state of another process or of the reactor) until it is truthy."""
    with trio.fail_after(within_s):
        while not (result := condition()):  # noqa: ASYNC110 - polling outside state
            await trio.sleep(every_s)
    return result


def wait_healthy(port: int, proc: subprocess.Popen[bytes], log: Path,
                 within_s: float = 30) -> None:
    """Block until a `reactor run` process answers /healthz with 200 (sync tests)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
