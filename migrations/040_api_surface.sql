-- What the API may reach (docs/supabase.md lists it, tests/test_supabase_access.py
-- checks it). On Supabase, PostgREST publishes every function of `public` as
-- /rest/v1/rpc/<name>, and Supabase's default privileges grant anon,
-- authenticated and service_role EXECUTE on every new function there. So:
--
-- 1. Internal helpers move to schema `reactor` (036), which PostgREST does not
--    expose and on which no API role has USAGE. What stays in `public` is the
--    SQL API of DESIGN.md: SECURITY DEFINER entry points for service_role,
--    and the trigger functions.
-- 2. From now on `reactor migrate` locks down whatever each migration creates,
--    by rule (reactor/migrate.py, queries.LOCK_DOWN_NEW_OBJECTS): PUBLIC,
--    anon and authenticated lose every privilege on it; service_role keeps
--    EXECUTE on SECURITY DEFINER functions of `public` only.
-- 3. This file fixes what 001-037 left on installations that ran them
--    before the rule existed.

-- 1. The helpers, in `reactor` ------------------------------------------------

-- The work queues the reactor drains; everything else refuses other names.
CREATE OR REPLACE FUNCTION reactor.queue_names() RETURNS text[]
LANGUAGE sql IMMUTABLE SET search_path = '' AS $$
    SELECT ARRAY['email_queue', 'report_generation_queue',
                 'payment_processing_queue', 'analytics_queue']
$$;

