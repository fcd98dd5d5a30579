"""The event bus: every lifecycle event goes out from here, to the logs and to
subscribers (the websocket feed, the metrics, the tests).

Publishing never blocks and never waits: each subscriber has a bounded
buffer, and one that falls behind is dropped and told why.

The replay ring (`recent`) keeps what happened (jobs, lifecycle, health), not
state ticks: `queue.depth` and `wakeup` would push every job out of it within
minutes on an idle reactor. Depth is state, so the bus keeps only the latest
`queue.depth` per queue (`depths`), which the feed sends before a replay.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import structlog
import trio

from reactor.engine.logs import level_enabled, mask_emails_in

__all__ = ["EVENT_TYPES", "NOT_REPLAYED", "Event", "EventBus", "Subscription", "Succeeded",
           "SucceededSink"]

EVENT_TYPES: Final = (
    "reactor.started", "reactor.stopping", "listener.connected", "listener.lost", "wakeup",
    "job.started", "job.succeeded", "job.retrying", "job.dead_lettered", "queue.depth",
    "health.degraded", "health.recovered", "job.deferred",
    # A person acted on dead letters (the dashboard or `reactor dlq`: reactor.engine.dead_letters).
    "dlq.replayed", "dlq.discarded", "dlq.purged",
)

# Outcomes and lifecycle go to the log at info; the per-job chatter does not.
# A job that succeeded is a counter (metrics) and a feed event, not a log line: one JSON
# line per job cost a third of the throughput at LOG_LEVEL=info (docs/benchmarks.md).
_LOG_LEVEL = {
    "job.started": "debug", "job.succeeded": "debug", "wakeup": "debug", "queue.depth": "debug",
    "job.retrying": "warning", "job.dead_lettered": "error", "listener.lost": "warning",
    # The other side said "not now" (a relay's 4xx): expected, not a failure.
    "job.deferred": "info",
    # health.* are logged by reactor.engine.health itself, once per change.
    "health.degraded": "debug", "health.recovered": "debug",
}

# Ticks that describe state or are noise: never kept in the replay ring.
NOT_REPLAYED: Final = frozenset({"queue.depth", "wakeup"})

Event = dict[str, Any]


class Succeeded(NamedTuple):
    """One job that succeeded and was archived, as `EventBus.publish_succeeded` takes it:
    the fields of its `job.succeeded` event, in milliseconds, not yet rounded."""

    msg_id: int
    attempt: int
    duration_ms: float
    wait_ms: float | None
    settle_ms: float | None


# The batch form of a sink (see EventBus.add_sink): (queue, ts, the jobs of one archive).
SucceededSink = Callable[[str, float, Sequence[Succeeded]], None]


def _ms3(value: float | None) -> float | None:
    # round(x, 3) is correctly rounded through the float's decimal digits: ~1 us a call
    # here, so the hot path keeps raw floats and only a built event is rounded.
    return None if value is None else round(value, 3)


def _succeeded_event(event_id: int, ts: float, queue: str, job: Succeeded) -> Event:
    return {"id": event_id, "ts": ts, "type": "job.succeeded", "queue": queue,
            "msg_id": job.msg_id, "attempt": job.attempt, "duration_ms": _ms3(job.duration_ms),
            "error": None, "wait_ms": _ms3(job.wait_ms), "settle_ms": _ms3(job.settle_ms)}


@dataclass(eq=False)
class Subscription:
    """A subscriber's bounded buffer; `dropped` says why it was cut off."""

    receive: trio.MemoryReceiveChannel[Event]
    send: trio.MemorySendChannel[Event]
    dropped: str | None = None
    # Only events it accepts are handed over (a filtered client is not woken for others).
    accept: Callable[[Event], bool] | None = None
    # Set when the bus drops this subscriber (a consumer stuck elsewhere can notice).
    gone: trio.Event = field(default_factory=trio.Event)


