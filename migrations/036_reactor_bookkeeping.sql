-- The reactor's own bookkeeping, out of PostgREST's sight, and a size limit on
-- what may be queued.
--
-- Schema `reactor` is not one of PostgREST's exposed schemas (Supabase exposes
-- public, graphql_public, storage by default): nothing here is reachable
-- through the API. Only the owner (the role running `reactor migrate`, which
-- is also the role `reactor run` connects as) uses it.
CREATE SCHEMA IF NOT EXISTS reactor;
REVOKE ALL ON SCHEMA reactor FROM PUBLIC;

-- One row per message that has failed at least once (or been released at
-- shutdown): how many of its deliveries ended with an outcome the reactor
-- recorded. pgmq's read_ct counts every delivery; the difference is the
-- number of deliveries that ended in nothing — a worker that crashed or was
-- killed. That is what the crash guard bounds, so a message retried for an
-- outage is never taken for a worker-crasher, and one that keeps killing its
-- worker is dead-lettered after a few deliveries in every queue.
-- It is also the persistent record of recent failures (dashboard): the
-- reason and the attempt of the last one (NULL for a message that was only
-- released at shutdown). Pruned by the housekeeping job.
CREATE TABLE IF NOT EXISTS reactor.job_failures (
    queue         text        NOT NULL,
    msg_id        bigint      NOT NULL,
    enqueued_at   timestamptz NOT NULL,
    outcomes      integer     NOT NULL DEFAULT 0,
    last_attempt  integer,              -- NULL: released at shutdown, never failed
    last_error    text,
    dead_lettered boolean     NOT NULL DEFAULT false,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, msg_id)
);
CREATE INDEX IF NOT EXISTS job_failures_updated_at_idx ON reactor.job_failures (updated_at);
REVOKE ALL ON reactor.job_failures FROM PUBLIC;

-- Messages are untrusted input and live in memory while they are processed:
-- no message larger than this is accepted (256 KiB of JSON text).
CREATE OR REPLACE FUNCTION reactor.max_message_bytes() RETURNS integer
LANGUAGE sql IMMUTABLE SET search_path = '' AS $$ SELECT 262144 $$;
REVOKE EXECUTE ON FUNCTION reactor.max_message_bytes() FROM PUBLIC;

CREATE OR REPLACE FUNCTION public.enqueue(queue_name text, message jsonb, delay_seconds integer DEFAULT 0)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    new_id bigint;
    size integer;
BEGIN
    IF queue_name IS NULL OR NOT queue_name = ANY (public.reactor_queue_names()) THEN
        RAISE EXCEPTION 'enqueue: unknown queue "%"', queue_name
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'use one of ' || array_to_string(public.reactor_queue_names(), ', ');
    END IF;
    IF message IS NULL OR jsonb_typeof(message) <> 'object' THEN
        RAISE EXCEPTION 'enqueue: message must be a JSON object'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    size := octet_length(message::text);
    IF size > reactor.max_message_bytes() THEN
        RAISE EXCEPTION 'enqueue: message is % bytes, more than the limit of % bytes',
                        size, reactor.max_message_bytes()
            USING ERRCODE = 'program_limit_exceeded',
                  HINT = 'queue a reference (an id) to the data, not the data itself';
    END IF;
    IF delay_seconds IS NULL OR delay_seconds < 0 THEN
        RAISE EXCEPTION 'enqueue: delay_seconds must be 0 or more'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT s INTO new_id FROM pgmq.send(queue_name, message, delay_seconds) AS s;
    PERFORM pg_notify('reactor_wakeup', queue_name);
    RETURN new_id;
END
$$;
REVOKE EXECUTE ON FUNCTION public.enqueue(text, jsonb, integer) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.enqueue(text, jsonb, integer) TO service_role;

-- Housekeeping also forgets old failure records.
CREATE OR REPLACE FUNCTION public.prune_reactor_history(retention interval DEFAULT interval '30 days')
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    q record;
    n bigint;
    total bigint := 0;
BEGIN
    IF to_regclass('cron.job_run_details') IS NOT NULL THEN
        DELETE FROM cron.job_run_details WHERE end_time < now() - retention;
        GET DIAGNOSTICS n = ROW_COUNT;
        total := total + n;
    END IF;
    FOR q IN SELECT queue_name FROM pgmq.list_queues() LOOP
        EXECUTE format('DELETE FROM pgmq.%I WHERE archived_at < $1', 'a_' || q.queue_name)
            USING now() - retention;
        GET DIAGNOSTICS n = ROW_COUNT;
        total := total + n;
    END LOOP;
    DELETE FROM reactor.job_failures WHERE updated_at < now() - retention;
    GET DIAGNOSTICS n = ROW_COUNT;
    total := total + n;
    RETURN total;
END
$$;
REVOKE EXECUTE ON FUNCTION public.prune_reactor_history(interval) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.prune_reactor_history(interval) TO service_role;

-- Unkeyed mails were keyed "<queue>:<msg_id>"; msg ids start again at 1 when a
-- queue is dropped and recreated, so such keys now carry the message's
-- enqueue time too ("<queue>:<msg_id>:<enqueued_at µs>"). The ledger records it.
ALTER TABLE public.email_ledger ADD COLUMN IF NOT EXISTS enqueued_at timestamptz;
