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
-- `msg_id` is the message that finished it: if the reactor stops between
-- recording the outcome and archiving that message, its redelivery finds the
-- work done instead of starting a second refund.
-- YooKassa honours an Idempotence-Key for 24 hours only: a refund that has no
-- `provider_object_id` and was requested longer ago than that is first looked
-- for at the provider (its metadata names the operation's key) before it is
-- posted again.
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
    msg_id              bigint,
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

-- Partial refunds: how much of the payment has been refunded. The payment
-- stays `completed` until all of it is, then becomes `refunded`.
ALTER TABLE public.payments
    ADD COLUMN IF NOT EXISTS refunded_amount numeric(12, 2) NOT NULL DEFAULT 0;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint
                    WHERE conrelid = 'public.payments'::regclass
                      AND conname = 'payments_refunded_amount_check') THEN
        ALTER TABLE public.payments ADD CONSTRAINT payments_refunded_amount_check
            CHECK (refunded_amount >= 0 AND refunded_amount <= amount);
    END IF;
END
$$;

-- One provider payment pays for one row: without this, a succeeded YooKassa
-- payment named by several rows would complete all of them. Rows that already
-- share a provider id cannot be sorted out by a migration (which row was
-- paid is a fact only the payments' history knows), so they are named and
-- the migration stops; the lock keeps new duplicates out between the check
-- and the index. The index also finds the row a notification names.
LOCK TABLE public.payments IN SHARE MODE;
DO $$
DECLARE
    shared text;
BEGIN
    SELECT string_agg(format('%s payment %s is named by rows %s', d.provider,
                             d.provider_payment_id, d.ids), '; ')
      INTO shared
      FROM (SELECT p.provider, p.provider_payment_id,
                   string_agg(p.id::text, ', ' ORDER BY p.created_at, p.id) AS ids
              FROM public.payments AS p
             WHERE p.provider_payment_id IS NOT NULL
             GROUP BY p.provider, p.provider_payment_id
            HAVING count(*) > 1
             ORDER BY p.provider, p.provider_payment_id
             LIMIT 20) AS d;
    IF shared IS NOT NULL THEN
        RAISE EXCEPTION 'one provider payment must pay for one row, but %. Fix: on every '
            'row but the one each payment paid for, set provider_payment_id to NULL (or to '
            'its own payment''s id), then run reactor migrate again', shared;
    END IF;
END
$$;
CREATE UNIQUE INDEX IF NOT EXISTS payments_provider_payment_id_key
    ON public.payments (provider, provider_payment_id) WHERE provider_payment_id IS NOT NULL;
-- By the id alone: the reactor also refuses a row whose provider id a row of
-- another provider names (queries.LOAD_PAYMENT), without a full scan.
CREATE INDEX IF NOT EXISTS payments_provider_payment_id_idx
    ON public.payments (provider_payment_id) WHERE provider_payment_id IS NOT NULL;
