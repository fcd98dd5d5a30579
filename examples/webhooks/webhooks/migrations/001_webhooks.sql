-- Reliable outgoing webhooks: subscribers, and a queue of deliveries.
-- An event is published with webhooks.publish(type, data) from any trigger or
-- function, in the transaction that causes it: one message per active
-- subscription that wants the type, queued with public.enqueue (delivered when
-- the transaction commits, never for a rolled-back one).
CREATE SCHEMA IF NOT EXISTS webhooks;
REVOKE ALL ON SCHEMA webhooks FROM PUBLIC;

CREATE TABLE IF NOT EXISTS webhooks.subscriptions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    url         text    NOT NULL CHECK (url ~ '^https?://'),
    -- Standard Webhooks secret: "whsec_" + base64 of 24 to 64 random bytes.
    secret      text    NOT NULL CHECK (secret ~ '^whsec_[A-Za-z0-9+/=]{32,}$'),
    -- NULL: every type.
    event_types text[],
    active      boolean NOT NULL DEFAULT true,
    -- Why a subscription was switched off (410 Gone from its endpoint …).
    disabled_reason text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON webhooks.subscriptions FROM PUBLIC;

SELECT reactor.register_queue('webhook_queue');

-- Queues one delivery per interested subscription; returns how many. The message
-- carries its webhook-id (stable across retries: receivers de-duplicate on it).
CREATE OR REPLACE FUNCTION webhooks.publish(event_type text, data jsonb)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    s record;
    n integer := 0;
    event_id text := 'msg_' || replace(gen_random_uuid()::text, '-', '');
    at text := to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"');
BEGIN
    FOR s IN SELECT id FROM webhooks.subscriptions
              WHERE active AND (event_types IS NULL OR event_type = ANY (event_types)) LOOP
        PERFORM public.enqueue('webhook_queue', jsonb_build_object(
            'subscription_id', s.id,
            'webhook_id', event_id || '_' || s.id,
            'type', event_type,
            'timestamp', at,
            'data', data));
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;
REVOKE ALL ON FUNCTION webhooks.publish(text, jsonb) FROM PUBLIC;

-- A trigger function for any table: publishes "<table>.<insert|update|delete>"
-- with the row (NEW, or OLD for a delete).
--   CREATE TRIGGER orders_webhooks AFTER INSERT OR UPDATE ON public.orders
--       FOR EACH ROW EXECUTE FUNCTION webhooks.row_changed();
CREATE OR REPLACE FUNCTION webhooks.row_changed()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    PERFORM webhooks.publish(TG_TABLE_NAME || '.' || lower(TG_OP),
                             to_jsonb(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END));
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION webhooks.row_changed() FROM PUBLIC;
