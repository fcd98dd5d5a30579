-- Payment operations: one row per intent (verify, capture or refund of one
-- payment), so that what a provider call depends on belongs to the intent and
-- not to the queue message that carries it.
--
-- A message is redelivered, requeued ("still pending": the same body as a new
-- message) or replayed from the dead letters (`reactor dlq replay`: a new
-- message again); each time the processor finds the *open* operation of that
-- payment and action, so:
-- - the Idempotence-Key sent to the provider is "<payment id>:<action>:<seq>"
--   (one operation, one key: a replayed refund never becomes a second refund);
-- - deadlines ("still pending after PAYMENT_VERIFY_MAX_AGE") count from
--   `requested_at`, when the operation was first handled, never from the
--   payment's age or a message's;
-- - `provider_object_id` (the refund's id at the provider) lets a pending
--   refund be polled by its own id instead of being requested again.
-- An operation is finished (`finished_at`, `outcome`) when the provider has
-- decided it; a capture or refund whose answer disagrees with our row stays
-- open, so a replay repeats the same key and never moves money twice.
--
-- Schema `reactor` is not exposed by PostgREST (see 036).
CREATE TABLE IF NOT EXISTS reactor.payment_operations (
    payment_id          uuid        NOT NULL REFERENCES public.payments (id) ON DELETE CASCADE,
    action              text        NOT NULL CHECK (action IN ('verify', 'capture', 'refund')),
    seq                 integer     NOT NULL CHECK (seq > 0),
    amount              numeric(12, 2),
    requested_at        timestamptz NOT NULL DEFAULT now(),
    provider_object_id  text,
    checks              integer     NOT NULL DEFAULT 0,
    checked_at          timestamptz,
    outcome             text CHECK (outcome IN ('succeeded', 'canceled', 'mismatch', 'expired',
                                                'superseded')),
    finished_at         timestamptz,
    PRIMARY KEY (payment_id, action, seq)
);
-- At most one open operation per payment and action: concurrent deliveries
-- find the same one (INSERT ... ON CONFLICT on this index).
CREATE UNIQUE INDEX IF NOT EXISTS payment_operations_open_idx
    ON reactor.payment_operations (payment_id, action) WHERE finished_at IS NULL;
REVOKE ALL ON reactor.payment_operations FROM PUBLIC;

-- A provider notification is a hint to ask the provider; a burst of them must
-- not become a burst of messages and API calls. Queue a verify for the
-- payment unless one is already waiting in payment_processing_queue (queued,
-- delayed for its next check, or in flight); the advisory lock makes the check
-- and the send one step for concurrent notifications. A "still pending"
-- requeue sends the same body again, so the rule holds across requeues.
-- A notification usually means the provider has just decided: a verify that
-- waits for its next scheduled check, and was never delivered (read_ct = 0:
-- so no worker holds it), is made visible now, unless the payment was asked
-- about in the last minute. A burst thus costs at most one API call a minute.
-- Returns the new msg_id, or NULL when one was already queued.
CREATE OR REPLACE FUNCTION reactor.queue_payment_verify_once(payment_id uuid)
RETURNS bigint
LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    waiting bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(
        hashtextextended('reactor.payment_verify:' || payment_id::text, 0));
    IF NOT EXISTS (SELECT 1 FROM pgmq.q_payment_processing_queue AS q
                    WHERE q.message ->> 'payment_id' = payment_id::text
                      AND coalesce(q.message ->> 'action', 'verify') = 'verify') THEN
        RETURN public.queue_payment_processing(payment_id, 'verify');
    END IF;
    SELECT q.msg_id INTO waiting
      FROM pgmq.q_payment_processing_queue AS q
     WHERE q.message ->> 'payment_id' = payment_id::text
       AND coalesce(q.message ->> 'action', 'verify') = 'verify'
       AND q.read_ct = 0 AND q.vt > now()
       AND NOT EXISTS (SELECT 1 FROM reactor.payment_operations AS o
                        WHERE o.payment_id = queue_payment_verify_once.payment_id
                          AND o.action = 'verify' AND o.finished_at IS NULL
                          AND o.checked_at > now() - interval '1 minute')
     LIMIT 1
       FOR UPDATE SKIP LOCKED;
    IF waiting IS NOT NULL THEN
        PERFORM pgmq.set_vt('payment_processing_queue', waiting, 0);
        PERFORM pg_notify('reactor_wakeup', 'payment_processing_queue');
    END IF;
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION reactor.queue_payment_verify_once(uuid) FROM PUBLIC;

-- Notifications name the provider's id: find the row without a full scan.
CREATE INDEX IF NOT EXISTS payments_provider_payment_id_idx
    ON public.payments (provider_payment_id) WHERE provider_payment_id IS NOT NULL;
