"""Prometheus metrics, fed by the event bus (one sink, called for every event, and its
batch form for the jobs of one archive)."""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator, Sequence
from typing import cast

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, utils
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from reactor.engine.events import Event, Succeeded
from reactor.engine.health import Health
from reactor.engine.waits import WAIT_BUCKETS_S

# How prometheus_client writes a bucket's bound (`le`); untyped there.
_le = cast(Callable[[float], str], utils.floatToGoString)

__all__ = ["Metrics"]

_OUTCOMES = {"job.succeeded": "succeeded", "job.retrying": "retried",
             "job.dead_lettered": "dead_lettered"}


class _Series:
    """One queue's histogram: a count per bucket (the last one: above every bound) and the
    sum. Plain Python numbers: the trio thread alone writes them."""

    __slots__ = ("bounds", "counts", "created", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value


class _Histogram(Collector):
    """A histogram by queue, exported as prometheus_client's Histogram exports one
    (`_bucket{le,queue}`, `_count`, `_sum`, `_created`), through the public
    Collector API. prometheus_client's own takes a lock per bucket and per sum at
    every observation (~1.5 us here, three histograms a job); this one counts a
    batch of jobs in a loop of list increments."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = tuple(float(b) for b in buckets)
        self._les = [_le(b) for b in self.bounds] + ["+Inf"]
        self._series: dict[str, _Series] = {}
        registry.register(self)

    def labels(self, queue: str) -> _Series:
        series = self._series.get(queue)
        if series is None:
            series = self._series[queue] = _Series(self.bounds)
        return series

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self.name, self.documentation, "histogram")
        for queue, series in list(self._series.items()):
            cumulative = 0
            for le, count in zip(self._les, list(series.counts), strict=True):
                cumulative += count
                metric.add_sample(f"{self.name}_bucket", {"le": le, "queue": queue},
                                  float(cumulative))
            metric.add_sample(f"{self.name}_count", {"queue": queue}, float(cumulative))
            metric.add_sample(f"{self.name}_sum", {"queue": queue}, series.total)
            metric.add_sample(f"{self.name}_created", {"queue": queue}, series.created)
        yield metric


class Metrics:
    """The reactor's metrics, in a registry of its own (several reactors may share a process)."""

    def __init__(self, feed_clients: Callable[[], int] = lambda: 0,
                 app_event_kinds: tuple[str, ...] = (), health: Health | None = None) -> None:
        """app_event_kinds: the kinds the app declared (App.event_kinds), counted in
        reactor_app_events_total and exported at 0 from the start, so an alert rule on
        one exists before the first such event."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter("reactor_jobs", "Jobs finished, by queue and outcome",
                            ["queue", "outcome"], registry=r)
        self.duration = _Histogram(
            "reactor_job_duration_seconds", "Handler run time", registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        # What families feel: enqueue to start (first deliveries), and start to settled
        # (the outcome in the database: archived, retry recorded, dead-lettered).
        self.wait = _Histogram("reactor_job_wait_seconds",
                               "Enqueue to start of a message's first delivery",
                               registry=r, buckets=WAIT_BUCKETS_S)
        self.settle = _Histogram(
            "reactor_job_settle_seconds", "Start of a delivery to its outcome in the database",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
        self.oldest_visible = Gauge(
            "reactor_queue_oldest_visible_age_seconds",
            "Age of the oldest message no worker holds (0: none waiting)", ["queue"], registry=r)
        self.depth = Gauge("reactor_queue_depth", "Messages waiting or in flight", ["queue"],
                           registry=r)
        self.oldest = Gauge("reactor_queue_oldest_age_seconds", "Age of the oldest message",
                            ["queue"], registry=r)
        self.listener = Gauge("reactor_listener_connected",
                              "1 while the LISTEN connection is up", registry=r)
        # Not an outcome of reactor_jobs_total: a deferred job is not finished, and sums
        # over that counter's outcomes must keep counting each job once.
        self.deferred = Counter("reactor_jobs_deferred", "Deliveries the other side deferred "
                                "(e.g. a relay's 4xx: greylisting); each is tried again later",
                                ["queue"], registry=r)
        self.wakeups = Counter("reactor_wakeups", "NOTIFY wake-ups received", ["queue"],
                               registry=r)
        # From the fault registry (reactor.engine.health), read at each scrape: an alert on
        # "degraded for 5 minutes" needs a series, not a log line.
        faults = health or Health()
        healthy = Gauge("reactor_healthy", "1 while no fault makes /healthz answer 503",
                        registry=r)
        healthy.set_function(lambda: 1.0 if faults.healthy else 0.0)
        degraded = Gauge("reactor_degraded", "1 while any fault is in force (a pooler too)",
                         registry=r)
        degraded.set_function(lambda: 1.0 if faults.faults else 0.0)
        clients = Gauge("reactor_feed_clients", "Websocket feed clients connected", registry=r)
        clients.set_function(lambda: float(feed_clients()))
        app_events = Counter("reactor_app_events", "Events the app's processors published, "
                             "by type (e.g. payment.mismatch)", ["type"], registry=r)
        self._app_events = {kind: app_events.labels(kind) for kind in app_event_kinds}
        self._children: dict[tuple[str, str], Counter] = {}  # labels() locks: cache

    def watch_queues(self, queues: list[str]) -> None:
        """Export the per-queue series at 0 from the start, for the queues this reactor
        drains: an alert rule on one has a series before the first job."""
        for queue in queues:
            for outcome in _OUTCOMES.values():
                key = (queue, outcome)
                if key not in self._children:
                    self._children[key] = self.jobs.labels(queue, outcome)
            self.deferred.labels(queue)
            self.wait.labels(queue)
            self.settle.labels(queue)
            self.oldest_visible.labels(queue).set(0)

    def observe(self, event: Event) -> None:
        """The bus sink."""
        kind = event["type"]
        queue = event["queue"] or ""
        outcome = _OUTCOMES.get(kind)
        if outcome is not None:
            key = (queue, outcome)
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self.jobs.labels(queue, outcome)
            child.inc()
            if event["duration_ms"] is not None:
                self.duration.labels(queue).observe(event["duration_ms"] / 1000)
            self._timings(event, queue)
        elif kind == "queue.depth":
            self.depth.labels(queue).set(event.get("depth") or 0)
            self.oldest.labels(queue).set(event.get("oldest_age_s") or 0)
            if "oldest_visible_age_s" in event:
                self.oldest_visible.labels(queue).set(event["oldest_visible_age_s"] or 0)
        elif kind == "listener.connected":
            self.listener.set(1)
        elif kind == "listener.lost":
            self.listener.set(0)
        elif kind == "wakeup":
            self.wakeups.labels(queue).inc()
        elif kind == "job.deferred":
            self.deferred.labels(queue).inc()
            self._timings(event, queue)
        elif (app_event := self._app_events.get(kind)) is not None:
            app_event.inc()

    def observe_succeeded(self, queue: str, ts: float, jobs: Sequence[Succeeded]) -> None:
        """The bus sink's batch form: the jobs of one archive, counted at once."""
        del ts
        key = (queue, "succeeded")
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.jobs.labels(queue, "succeeded")
        child.inc(len(jobs))
        # The three histograms in one pass over the jobs (a generator per histogram cost a
        # frame resumption per job each); each sum is added up over the batch, then once
        # to its series' total.
        duration, wait, settle = (self.duration.labels(queue), self.wait.labels(queue),
                                  self.settle.labels(queue))
        d_counts, d_bounds, d_total = duration.counts, duration.bounds, 0.0
        w_counts, w_bounds, w_total = wait.counts, wait.bounds, 0.0
        s_counts, s_bounds, s_total = settle.counts, settle.bounds, 0.0
        where = bisect.bisect_left
        for job in jobs:
            value = job.duration_ms / 1000
            d_counts[where(d_bounds, value)] += 1
            d_total += value
            if job.wait_ms is not None:
                value = job.wait_ms / 1000
                w_counts[where(w_bounds, value)] += 1
                w_total += value
            if job.settle_ms is not None:
                value = job.settle_ms / 1000
                s_counts[where(s_bounds, value)] += 1
                s_total += value
        duration.total += d_total
        wait.total += w_total
        settle.total += s_total

    def _timings(self, event: Event, queue: str) -> None:
        """Enqueue to start (first deliveries) and start to settled, of a settled delivery."""
        wait_ms = event.get("wait_ms")
        if wait_ms is not None:
            self.wait.labels(queue).observe(wait_ms / 1000)
        settle_ms = event.get("settle_ms")
        if settle_ms is not None:
            self.settle.labels(queue).observe(settle_ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
