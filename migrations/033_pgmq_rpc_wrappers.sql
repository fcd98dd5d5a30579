-- RPC wrappers for PostgREST clients (supabase-js `rpc('pgmq_send', ...)`).
-- PostgREST exposes only the public schema, so these stand in front of pgmq.
-- They accept only the reactor's queues, run as their owner with an empty
-- search_path, and only service_role may call them.

CREATE OR REPLACE FUNCTION public.reactor_check_queue(queue_name text, allow_dlq boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql STABLE SET search_path = '' AS $$
BEGIN
    IF queue_name = ANY (public.reactor_queue_names()) THEN
        RETURN;
    END IF;
    IF allow_dlq AND right(queue_name, 4) = '_dlq'
       AND left(queue_name, -4) = ANY (public.reactor_queue_names()) THEN
        RETURN;
    END IF;
    RAISE EXCEPTION 'unknown queue "%"', queue_name
        USING ERRCODE = 'invalid_parameter_value',
              HINT = 'use one of ' || array_to_string(public.reactor_queue_names(), ', ');
END
$$;

CREATE OR REPLACE FUNCTION public.pgmq_send(queue_name text, message jsonb, sleep_seconds integer DEFAULT 0)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    PERFORM public.reactor_check_queue(queue_name);
    RETURN public.enqueue(queue_name, message, sleep_seconds);  -- also wakes the reactor
END
$$;

CREATE OR REPLACE FUNCTION public.pgmq_read(queue_name text, sleep_seconds integer, n integer)
RETURNS TABLE (msg_id bigint, read_ct integer, enqueued_at timestamptz, vt timestamptz, message jsonb)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    PERFORM public.reactor_check_queue(queue_name, true);
    RETURN QUERY
        SELECT r.msg_id, r.read_ct, r.enqueued_at, r.vt, r.message
          FROM pgmq.read(queue_name, sleep_seconds, n) AS r;
END
$$;

CREATE OR REPLACE FUNCTION public.pgmq_archive(queue_name text, message_id bigint)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    PERFORM public.reactor_check_queue(queue_name, true);
    RETURN pgmq.archive(queue_name, message_id);
END
$$;

CREATE OR REPLACE FUNCTION public.pgmq_delete(queue_name text, message_id bigint)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    PERFORM public.reactor_check_queue(queue_name, true);
    RETURN pgmq.delete(queue_name, message_id);
END
$$;

-- The columns the old guide's monitoring query reads.
CREATE OR REPLACE FUNCTION public.pgmq_metrics(queue text)
RETURNS TABLE (queue_name text, queue_length bigint, newest_msg_age_sec integer,
               oldest_msg_age_sec integer, total_messages bigint, scrape_time timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    PERFORM public.reactor_check_queue(queue, true);
    RETURN QUERY
        SELECT m.queue_name::text, m.queue_length, m.newest_msg_age_sec,
               m.oldest_msg_age_sec, m.total_messages, m.scrape_time
          FROM pgmq.metrics(queue) AS m;
END
$$;

REVOKE EXECUTE ON FUNCTION
    public.pgmq_send(text, jsonb, integer),
    public.pgmq_read(text, integer, integer),
    public.pgmq_archive(text, bigint),
    public.pgmq_delete(text, bigint),
    public.pgmq_metrics(text)
FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION
    public.pgmq_send(text, jsonb, integer),
    public.pgmq_read(text, integer, integer),
    public.pgmq_archive(text, bigint),
    public.pgmq_delete(text, bigint),
    public.pgmq_metrics(text)
TO service_role;
