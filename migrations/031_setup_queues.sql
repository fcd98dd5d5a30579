-- The four work queues, their dead-letter queues, and the SQL API that the
-- triggers, the cron jobs and the app use to put work on them.
-- Only pgmq functions that Supabase's pgmq 1.4.4-1.5.1 has are used.

SELECT pgmq.create(q)
  FROM unnest(ARRAY[
      'email_queue', 'report_generation_queue', 'payment_processing_queue', 'analytics_queue',
      'email_queue_dlq', 'report_generation_queue_dlq', 'payment_processing_queue_dlq',
      'analytics_queue_dlq']) AS q;

-- The work queues the reactor drains; everything else refuses other names.
CREATE OR REPLACE FUNCTION public.reactor_queue_names() RETURNS text[]
LANGUAGE sql IMMUTABLE SET search_path = '' AS $$
    SELECT ARRAY['email_queue', 'report_generation_queue',
                 'payment_processing_queue', 'analytics_queue']
$$;

-- Sends a message and wakes the reactor. pg_notify is delivered at COMMIT
-- (never for a rolled-back message) and Postgres folds identical
-- notifications of one transaction, so a 10,000-row insert wakes it once.
CREATE OR REPLACE FUNCTION public.enqueue(queue_name text, message jsonb, delay_seconds integer DEFAULT 0)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    new_id bigint;
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
    IF delay_seconds IS NULL OR delay_seconds < 0 THEN
        RAISE EXCEPTION 'enqueue: delay_seconds must be 0 or more'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT s INTO new_id FROM pgmq.send(queue_name, message, delay_seconds) AS s;
    PERFORM pg_notify('reactor_wakeup', queue_name);
    RETURN new_id;
END
$$;

-- Template variables of the appointment mails (DESIGN.md), built in one place.
CREATE OR REPLACE FUNCTION public.appointment_email_variables(
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

-- An email task: {"to", "subject", "template", "variables", "priority", "locale"}.
-- subject NULL = the template's own subject; locale NULL = the recipient's.
CREATE OR REPLACE FUNCTION public.queue_email_task(
    "to" text, subject text, template text,
    variables jsonb DEFAULT '{}'::jsonb, priority integer DEFAULT 0, locale text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    IF queue_email_task."to" IS NULL
       OR queue_email_task."to" ~ '[\r\n]'
       OR queue_email_task."to" !~ '^[A-Za-z0-9.!#$%&''*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$'
       OR length(queue_email_task."to") > 254 THEN
        RAISE EXCEPTION 'queue_email_task: "to" is not a valid email address'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF subject ~ '[\r\n]' THEN
        RAISE EXCEPTION 'queue_email_task: subject must not contain CR or LF'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF template IS NULL OR template !~ '^[a-z0-9_]+$' THEN
        RAISE EXCEPTION 'queue_email_task: template must match [a-z0-9_]+'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF variables IS NOT NULL AND jsonb_typeof(variables) <> 'object' THEN
        RAISE EXCEPTION 'queue_email_task: variables must be a JSON object'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF locale IS NOT NULL AND locale NOT IN ('ru', 'en') THEN
        RAISE EXCEPTION 'queue_email_task: locale must be ru or en'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN public.enqueue('email_queue', jsonb_build_object(
        'to', queue_email_task."to",
        'subject', subject,
        'template', template,
        'variables', coalesce(variables, '{}'::jsonb),
        'priority', coalesce(priority, 0),
        'locale', locale));
END
$$;

CREATE OR REPLACE FUNCTION public.queue_report_generation(
    assessment_id uuid, user_id uuid, report_type text DEFAULT 'pdf')
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    IF assessment_id IS NULL OR user_id IS NULL THEN
        RAISE EXCEPTION 'queue_report_generation: assessment_id and user_id are required'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF report_type IS DISTINCT FROM 'pdf' THEN
        RAISE EXCEPTION 'queue_report_generation: report_type must be pdf'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN public.enqueue('report_generation_queue', jsonb_build_object(
        'assessment_id', assessment_id, 'user_id', user_id, 'report_type', report_type));
END
$$;

CREATE OR REPLACE FUNCTION public.queue_payment_processing(payment_id uuid, action text DEFAULT 'verify')
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    IF payment_id IS NULL THEN
        RAISE EXCEPTION 'queue_payment_processing: payment_id is required'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF action IS NULL OR action NOT IN ('verify', 'capture', 'refund') THEN
        RAISE EXCEPTION 'queue_payment_processing: action must be verify, capture or refund'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN public.enqueue('payment_processing_queue', jsonb_build_object(
        'payment_id', payment_id, 'action', action));
END
$$;

CREATE OR REPLACE FUNCTION public.queue_analytics_event(
    event text, user_id uuid, properties jsonb DEFAULT '{}'::jsonb)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    IF event IS NULL OR event !~ '^[a-z0-9_.]+$' THEN
        RAISE EXCEPTION 'queue_analytics_event: event must match [a-z0-9_.]+'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF properties IS NOT NULL AND jsonb_typeof(properties) <> 'object' THEN
        RAISE EXCEPTION 'queue_analytics_event: properties must be a JSON object'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN public.enqueue('analytics_queue', jsonb_build_object(
        'event', event, 'user_id', user_id,
        'properties', coalesce(properties, '{}'::jsonb), 'occurred_at', now()));
END
$$;

-- Enqueueing is for trusted code: triggers and cron run these as their
-- owner (SECURITY DEFINER); of the API roles only service_role may call them.
REVOKE EXECUTE ON FUNCTION
    public.enqueue(text, jsonb, integer),
    public.queue_email_task(text, text, text, jsonb, integer, text),
    public.queue_report_generation(uuid, uuid, text),
    public.queue_payment_processing(uuid, text),
    public.queue_analytics_event(text, uuid, jsonb)
FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION
    public.enqueue(text, jsonb, integer),
    public.queue_email_task(text, text, text, jsonb, integer, text),
    public.queue_report_generation(uuid, uuid, text),
    public.queue_payment_processing(uuid, text),
    public.queue_analytics_event(text, uuid, jsonb)
TO service_role;
