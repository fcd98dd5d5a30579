-- The email ledger: one row per mail the reactor sends, keyed by an
-- idempotency key (the message's own `idempotency_key`, else
-- "<queue>:<msg_id>"). It is written before the SMTP conversation
-- ('sending') and after it ('sent' or 'failed'), in committed transactions,
-- so a redelivered message never sends a second mail: 'sent' is archived at
-- once, and 'sending' (the worker died mid-send) is dead-lettered for a human
-- to check, never sent blind.
CREATE TABLE IF NOT EXISTS public.email_ledger (
    idempotency_key  text PRIMARY KEY,
    queue            text NOT NULL,
    msg_id           bigint NOT NULL,
    recipient        text NOT NULL,
    template         text NOT NULL,
    status           text NOT NULL CHECK (status IN ('sending', 'sent', 'failed')),
    message_id       text,
    attempts         integer NOT NULL DEFAULT 1,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    sent_at          timestamptz
);
CREATE INDEX IF NOT EXISTS email_ledger_sent_at_idx ON public.email_ledger (sent_at);
ALTER TABLE public.email_ledger ENABLE ROW LEVEL SECURITY;
GRANT SELECT ON public.email_ledger TO service_role;
