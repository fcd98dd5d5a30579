-- A family's booking, checkup or payment never fails because of the worker.
--
-- The triggers (032) and the cron jobs (030) run inside the app's own
-- transaction. Until now they called the public queue_* helpers, which refuse
-- bad input by raising, and the raise became the app's error: a profile with
-- an address the mail side cannot use (user@пример.рф, an empty string, 300
-- characters) rolled back the booking, the completed checkup and the payment,
-- and one such profile stopped the hourly reminder run for every family.
--
-- Now every helper is split in two: a pure function that builds the message
-- and says what is wrong with it (reactor.*_task, returning reactor.task), and
-- the two ways to queue it:
--   * reactor.enqueue_or_raise  - for direct calls (public.queue_* and the RPC
--     wrappers): refuses bad input with a clear error, as before;
--   * reactor.enqueue_or_refuse - for triggers and cron jobs: never raises for
--     anything about the message or the queue; what cannot be queued becomes a
--     dead letter in <queue>_dlq with the reason (reactor dlq list, the
--     dashboard), or, where that queue does not exist either, a row in
--     reactor.refusals. docs/operations.md says where to look.
-- Everything is checked before anything is written, so the happy path opens
-- no subtransaction (a 10,000-row import must not make 10,000 of them).
-- The constraints on the app's own tables are untouched.

-- What a helper made of its arguments: the message, or why there is none.
CREATE TYPE reactor.task AS (message jsonb, problem text);

-- What could not be queued and had no dead-letter queue to go to (its queue
-- is unknown or was dropped), and what a cron job could not change. Kept
-- small: the message is cut to 2,000 characters. Pruned by housekeeping.
CREATE TABLE IF NOT EXISTS reactor.refusals (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    refused_at  timestamptz NOT NULL DEFAULT now(),
    source      text        NOT NULL,
    queue       text,
    reason      text        NOT NULL,
    message     text
);
CREATE INDEX IF NOT EXISTS refusals_refused_at_idx ON reactor.refusals (refused_at);

-- Why public.enqueue would refuse this message on this queue, or NULL. The
-- same checks as its RAISEs, plus that the queue's table is really there (a
-- registered queue whose table was dropped would fail inside pgmq.send).
CREATE OR REPLACE FUNCTION reactor.enqueue_problem(queue_name text, message jsonb)
RETURNS text
LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT CASE
        WHEN queue_name IS NULL OR NOT queue_name = ANY (reactor.queue_names())
            THEN format('unknown queue "%s"', queue_name)
        WHEN to_regclass(format('pgmq.%I', 'q_' || queue_name)) IS NULL
            THEN format('queue "%s" does not exist in pgmq', queue_name)
        WHEN message IS NULL OR jsonb_typeof(message) <> 'object'
            THEN 'message must be a JSON object'
        WHEN octet_length(message::text) > reactor.max_message_bytes()
            THEN format('message is %s bytes, more than the limit of %s bytes',
                        octet_length(message::text), reactor.max_message_bytes())
    END
$$;

-- Records what a trigger or a cron job could not queue, and returns nothing
-- that could fail the caller: a dead letter in <queue>_dlq shaped like the
-- reactor's own ({"original", "error", "attempts": 0, "failed_at",
-- "source_msg_id": null, "queue", "refused_by"}), so `reactor dlq list`,
-- replay and the dashboard show it; an original over the size limit is kept
-- as the first 2,000 characters of its text. No dead-letter queue (an unknown
-- queue): a row in reactor.refusals. Either way one line in the server log.
CREATE OR REPLACE FUNCTION reactor.refuse(source text, queue_name text, message jsonb, reason text)
RETURNS void
LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    whole boolean := octet_length(message::text) <= reactor.max_message_bytes();
BEGIN
    IF queue_name = ANY (reactor.queue_names())
       AND to_regclass(format('pgmq.%I', 'q_' || queue_name || '_dlq')) IS NOT NULL THEN
        PERFORM pgmq.send(queue_name || '_dlq',
            jsonb_build_object(
                'original', CASE WHEN whole THEN message END,
                'error', 'refused at enqueue: ' || reason,
                'attempts', 0, 'failed_at', now(), 'source_msg_id', NULL,
                'queue', queue_name, 'refused_by', source)
            || CASE WHEN whole THEN '{}'::jsonb
                    ELSE jsonb_build_object('original_text', left(message::text, 2000)) END,
            0);
    ELSE
        INSERT INTO reactor.refusals (source, queue, reason, message)
        VALUES (coalesce(source, 'unknown'), queue_name, coalesce(reason, 'unknown'),
                left(message::text, 2000));
    END IF;
    RAISE LOG 'reactor: % could not queue a message on %: %', source, queue_name, reason;
