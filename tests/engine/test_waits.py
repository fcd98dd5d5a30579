"""Wait times: the bucket counts the dashboard's percentiles come from, and the metrics
(enqueue to start, start to settle, the oldest visible message)."""

from __future__ import annotations

import time

import pytest

from reactor.engine.metrics import Metrics
from reactor.engine.waits import WAIT_BUCKETS_S, WaitRecorder, quantile


def counts(**by_bound: int) -> list[int]:
    """Bucket counts from {"b0_1": n} meaning n waits in the bucket whose bound is 0.1 s."""
    result = [0] * (len(WAIT_BUCKETS_S) + 1)
    for key, n in by_bound.items():
        bound = key.removeprefix("b").replace("_", ".")
        index = len(WAIT_BUCKETS_S) if bound == "inf" else WAIT_BUCKETS_S.index(float(bound))
        result[index] = n
    return result


def test_a_quantile_is_interpolated_inside_its_bucket_like_histogram_quantile() -> None:
    assert quantile(0.5, counts()) is None
    # 10 waits up to 0.1 s and 10 between 0.1 and 0.25 s: the median is the bound between.
    both = counts(b0_1=10, b0_25=10)
    assert quantile(0.5, both) == pytest.approx(0.1)
    assert quantile(0.95, both) == pytest.approx(0.1 + 0.15 * 9 / 10)
    # All in the first bucket: between 0 and its bound.
    assert quantile(0.5, counts(b0_005=4)) == pytest.approx(0.0025)
    # Longer than the last bound: the last bound (what Prometheus answers too).
    assert quantile(0.95, counts(b0_1=1, binf=99)) == WAIT_BUCKETS_S[-1]


def test_the_recorder_counts_first_deliveries_per_queue_and_minute() -> None:
    recorder = WaitRecorder()
    ts = time.time()
    for wait_ms in (3.0, 80.0, 80.0, 7_200_000.0):
        recorder.observe({"type": "job.succeeded", "queue": "q", "ts": ts, "wait_ms": wait_ms})
    recorder.observe({"type": "job.succeeded", "queue": "q", "ts": ts, "wait_ms": None})
    recorder.observe({"type": "queue.depth", "queue": "q", "ts": ts})
    [(key, counted)] = recorder._pending.items()
    assert key == ("q", int(ts // 60 * 60))
    assert counted == counts(b0_005=1, b0_1=2, binf=1)


def test_the_metrics_have_wait_settle_and_oldest_visible_per_queue_from_the_start() -> None:
    metrics = Metrics()
    metrics.watch_queues(["q"])
    text = metrics.render().decode()
    assert 'reactor_job_wait_seconds_count{queue="q"} 0.0' in text
    assert 'reactor_job_settle_seconds_count{queue="q"} 0.0' in text
    assert 'reactor_queue_oldest_visible_age_seconds{queue="q"} 0.0' in text
    metrics.observe({"type": "job.succeeded", "queue": "q", "duration_ms": 5.0,
                     "wait_ms": 40.0, "settle_ms": 900.0})
    metrics.observe({"type": "job.retrying", "queue": "q", "duration_ms": 5.0,
                     "wait_ms": None, "settle_ms": 20.0})
    metrics.observe({"type": "queue.depth", "queue": "q", "depth": 3, "oldest_age_s": 70,
                     "oldest_visible_age_s": 12.5})
    text = metrics.render().decode()
    assert 'reactor_job_wait_seconds_bucket{le="0.05",queue="q"} 1.0' in text
    assert 'reactor_job_wait_seconds_count{queue="q"} 1.0' in text
    assert 'reactor_job_settle_seconds_count{queue="q"} 2.0' in text
    assert 'reactor_job_settle_seconds_bucket{le="1.0",queue="q"} 2.0' in text
    assert 'reactor_queue_oldest_visible_age_seconds{queue="q"} 12.5' in text