-- A queue the RPC wrappers accept: a work queue, or (allow_dlq) its DLQ.
CREATE OR REPLACE FUNCTION reactor.check_queue(queue_name text, allow_dlq boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql STABLE SET search_path = '' AS $$
BEGIN
    IF queue_name = ANY (reactor.queue_names()) THEN
        RETURN;
    END IF;
    IF allow_dlq AND right(queue_name, 4) = '_dlq'
       AND left(queue_name, -4) = ANY (reactor.queue_names()) THEN
        RETURN;
    END IF;
    RAISE EXCEPTION 'unknown queue "%"', queue_name
        USING ERRCODE = 'invalid_parameter_value',
              HINT = 'use one of ' || array_to_string(reactor.queue_names(), ', ');
END
$$;

-- Template variables of the appointment mails (DESIGN.md), built in one place.
CREATE OR REPLACE FUNCTION reactor.appointment_email_variables(
    full_name text, specialist_name text, scheduled_at timestamptz,
    duration_minutes integer, appointment_id uuid)
RETURNS jsonb
LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT jsonb_build_object(
        'full_name', full_name,
        'specialist_name', specialist_name,
        'scheduled_at', scheduled_at,
        'duration_minutes', duration_minutes,
        'appointment_id', appointment_id)
$$;

-- updated_at follows every change of a payment.
CREATE OR REPLACE FUNCTION reactor.touch_updated_at() RETURNS trigger
LANGUAGE plpgsql SET search_path = '' AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

-- A checkup that becomes completed gets its completion time if the app did not set one.
CREATE OR REPLACE FUNCTION reactor.stamp_checkup_completed_at() RETURNS trigger
LANGUAGE plpgsql SET search_path = '' AS $$
BEGIN
    IF NEW.status = 'completed' AND NEW.completed_at IS NULL THEN
        NEW.completed_at := now();
    END IF;
    RETURN NEW;
END
$$;

-- A trigger fires its function without a privilege check, so these need no
-- grant: the app's own inserts and updates still run them.
DROP TRIGGER IF EXISTS payments_touch_updated_at ON public.payments;
CREATE TRIGGER payments_touch_updated_at BEFORE UPDATE ON public.payments
    FOR EACH ROW EXECUTE FUNCTION reactor.touch_updated_at();
DROP TRIGGER IF EXISTS assessments_stamp_completed_at ON public.assessments;
CREATE TRIGGER assessments_stamp_completed_at BEFORE INSERT OR UPDATE OF status ON public.assessments
    FOR EACH ROW EXECUTE FUNCTION reactor.stamp_checkup_completed_at();

-- 2. Their callers, redefined (bodies as before but for the helpers' names) ----

-- As in 036, with its size limit.
CREATE OR REPLACE FUNCTION public.enqueue(queue_name text, message jsonb, delay_seconds integer DEFAULT 0)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    new_id bigint;
    size integer;
BEGIN
    IF queue_name IS NULL OR NOT queue_name = ANY (reactor.queue_names()) THEN
        RAISE EXCEPTION 'enqueue: unknown queue "%"', queue_name
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'use one of ' || array_to_string(reactor.queue_names(), ', ');
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

CREATE OR REPLACE FUNCTION public.pgmq_send(queue_name text, message jsonb, sleep_seconds integer DEFAULT 0)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    PERFORM reactor.check_queue(queue_name);
    RETURN public.enqueue(queue_name, message, sleep_seconds);  -- also wakes the reactor
END
$$;

CREATE OR REPLACE FUNCTION public.pgmq_read(queue_name text, sleep_seconds integer, n integer)
RETURNS TABLE (msg_id bigint, read_ct integer, enqueued_at timestamptz, vt timestamptz, message jsonb)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    PERFORM reactor.check_queue(queue_name, true);
    RETURN QUERY
        SELECT r.msg_id, r.read_ct, r.enqueued_at, r.vt, r.message
          FROM pgmq.read(queue_name, sleep_seconds, n) AS r;
END
$$;

CREATE OR REPLACE FUNCTION public.pgmq_archive(queue_name text, message_id bigint)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    PERFORM reactor.check_queue(queue_name, true);
    RETURN pgmq.archive(queue_name, message_id);
END
$$;

CREATE OR REPLACE FUNCTION public.pgmq_delete(queue_name text, message_id bigint)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    PERFORM reactor.check_queue(queue_name, true);
    RETURN pgmq.delete(queue_name, message_id);
END
$$;

CREATE OR REPLACE FUNCTION public.pgmq_metrics(queue text)
RETURNS TABLE (queue_name text, queue_length bigint, newest_msg_age_sec integer,
               oldest_msg_age_sec integer, total_messages bigint, scrape_time timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    PERFORM reactor.check_queue(queue, true);
    RETURN QUERY
        SELECT m.queue_name::text, m.queue_length, m.newest_msg_age_sec,
               m.oldest_msg_age_sec, m.total_messages, m.scrape_time
          FROM pgmq.metrics(queue) AS m;
END
$$;

-- As in 030.
CREATE OR REPLACE FUNCTION public.send_appointment_reminders(
    OUT reminders_24h integer, OUT reminders_1h integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    r record;
BEGIN
    reminders_24h := 0;
    reminders_1h := 0;

    FOR r IN
        UPDATE public.appointments a
           SET reminder_24h_sent_at = now()
          FROM public.profiles p
         WHERE p.id = a.user_id
           AND a.status = 'scheduled'
           AND a.reminder_24h_sent_at IS NULL
           AND a.scheduled_at >  now() + interval '1 hour'
           AND a.scheduled_at <= now() + interval '24 hours'
        RETURNING a.*, p.email, p.full_name, p.locale
    LOOP
        PERFORM public.queue_email_task(
            r.email, NULL, 'appointment_reminder_24h',
            reactor.appointment_email_variables(r.full_name, r.specialist_name, r.scheduled_at,
                                                r.duration_minutes, r.id),
            5, r.locale);
        reminders_24h := reminders_24h + 1;
    END LOOP;

    FOR r IN
        UPDATE public.appointments a
           SET reminder_1h_sent_at = now()
          FROM public.profiles p
         WHERE p.id = a.user_id
           AND a.status = 'scheduled'
           AND a.reminder_1h_sent_at IS NULL
           AND a.scheduled_at >  now()
           AND a.scheduled_at <= now() + interval '1 hour'
        RETURNING a.*, p.email, p.full_name, p.locale
    LOOP
        PERFORM public.queue_email_task(
            r.email, NULL, 'appointment_reminder_1h',
            reactor.appointment_email_variables(r.full_name, r.specialist_name, r.scheduled_at,
                                                r.duration_minutes, r.id),
            8, r.locale);
        reminders_1h := reminders_1h + 1;
    END LOOP;
END
$$;

-- As in 032.
CREATE OR REPLACE FUNCTION public.handle_new_appointment() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    p public.profiles%ROWTYPE;
BEGIN
    SELECT * INTO p FROM public.profiles WHERE id = NEW.user_id;
    IF FOUND THEN
        PERFORM public.queue_email_task(
            p.email, NULL, 'appointment_confirmation',
            reactor.appointment_email_variables(p.full_name, NEW.specialist_name, NEW.scheduled_at,
                                                NEW.duration_minutes, NEW.id),
            5, p.locale);
    END IF;
    PERFORM public.queue_analytics_event(
        'appointment_created', NEW.user_id, jsonb_build_object('appointment_id', NEW.id));
    RETURN NEW;
END
$$;

-- The old helpers leave `public`. The two trigger functions stay (grants
-- revoked) where a trigger of the app's own still uses them: 010 defined
-- them with names an app may share.
DROP FUNCTION IF EXISTS public.reactor_check_queue(text, boolean);
DROP FUNCTION IF EXISTS public.reactor_queue_names();
DROP FUNCTION IF EXISTS public.appointment_email_variables(text, text, timestamptz, integer, uuid);
DO $$
DECLARE
    fn regprocedure;
BEGIN
    FOREACH fn IN ARRAY ARRAY[to_regprocedure('public.touch_updated_at()'),
                              to_regprocedure('public.stamp_checkup_completed_at()')] LOOP
        CONTINUE WHEN fn IS NULL;
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_trigger WHERE tgfoid = fn) THEN
            EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC, anon, authenticated, service_role',
                           fn);
        ELSE
            EXECUTE format('DROP FUNCTION %s', fn);
        END IF;
    END LOOP;
END
$$;

-- 3. What 001-037 left open on earlier installations -------------------------

-- No API role uses schema `reactor` (036 revoked PUBLIC; Supabase's roles
-- never had it, but say so).
REVOKE ALL ON SCHEMA reactor FROM PUBLIC, anon, authenticated, service_role;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA reactor FROM PUBLIC, anon, authenticated, service_role;
REVOKE ALL ON ALL TABLES IN SCHEMA reactor FROM PUBLIC, anon, authenticated, service_role;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA reactor FROM PUBLIC, anon, authenticated, service_role;

-- The email ledger is the reactor's, not the app's: service_role may read it
-- (operations), clients get nothing (Supabase's defaults had given them ALL,
-- and TRUNCATE is not subject to RLS).
REVOKE ALL ON public.email_ledger FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT ON public.email_ledger TO service_role;

-- Trigger functions need no grant; schedule_reactor_cron_jobs is the owner's.
REVOKE ALL ON FUNCTION public.handle_completed_checkup(), public.handle_new_appointment(),
    public.handle_payment_status_change(), public.schedule_reactor_cron_jobs()
FROM PUBLIC, anon, authenticated, service_role;

-- The entry points: service_role only (as 030, 031, 033 and 036 granted).
REVOKE ALL ON FUNCTION
    public.enqueue(text, jsonb, integer),
    public.queue_email_task(text, text, text, jsonb, integer, text),
    public.queue_report_generation(uuid, uuid, text),
    public.queue_payment_processing(uuid, text),
    public.queue_analytics_event(text, uuid, jsonb),
    public.update_appointment_statuses(),
    public.cleanup_old_assessments(interval),
    public.send_appointment_reminders(),
    public.prune_reactor_history(interval),
    public.pgmq_send(text, jsonb, integer),
    public.pgmq_read(text, integer, integer),
    public.pgmq_archive(text, bigint),
    public.pgmq_delete(text, bigint),
    public.pgmq_metrics(text)
FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION
    public.enqueue(text, jsonb, integer),
    public.queue_email_task(text, text, text, jsonb, integer, text),
    public.queue_report_generation(uuid, uuid, text),
    public.queue_payment_processing(uuid, text),
    public.queue_analytics_event(text, uuid, jsonb),
    public.update_appointment_statuses(),
    public.cleanup_old_assessments(interval),
    public.send_appointment_reminders(),
    public.prune_reactor_history(interval),
    public.pgmq_send(text, jsonb, integer),
    public.pgmq_read(text, integer, integer),
    public.pgmq_archive(text, bigint),
    public.pgmq_delete(text, bigint),
    public.pgmq_metrics(text)
TO service_role;

-- PostgREST caches the schema: tell it the functions above are gone.
NOTIFY pgrst, 'reload schema';