END
$$;

-- For direct calls: bad input is refused with the helper's name in the error.
-- Queue-level refusals (size, unknown queue) come from public.enqueue itself,
-- with their own error codes and hints, as before.
CREATE OR REPLACE FUNCTION reactor.enqueue_or_raise(caller text, queue_name text, task reactor.task)
RETURNS bigint
LANGUAGE plpgsql SET search_path = '' AS $$
BEGIN
    IF task.problem IS NOT NULL THEN
        RAISE EXCEPTION '%: %', caller, task.problem USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN public.enqueue(queue_name, task.message);
END
$$;

-- For triggers and cron jobs: the message is queued, or refused and recorded
-- (reactor.refuse). Returns the msg_id, or NULL when refused.
CREATE OR REPLACE FUNCTION reactor.enqueue_or_refuse(source text, queue_name text, task reactor.task)
RETURNS bigint
LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    problem text := coalesce(task.problem, reactor.enqueue_problem(queue_name, task.message));
BEGIN
    IF problem IS NULL THEN
        RETURN public.enqueue(queue_name, task.message);
    END IF;
    PERFORM reactor.refuse(source, queue_name, coalesce(task.message, '{}'::jsonb), problem);
    RETURN NULL;
END
$$;

-- The tasks. Each builds the message DESIGN.md gives its queue and says what
-- is wrong with the arguments (NULL: nothing).

-- {"to", "subject", "template", "variables", "priority", "locale"}.
CREATE OR REPLACE FUNCTION reactor.email_task(
    "to" text, subject text, template text, variables jsonb, priority integer, locale text)
RETURNS reactor.task
LANGUAGE sql IMMUTABLE SET search_path = '' AS $$
    SELECT ROW(
        jsonb_build_object(
            'to', email_task."to", 'subject', email_task.subject,
            'template', email_task.template,
            'variables', coalesce(email_task.variables, '{}'::jsonb),
            'priority', coalesce(email_task.priority, 0), 'locale', email_task.locale),
        CASE
            WHEN email_task."to" IS NULL OR email_task."to" ~ '[\r\n]'
                 OR length(email_task."to") > 254
                 OR email_task."to" !~ '^[A-Za-z0-9.!#$%&''*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$'
                THEN '"to" is not a valid email address'
            WHEN email_task.subject ~ '[\r\n]' THEN 'subject must not contain CR or LF'
            WHEN email_task.template IS NULL OR email_task.template !~ '^[a-z0-9_]+$'
                THEN 'template must match [a-z0-9_]+'
            WHEN email_task.variables IS NOT NULL AND jsonb_typeof(email_task.variables) <> 'object'
                THEN 'variables must be a JSON object'
            WHEN email_task.locale IS NOT NULL AND email_task.locale NOT IN ('ru', 'en')
                THEN 'locale must be ru or en'
        END)::reactor.task
$$;

