-- Scheduled work, run by pg_cron inside the database. The job names and
-- schedules are those of the old Node system, so dashboards keep working.
--
-- pg_cron lives in exactly one database of a cluster (cron.database_name;
-- `postgres` on Supabase). In that database this migration creates the
-- extension if needed and schedules the jobs; in any other database (a test
-- clone, a second app database) it only defines the functions and says how
-- to schedule them, so it never fails there.

-- Brings every consultation in line with the clock in one call. A missed run
-- catches up: a consultation that already ended goes straight to completed.
-- pending_payment and cancelled consultations are never touched.
CREATE OR REPLACE FUNCTION public.update_appointment_statuses(
    OUT started integer, OUT completed integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    UPDATE public.appointments
       SET status = 'completed'
     WHERE status IN ('scheduled', 'in_progress')
       AND scheduled_at + make_interval(mins => duration_minutes) <= now();
    GET DIAGNOSTICS completed = ROW_COUNT;

    UPDATE public.appointments
       SET status = 'in_progress'
     WHERE status = 'scheduled'
       AND scheduled_at <= now();
    GET DIAGNOSTICS started = ROW_COUNT;
END
$$;

-- Checkups left in_progress for over 30 days are abandoned.
CREATE OR REPLACE FUNCTION public.cleanup_old_assessments(older_than interval DEFAULT interval '30 days')
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    n integer;
BEGIN
    UPDATE public.assessments
       SET status = 'abandoned'
     WHERE status = 'in_progress'
       AND created_at < now() - older_than;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- Queues the 24 h and the 1 h reminder, each exactly once per consultation.
-- The UPDATE ... WHERE reminder_*_sent_at IS NULL claims a row before the mail
-- is queued in the same transaction, so two overlapping runs cannot both
-- claim it (the second one re-checks the row after the first commits).
-- A consultation that starts within the hour never gets the "tomorrow" mail.
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
            public.appointment_email_variables(r.full_name, r.specialist_name, r.scheduled_at,
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
            public.appointment_email_variables(r.full_name, r.specialist_name, r.scheduled_at,
                                               r.duration_minutes, r.id),
            8, r.locale);
        reminders_1h := reminders_1h + 1;
    END LOOP;
END
$$;

-- Housekeeping the old system lacked: cron's run log and pgmq's archive
-- tables grow forever otherwise. Returns the number of rows removed.
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
    RETURN total;
END
$$;

-- Nobody but the owner, pg_cron and service_role runs the jobs by hand.
REVOKE EXECUTE ON FUNCTION public.update_appointment_statuses() FROM PUBLIC, anon, authenticated;
REVOKE EXECUTE ON FUNCTION public.cleanup_old_assessments(interval) FROM PUBLIC, anon, authenticated;
REVOKE EXECUTE ON FUNCTION public.send_appointment_reminders() FROM PUBLIC, anon, authenticated;
REVOKE EXECUTE ON FUNCTION public.prune_reactor_history(interval) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.update_appointment_statuses(), public.cleanup_old_assessments(interval),
    public.send_appointment_reminders(), public.prune_reactor_history(interval) TO service_role;

-- (Re)schedules the jobs in this database. cron.schedule with a job name
-- updates an existing job of that name, so re-applying never duplicates one.
CREATE OR REPLACE FUNCTION public.schedule_reactor_cron_jobs() RETURNS integer
LANGUAGE plpgsql SET search_path = '' AS $$
BEGIN
    IF to_regnamespace('cron') IS NULL THEN
        RAISE NOTICE 'pg_cron is not installed in database %, jobs not scheduled; '
            'run "reactor migrate" against database % (cron.database_name)',
            current_database(), current_setting('cron.database_name', true);
        RETURN 0;
    END IF;
    PERFORM cron.schedule('update-appointment-statuses', '*/5 * * * *',
                          'SELECT public.update_appointment_statuses()');
    PERFORM cron.schedule('cleanup-old-assessments', '0 3 * * *',
                          'SELECT public.cleanup_old_assessments()');
    PERFORM cron.schedule('send-appointment-reminders', '0 * * * *',
                          'SELECT public.send_appointment_reminders()');
    PERFORM cron.schedule('reactor-housekeeping', '30 3 * * *',
                          'SELECT public.prune_reactor_history()');
    RETURN 4;
END
$$;
REVOKE EXECUTE ON FUNCTION public.schedule_reactor_cron_jobs() FROM PUBLIC, anon, authenticated;

DO $$
BEGIN
    IF current_setting('cron.database_name', true) = current_database() THEN
        CREATE EXTENSION IF NOT EXISTS pg_cron;
    END IF;
    PERFORM public.schedule_reactor_cron_jobs();
END
$$;
