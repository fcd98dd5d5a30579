-- How long messages waited between enqueue and start, per queue and minute, as bucket
-- counts (reactor.engine.waits: the bounds are the engine's WAIT_BUCKETS_S, the last
-- count is "longer"): the dashboard's p50/p95 over the last hour come from here, so
-- they survive a restart. One row per queue and minute, written every few seconds by
-- each running reactor (counts are added, so replicas share a row); kept one day.
CREATE TABLE IF NOT EXISTS reactor.queue_waits (
    queue   text        NOT NULL,
    minute  timestamptz NOT NULL,
    counts  integer[]   NOT NULL,
    PRIMARY KEY (queue, minute)
);
CREATE INDEX IF NOT EXISTS queue_waits_minute_idx ON reactor.queue_waits (minute);
REVOKE ALL ON reactor.queue_waits FROM PUBLIC;