-- {"assessment_id", "user_id", "report_type"}.
CREATE OR REPLACE FUNCTION reactor.report_task(assessment_id uuid, user_id uuid, report_type text)
RETURNS reactor.task
LANGUAGE sql IMMUTABLE SET search_path = '' AS $$
    SELECT ROW(
        jsonb_build_object('assessment_id', report_task.assessment_id,
                           'user_id', report_task.user_id,
                           'report_type', report_task.report_type),
        CASE
            WHEN report_task.assessment_id IS NULL OR report_task.user_id IS NULL
                THEN 'assessment_id and user_id are required'
            WHEN report_task.report_type IS DISTINCT FROM 'pdf' THEN 'report_type must be pdf'
        END)::reactor.task
$$;

-- {"event", "user_id", "properties", "occurred_at"}.
CREATE OR REPLACE FUNCTION reactor.analytics_task(event text, user_id uuid, properties jsonb)
RETURNS reactor.task
LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT ROW(
        jsonb_build_object('event', analytics_task.event, 'user_id', analytics_task.user_id,
                           'properties', coalesce(analytics_task.properties, '{}'::jsonb),
                           'occurred_at', now()),
        CASE
            WHEN analytics_task.event IS NULL OR analytics_task.event !~ '^[a-z0-9_.]+$'
                THEN 'event must match [a-z0-9_.]+'
            WHEN analytics_task.properties IS NOT NULL
                 AND jsonb_typeof(analytics_task.properties) <> 'object'
                THEN 'properties must be a JSON object'
        END)::reactor.task
$$;

-- A mail to a profile, for a trigger or a cron job. A missing profile or one
-- without an address is a problem like any other bad address; a locale the
-- templates do not have means the default (ru), as for a profile without one:
-- the family still gets the mail ('EN', 'en-US' are en).
CREATE OR REPLACE FUNCTION reactor.profile_email_task(
    profile public.profiles, template text, variables jsonb, priority integer)
RETURNS reactor.task
LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT CASE
        WHEN profile.id IS NULL THEN
            ROW(jsonb_build_object('template', template, 'variables', variables),
                'no profile for this user')::reactor.task
        ELSE reactor.email_task(
            profile.email, NULL, template, variables, priority,
            CASE lower(split_part(replace(profile.locale, '_', '-'), '-', 1))
                WHEN 'en' THEN 'en' ELSE 'ru' END)
    END
$$;

-- A task whose message could not even be built (a value JSON cannot hold, a
-- date out of range): refused with the reason, like a bad one.
CREATE OR REPLACE FUNCTION reactor.unbuilt(reason text)
RETURNS reactor.task
LANGUAGE sql IMMUTABLE SET search_path = '' AS $$
    SELECT ROW(NULL, 'the message could not be built: '
                     || coalesce(reason, 'unknown error'))::reactor.task
$$;

-- Seconds between two times, NULL where either is missing or infinite.
CREATE OR REPLACE FUNCTION reactor.seconds_between(earlier timestamptz, later timestamptz)
RETURNS bigint
LANGUAGE sql IMMUTABLE SET search_path = '' AS $$
    SELECT CASE WHEN isfinite(earlier) AND isfinite(later)
                THEN extract(epoch FROM later - earlier)::bigint END
$$;

-- The public helpers: the same checks and messages as before, now from the tasks.
CREATE OR REPLACE FUNCTION public.queue_email_task(
    "to" text, subject text, template text,
    variables jsonb DEFAULT '{}'::jsonb, priority integer DEFAULT 0, locale text DEFAULT NULL)
RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = '' AS $$
    SELECT reactor.enqueue_or_raise('queue_email_task', 'email_queue', reactor.email_task(
        queue_email_task."to", queue_email_task.subject, queue_email_task.template,
        queue_email_task.variables, queue_email_task.priority, queue_email_task.locale))
$$;

CREATE OR REPLACE FUNCTION public.queue_report_generation(
    assessment_id uuid, user_id uuid, report_type text DEFAULT 'pdf')
RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = '' AS $$
    SELECT reactor.enqueue_or_raise('queue_report_generation', 'report_generation_queue',
        reactor.report_task(queue_report_generation.assessment_id,
                            queue_report_generation.user_id,
                            queue_report_generation.report_type))
$$;

CREATE OR REPLACE FUNCTION public.queue_analytics_event(
    event text, user_id uuid, properties jsonb DEFAULT '{}'::jsonb)
RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = '' AS $$
    SELECT reactor.enqueue_or_raise('queue_analytics_event', 'analytics_queue',
        reactor.analytics_task(queue_analytics_event.event, queue_analytics_event.user_id,
                               queue_analytics_event.properties))
$$;

-- The triggers (as in 032 and 040). Each first builds its messages in a block
-- that writes nothing (so it takes no transaction id: a 10,000-row import still
-- uses one), catching what cannot be built; then queues each through
-- enqueue_or_refuse, outside the block.

CREATE OR REPLACE FUNCTION public.handle_completed_checkup() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    p public.profiles%ROWTYPE;
    source text := 'handle_completed_checkup() for assessment ' || coalesce(NEW.id::text, '?');
    report reactor.task;
    mail reactor.task;
    event reactor.task;
    unbuilt reactor.task;
BEGIN
    -- Only the transition counts: re-saving a completed checkup does nothing.
    IF TG_OP = 'UPDATE' AND OLD.status = 'completed' THEN
        RETURN NEW;
    END IF;
    SELECT * INTO p FROM public.profiles WHERE id = NEW.user_id;
    BEGIN
        report := reactor.report_task(NEW.id, NEW.user_id, 'pdf');
        event := reactor.analytics_task('checkup_completed', NEW.user_id,
            jsonb_build_object('assessment_id', NEW.id,
                               'duration_s', reactor.seconds_between(NEW.created_at,
                                                                     NEW.completed_at)));
        -- Last: the family's own text is what may not fit in a message.
        mail := reactor.profile_email_task(p, 'checkup_completed',
            jsonb_build_object('full_name', p.full_name, 'assessment_id', NEW.id), 3);
    EXCEPTION WHEN OTHERS THEN
        unbuilt := reactor.unbuilt(SQLERRM);
    END;
    PERFORM reactor.enqueue_or_refuse(source, 'report_generation_queue', coalesce(report, unbuilt));
    PERFORM reactor.enqueue_or_refuse(source, 'email_queue', coalesce(mail, unbuilt));
    PERFORM reactor.enqueue_or_refuse(source, 'analytics_queue', coalesce(event, unbuilt));
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION public.handle_new_appointment() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    p public.profiles%ROWTYPE;
    source text := 'handle_new_appointment() for appointment ' || coalesce(NEW.id::text, '?');
    mail reactor.task;
    event reactor.task;
    unbuilt reactor.task;
BEGIN
    SELECT * INTO p FROM public.profiles WHERE id = NEW.user_id;
    BEGIN
        event := reactor.analytics_task('appointment_created', NEW.user_id,
            jsonb_build_object('appointment_id', NEW.id));
        -- Last: the family's own text is what may not fit in a message.
        mail := reactor.profile_email_task(p, 'appointment_confirmation',
            reactor.appointment_email_variables(p.full_name, NEW.specialist_name,
                                                NEW.scheduled_at, NEW.duration_minutes, NEW.id),
            5);
    EXCEPTION WHEN OTHERS THEN
        unbuilt := reactor.unbuilt(SQLERRM);
    END;
    PERFORM reactor.enqueue_or_refuse(source, 'email_queue', coalesce(mail, unbuilt));
    PERFORM reactor.enqueue_or_refuse(source, 'analytics_queue', coalesce(event, unbuilt));
    RETURN NEW;
END
$$;

