-- The clinic's housekeeping (scheduled by 030 as reactor-prune-history) is now the
-- engine's pruning (reactor.prune_history, the engine's migration 002: archives,
-- failure bookkeeping, pg_cron's run log) plus the clinic's own table of refusals
-- (041). Same name, arguments, result and grants as before.
CREATE OR REPLACE FUNCTION public.prune_reactor_history(retention interval DEFAULT interval '30 days')
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    total bigint;
    n bigint;
BEGIN
    total := reactor.prune_history(retention);
    DELETE FROM reactor.refusals WHERE refused_at < now() - retention;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN total + n;
END
$$;
