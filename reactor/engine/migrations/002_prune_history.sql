-- The engine's housekeeping: forget what the engine itself kept past a retention
-- (pgmq's archives of the registered queues and of their dead-letter queues, the
-- per-message failure bookkeeping, and pg_cron's run log where pg_cron is installed).
-- Queues another system keeps in the same pgmq are not the engine's: left alone.
-- pg_cron's run log is one table for every job: its old runs go, whoever's.
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
    FOR q IN SELECT r.name AS queue_name FROM reactor.queues r
             UNION ALL SELECT r.name || '_dlq' FROM reactor.queues r LOOP
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