-- Completed: receipt + consultation paid; failed: notice. Nothing about the
-- mail can stop the payment or the consultation's update from committing.
CREATE OR REPLACE FUNCTION public.handle_payment_status_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    p public.profiles%ROWTYPE;
    a public.appointments%ROWTYPE;
    source text := 'handle_payment_status_change() for payment ' || coalesce(NEW.id::text, '?');
    mail reactor.task;
    event reactor.task;
    unbuilt reactor.task;
BEGIN
    SELECT * INTO p FROM public.profiles WHERE id = NEW.user_id;
    IF NEW.appointment_id IS NOT NULL THEN
        SELECT * INTO a FROM public.appointments WHERE id = NEW.appointment_id;
    END IF;
    IF NEW.status = 'completed' AND a.id IS NOT NULL THEN
        UPDATE public.appointments
           SET paid_at = coalesce(paid_at, now()),
               status = CASE WHEN status = 'pending_payment' THEN 'scheduled' ELSE status END
         WHERE id = a.id;
    END IF;
    BEGIN
        event := reactor.analytics_task('payment_' || NEW.status, NEW.user_id,
            jsonb_build_object('payment_id', NEW.id, 'amount', NEW.amount,
                               'currency', NEW.currency, 'previous_status', OLD.status));
        -- Last: the family's own text is what may not fit in a message.
        IF NEW.status = 'completed' THEN
            mail := reactor.profile_email_task(p, 'payment_confirmation',
                jsonb_build_object('full_name', p.full_name, 'amount', NEW.amount,
                                   'currency', NEW.currency, 'appointment_id', NEW.appointment_id,
                                   'scheduled_at', a.scheduled_at), 7);
        ELSIF NEW.status = 'failed' THEN
            mail := reactor.profile_email_task(p, 'payment_failed',
                jsonb_build_object('full_name', p.full_name, 'amount', NEW.amount,
                                   'currency', NEW.currency, 'appointment_id', NEW.appointment_id),
                7);
        END IF;
    EXCEPTION WHEN OTHERS THEN
        unbuilt := reactor.unbuilt(SQLERRM);
    END;
    IF NEW.status IN ('completed', 'failed') THEN
        PERFORM reactor.enqueue_or_refuse(source, 'email_queue', coalesce(mail, unbuilt));
    END IF;
    PERFORM reactor.enqueue_or_refuse(source, 'analytics_queue', coalesce(event, unbuilt));
    RETURN NEW;
END
$$;

-- The cron jobs (as in 030 and 040). One family's row never stops a run for
-- the others: each runs set-based, as before, and only if that fails (an
-- app's own trigger refuses one row, a lock wait times out) goes row by row,
-- each row in its own subtransaction, re-checking the row's state (a row
-- the app changed meanwhile is left as the app left it). A row that still
-- fails is recorded in reactor.refusals and tried again at the next run.

-- One reminder of a claimed consultation: built (nothing written, so no
-- transaction id) and queued, or refused and recorded.
CREATE OR REPLACE FUNCTION reactor.queue_reminder(a public.appointments, template text,
                                                  priority integer)
RETURNS bigint
LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    p public.profiles%ROWTYPE;
    mail reactor.task;
BEGIN
    SELECT * INTO p FROM public.profiles WHERE id = a.user_id;
    BEGIN
        mail := reactor.profile_email_task(p, template,
            reactor.appointment_email_variables(p.full_name, a.specialist_name, a.scheduled_at,
                                                a.duration_minutes, a.id), priority);
    EXCEPTION WHEN OTHERS THEN
        mail := reactor.unbuilt(SQLERRM);
    END;
    RETURN reactor.enqueue_or_refuse(
        'send_appointment_reminders() for appointment ' || coalesce(a.id::text, '?'),
        'email_queue', mail);
END
$$;

