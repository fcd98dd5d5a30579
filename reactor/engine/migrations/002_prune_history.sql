-- The engine's housekeeping: forget what the engine itself kept past a retention
-- (pgmq's archives of every queue, including the dead-letter queues' archives, the
-- per-message failure bookkeeping, and pg_cron's run log where pg_cron is installed).
-- An app's own pruning calls it and adds its tables (the clinic's
-- public.prune_reactor_history, migrations/043). Safe to call any time; a queue whose
-- archive table is gone (dropped by hand) is skipped.
CREATE OR REPLACE FUNCTION reactor.prune_history(retention interval DEFAULT interval '30 days')
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
    RETURN total + n;
END
$$;
REVOKE ALL ON FUNCTION reactor.prune_history(interval) FROM PUBLIC;