@dataclass
class EventBus:
    """Fan-out of events; the single place an event is built."""

    ring_size: int = 1000
    # Called synchronously for every event (the metrics); must be cheap and never raise.
    # A sink added with `add_sink` may have a batch form for job.succeeded.
    sinks: list[Callable[[Event], None]] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _subscribers: set[Subscription] = field(default_factory=set)
    # The replay ring: events, or a job.succeeded not built yet (see publish_succeeded).
    _ring: deque[Event | tuple[int, float, str, Succeeded]] = field(init=False)
    # The latest queue.depth event of each queue (current state, not history).
    depths: dict[str, Event] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._ring = deque(maxlen=self.ring_size)
        self._paired: list[tuple[Callable[[Event], None], SucceededSink | None]] = []
        self.dropped_count = 0
        self._log = structlog.get_logger("reactor")

    @property
    def recent(self) -> list[Event]:
        """The replay ring, oldest first (what happened: jobs, lifecycle, health)."""
        return [e if isinstance(e, dict) else _succeeded_event(*e) for e in self._ring]

    def add_sink(self, each: Callable[[Event], None],
                 succeeded: SucceededSink | None = None) -> None:
        """A sink for every event, and its batch form for job.succeeded (`succeeded`:
        None when it has nothing to do with those). While every sink has come this
        way, nobody subscribes and the log does not write job.succeeded, a batch of
        them costs no event each: `publish_succeeded` hands it to the batch forms."""
        self.sinks.append(each)
        self._paired.append((each, succeeded))

    def wanted(self, type_: str) -> bool:
        """Whether anyone would see an event of this type that no sink counts (job.started):
        a subscriber or the log. Lets a hot path skip building it."""
        return bool(self._subscribers) or level_enabled(_LOG_LEVEL.get(type_, "info"))

    def publish(self, type_: str, queue: str | None = None, msg_id: int | None = None,
                attempt: int | None = None, duration_ms: float | None = None,
                error: str | None = None, **extra: Any) -> Event:
        """Build, log and fan out one event (never blocks)."""
        event: Event = {
            "id": next(self._ids), "ts": time.time(), "type": type_, "queue": queue,
            "msg_id": msg_id, "attempt": attempt, "duration_ms": duration_ms,
            "error": mask_emails_in(error) if error else None,
        }
        if extra:
            event.update(extra)
        if type_ == "queue.depth":
            if queue is not None:
                self.depths[queue] = event
        elif type_ not in NOT_REPLAYED:
            self._ring.append(event)
        for sink in self.sinks:
            sink(event)
        level = _LOG_LEVEL.get(type_, "info")
        if level_enabled(level):
            getattr(self._log, level)(type_, **{k: v for k, v in event.items()
                                                if v is not None and k not in ("type", "ts")})
        for sub in tuple(self._subscribers):
            if sub.accept is not None and not sub.accept(event):
                continue
            try:
                sub.send.send_nowait(event)
            except trio.WouldBlock:
                self._drop(sub, "too slow: the buffer of events filled up")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(sub)
        return event

    def publish_succeeded(self, queue: str, jobs: Sequence[Succeeded]) -> None:
        """job.succeeded for each of `jobs` (archived together): one event each when
        anyone would see it (a subscriber, the log, a sink without a batch form);
        otherwise the sinks count the batch at once and the replay ring keeps each
        job's id and fields, built into an event only if a feed client replays it."""
        if not jobs:
            return
        if (self._subscribers or level_enabled(_LOG_LEVEL["job.succeeded"])
                or len(self._paired) != len(self.sinks)
                or any(each is not paired for each, (paired, _) in zip(self.sinks, self._paired,
                                                                    strict=True))):
            for job in jobs:
                self.publish("job.succeeded", queue, job.msg_id, job.attempt,
                             _ms3(job.duration_ms), wait_ms=_ms3(job.wait_ms),
                             settle_ms=_ms3(job.settle_ms))
            return
        ts = time.time()
        # (id, ts, queue, job) each, zipped in C: a generator costs a frame resumption a job.
        self._ring.extend(zip(itertools.islice(self._ids, len(jobs)), itertools.repeat(ts),
                              itertools.repeat(queue), jobs))
        for _, succeeded in self._paired:
            if succeeded is not None:
                succeeded(queue, ts, jobs)

    def _drop(self, sub: Subscription, reason: str) -> None:
        self.dropped_count += 1
        sub.dropped = reason
        self._subscribers.discard(sub)
        sub.send.close()
        sub.gone.set()

    @contextmanager
    def subscribe(self, buffer: int = 1000,
                  accept: Callable[[Event], bool] | None = None) -> Iterator[Subscription]:
        """A subscription for the duration of the `with` block."""
        send, receive = trio.open_memory_channel[Event](buffer)
        sub = Subscription(receive, send, accept=accept)
        self._subscribers.add(sub)
        try:
            yield sub
        finally:
            self._subscribers.discard(sub)
            send.close()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)