-- Each reminder exactly once: claimed (reminder_*_sent_at) and queued, or
-- refused and recorded (claimed all the same, so not refused again every
-- hour). The counts are of reminders queued.
CREATE OR REPLACE FUNCTION public.send_appointment_reminders(
    OUT reminders_24h integer, OUT reminders_1h integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    r record;
    a public.appointments%ROWTYPE;
BEGIN
    reminders_24h := 0;
    reminders_1h := 0;
    BEGIN
        FOR a IN
            UPDATE public.appointments
               SET reminder_24h_sent_at = now()
             WHERE status = 'scheduled'
               AND reminder_24h_sent_at IS NULL
               AND scheduled_at >  now() + interval '1 hour'
               AND scheduled_at <= now() + interval '24 hours'
            RETURNING *
        LOOP
            IF reactor.queue_reminder(a, 'appointment_reminder_24h', 5) IS NOT NULL THEN
                reminders_24h := reminders_24h + 1;
            END IF;
        END LOOP;
        FOR a IN
            UPDATE public.appointments
               SET reminder_1h_sent_at = now()
             WHERE status = 'scheduled'
               AND reminder_1h_sent_at IS NULL
               AND scheduled_at >  now()
               AND scheduled_at <= now() + interval '1 hour'
            RETURNING *
        LOOP
            IF reactor.queue_reminder(a, 'appointment_reminder_1h', 8) IS NOT NULL THEN
                reminders_1h := reminders_1h + 1;
            END IF;
        END LOOP;
        RETURN;
    EXCEPTION WHEN OTHERS THEN
        RAISE LOG 'reactor: send_appointment_reminders() goes row by row: %', SQLERRM;
    END;

    reminders_24h := 0;
    reminders_1h := 0;
    FOR r IN
        SELECT id, scheduled_at > now() + interval '1 hour' AS tomorrow
          FROM public.appointments
         WHERE status = 'scheduled'
           AND ((reminder_24h_sent_at IS NULL AND scheduled_at > now() + interval '1 hour'
                 AND scheduled_at <= now() + interval '24 hours')
             OR (reminder_1h_sent_at IS NULL AND scheduled_at > now()
                 AND scheduled_at <= now() + interval '1 hour'))
    LOOP
        BEGIN
            IF r.tomorrow THEN
                UPDATE public.appointments
                   SET reminder_24h_sent_at = now()
                 WHERE id = r.id AND status = 'scheduled' AND reminder_24h_sent_at IS NULL
                   AND scheduled_at > now() + interval '1 hour'
                   AND scheduled_at <= now() + interval '24 hours'
                RETURNING * INTO a;
                IF FOUND AND reactor.queue_reminder(a, 'appointment_reminder_24h', 5) IS NOT NULL
                THEN
                    reminders_24h := reminders_24h + 1;
                END IF;
            ELSE
                UPDATE public.appointments
                   SET reminder_1h_sent_at = now()
                 WHERE id = r.id AND status = 'scheduled' AND reminder_1h_sent_at IS NULL
                   AND scheduled_at > now() AND scheduled_at <= now() + interval '1 hour'
                RETURNING * INTO a;
                IF FOUND AND reactor.queue_reminder(a, 'appointment_reminder_1h', 8) IS NOT NULL
                THEN
                    reminders_1h := reminders_1h + 1;
                END IF;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            INSERT INTO reactor.refusals (source, reason)
            VALUES ('send_appointment_reminders() for appointment ' || r.id,
                    'could not claim the reminder: ' || SQLERRM);
            RAISE LOG 'reactor: send_appointment_reminders() skipped appointment %: %',
                r.id, SQLERRM;
        END;
    END LOOP;
END
$$;

-- "Ended" is written as scheduled_at <= now() - duration: the same instant as
-- scheduled_at + duration <= now(), without overflowing on a far-future date.
CREATE OR REPLACE FUNCTION public.update_appointment_statuses(
    OUT started integer, OUT completed integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    r record;
BEGIN
    BEGIN
        UPDATE public.appointments
           SET status = 'completed'
         WHERE status IN ('scheduled', 'in_progress')
           AND scheduled_at <= now() - make_interval(mins => duration_minutes);
        GET DIAGNOSTICS completed = ROW_COUNT;

        UPDATE public.appointments
           SET status = 'in_progress'
         WHERE status = 'scheduled'
           AND scheduled_at <= now();
        GET DIAGNOSTICS started = ROW_COUNT;
        RETURN;
    EXCEPTION WHEN OTHERS THEN
        RAISE LOG 'reactor: update_appointment_statuses() goes row by row: %', SQLERRM;
    END;

    started := 0;
    completed := 0;
    FOR r IN
        SELECT id FROM public.appointments
         WHERE status IN ('scheduled', 'in_progress') AND scheduled_at <= now()
    LOOP
        BEGIN
            UPDATE public.appointments
               SET status = 'completed'
             WHERE id = r.id AND status IN ('scheduled', 'in_progress')
               AND scheduled_at <= now() - make_interval(mins => duration_minutes);
            IF FOUND THEN
                completed := completed + 1;
            ELSE
                UPDATE public.appointments
                   SET status = 'in_progress'
                 WHERE id = r.id AND status = 'scheduled' AND scheduled_at <= now();
                IF FOUND THEN
                    started := started + 1;
                END IF;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            INSERT INTO reactor.refusals (source, reason)
            VALUES ('update_appointment_statuses() for appointment ' || r.id,
                    'could not update its status: ' || SQLERRM);
            RAISE LOG 'reactor: update_appointment_statuses() skipped appointment %: %',
                r.id, SQLERRM;
        END;
    END LOOP;
END
$$;

-- The same for abandoned checkups.
CREATE OR REPLACE FUNCTION public.cleanup_old_assessments(older_than interval DEFAULT interval '30 days')
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    n integer := 0;
    r record;
BEGIN
    BEGIN
        UPDATE public.assessments
           SET status = 'abandoned'
         WHERE status = 'in_progress'
           AND created_at < now() - older_than;
        GET DIAGNOSTICS n = ROW_COUNT;
        RETURN n;
    EXCEPTION WHEN OTHERS THEN
        RAISE LOG 'reactor: cleanup_old_assessments() goes row by row: %', SQLERRM;
    END;

    FOR r IN
        SELECT id FROM public.assessments
         WHERE status = 'in_progress' AND created_at < now() - older_than
    LOOP
        BEGIN
            UPDATE public.assessments SET status = 'abandoned'
             WHERE id = r.id AND status = 'in_progress' AND created_at < now() - older_than;
            IF FOUND THEN
                n := n + 1;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            INSERT INTO reactor.refusals (source, reason)
            VALUES ('cleanup_old_assessments() for assessment ' || r.id,
                    'could not set status abandoned: ' || SQLERRM);
            RAISE LOG 'reactor: cleanup_old_assessments() skipped assessment %: %', r.id, SQLERRM;
        END;
    END LOOP;
    RETURN n;
END
$$;

-- Housekeeping forgets old refusals too, and a queue whose archive table is
-- gone no longer stops it.
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
        CONTINUE WHEN to_regclass(format('pgmq.%I', 'a_' || q.queue_name)) IS NULL;
        EXECUTE format('DELETE FROM pgmq.%I WHERE archived_at < $1', 'a_' || q.queue_name)
            USING now() - retention;
        GET DIAGNOSTICS n = ROW_COUNT;
        total := total + n;
    END LOOP;
    DELETE FROM reactor.job_failures WHERE updated_at < now() - retention;
    GET DIAGNOSTICS n = ROW_COUNT;
    total := total + n;
    DELETE FROM reactor.refusals WHERE refused_at < now() - retention;
    GET DIAGNOSTICS n = ROW_COUNT;
    total := total + n;
    RETURN total;
END
$$;

REVOKE ALL ON reactor.refusals FROM PUBLIC;
