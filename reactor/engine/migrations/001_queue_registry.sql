-- The engine's own objects, first on every database: the bookkeeping the drainers
-- write, the size limit, and the registry of queues that the engine's SQL reads.
-- Everything is "if absent" or "or replace" with the same body as the clinic's
-- history (036, 040) defined it, so a database migrated before the engine had a
-- line of its own upgrades in place.
CREATE SCHEMA IF NOT EXISTS reactor;
REVOKE ALL ON SCHEMA reactor FROM PUBLIC;

-- One row per message that failed at least once (or was released at shutdown):
-- see migrations/036_reactor_bookkeeping.sql for why each column is there.
CREATE TABLE IF NOT EXISTS reactor.job_failures (
    queue         text        NOT NULL,
    msg_id        bigint      NOT NULL,
    enqueued_at   timestamptz NOT NULL,
    outcomes      integer     NOT NULL DEFAULT 0,
    last_attempt  integer,
    last_error    text,
    dead_lettered boolean     NOT NULL DEFAULT false,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, msg_id)
);
CREATE INDEX IF NOT EXISTS job_failures_updated_at_idx ON reactor.job_failures (updated_at);
REVOKE ALL ON reactor.job_failures FROM PUBLIC;

-- Messages are untrusted input, held in memory while processed: 256 KiB at most.
CREATE OR REPLACE FUNCTION reactor.max_message_bytes() RETURNS integer
LANGUAGE sql IMMUTABLE SET search_path = '' AS $$ SELECT 262144 $$;

-- The work queues: an app's migration registers each of its queues here, once
-- (reactor.register_queue), and public.enqueue, the RPC wrappers' checks,
-- `reactor status` and the dashboard know no other. A queue's name becomes part
-- of pgmq's table names (q_<name>, a_<name>, <name>_dlq; pgmq allows 47
-- characters with the _dlq), hence the pattern.
CREATE TABLE IF NOT EXISTS reactor.queues (
    name          text PRIMARY KEY CHECK (name ~ '^[a-z_][a-z0-9_]{0,42}$' AND name !~ '_dlq$'),
    registered_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON reactor.queues FROM PUBLIC;

-- Creates the queue and its dead-letter queue in pgmq where absent, and registers
-- it. Idempotent: an app's migration may call it for a queue that exists.
CREATE OR REPLACE FUNCTION reactor.register_queue(queue_name text) RETURNS void
LANGUAGE plpgsql SET search_path = '' AS $$
BEGIN
    IF queue_name IS NULL OR queue_name !~ '^[a-z_][a-z0-9_]{0,42}$' OR queue_name ~ '_dlq$' THEN
        RAISE EXCEPTION 'register_queue: "%" cannot be a queue name', queue_name
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'lower case letters, digits and _, at most 43, not ending in _dlq';
    END IF;
    IF to_regclass(format('pgmq.%I', 'q_' || queue_name)) IS NULL THEN
        PERFORM pgmq.create(queue_name);
    END IF;
    IF to_regclass(format('pgmq.%I', 'q_' || queue_name || '_dlq')) IS NULL THEN
        PERFORM pgmq.create(queue_name || '_dlq');
    END IF;
    INSERT INTO reactor.queues (name) VALUES (queue_name) ON CONFLICT DO NOTHING;
END
$$;
