-- Repeatable: applied after every versioned migration of every line, again
-- whenever this file changes. It re-asserts the engine's SQL API over whatever
-- an app's history defined under the same names (the clinic's 031-041 defined
-- these with a hard-coded list of its four queues): the queues are the
-- registry's (reactor.queues), nothing else.

-- The registered work queues.
CREATE OR REPLACE FUNCTION reactor.queue_names() RETURNS text[]
LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT coalesce(array_agg(name ORDER BY name), '{}') FROM reactor.queues
$$;

-- What an "unknown queue" error suggests.
CREATE OR REPLACE FUNCTION reactor.known_queues_hint() RETURNS text
LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT CASE WHEN cardinality(reactor.queue_names()) = 0
                THEN 'no queue is registered: an app''s migration registers each of its '
                     'queues with SELECT reactor.register_queue(''name'')'
                ELSE 'use one of ' || array_to_string(reactor.queue_names(), ', ') END
$$;

-- A queue the RPC wrappers accept: a registered one, or (allow_dlq) its DLQ.
CREATE OR REPLACE FUNCTION reactor.check_queue(queue_name text, allow_dlq boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql STABLE SET search_path = '' AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM reactor.queues q
                WHERE q.name = queue_name
                   OR (allow_dlq AND right(queue_name, 4) = '_dlq'
                       AND q.name = left(queue_name, -4))) THEN
        RETURN;
    END IF;
    RAISE EXCEPTION 'unknown queue "%"', queue_name
        USING ERRCODE = 'invalid_parameter_value', HINT = reactor.known_queues_hint();
END
$$;

-- Sends a message and wakes the reactor: pg_notify is delivered at COMMIT (never
-- for a rolled-back message) and folded per transaction, so a 10,000-row insert
-- wakes it once. The queue is looked up by its key in the registry.
CREATE OR REPLACE FUNCTION public.enqueue(queue_name text, message jsonb, delay_seconds integer DEFAULT 0)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    new_id bigint;
    size integer;
BEGIN
    IF queue_name IS NULL OR NOT EXISTS (SELECT 1 FROM reactor.queues q WHERE q.name = queue_name) THEN
        RAISE EXCEPTION 'enqueue: unknown queue "%"', queue_name
            USING ERRCODE = 'invalid_parameter_value', HINT = reactor.known_queues_hint();
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
