"""The clinic's own SQL: analytics, the email ledger, reports and payments.

Values are always bound parameters; the engine's statements (queues, dead
letters, status, migrations) are in reactor.engine.queries.
"""

from __future__ import annotations

from typing import LiteralString

# -- processors -----------------------------------------------------------------------
# The events of several jobs in one statement and one commit (AnalyticsProcessor's group
# commit). An event whose user is not in public.profiles is left out, and its msg_id
# returned: that job alone fails (permanently), not the others.
INSERT_ANALYTICS_EVENTS: LiteralString = """
WITH v AS (
    SELECT * FROM unnest(%(events)s::text[], %(user_ids)s::uuid[], %(properties)s::jsonb[],
                         %(occurred_at)s::timestamptz[], %(msg_ids)s::bigint[])
                  AS v(event, user_id, properties, occurred_at, msg_id)
), missing AS (
    SELECT msg_id FROM v
     WHERE user_id IS NOT NULL
       AND NOT EXISTS (SELECT FROM public.profiles p WHERE p.id = v.user_id)
), inserted AS (
    INSERT INTO public.analytics_events (event, user_id, properties, occurred_at, source_msg_id)
    SELECT event, user_id, properties, coalesce(occurred_at, now()), msg_id
      FROM v WHERE msg_id NOT IN (SELECT msg_id FROM missing)
    ON CONFLICT (source_msg_id) DO NOTHING
)
SELECT msg_id FROM missing
"""

# -- email ---------------------------------------------------------------------------
# The claim of a ledger key as one autocommit statement (one round trip, not BEGIN, INSERT,
# SELECT, COMMIT): a row with NULL when the key is ours to send (new, or a 'failed' row taken
# over), a row with the holder's status ('sent', 'sending') when it is not. No row: the holder
# committed after this statement's snapshot (two deliveries of one key at once); retry.
CLAIM_EMAIL: LiteralString = """
WITH claimed AS (
    INSERT INTO public.email_ledger (idempotency_key, queue, msg_id, enqueued_at, recipient,
                                     template, status)
    VALUES (%(key)s, %(queue)s, %(msg_id)s, %(enqueued_at)s, %(recipient)s, %(template)s,
            'sending')
    ON CONFLICT (idempotency_key) DO UPDATE
       SET status = 'sending', attempts = email_ledger.attempts + 1, msg_id = EXCLUDED.msg_id,
           enqueued_at = EXCLUDED.enqueued_at, updated_at = now()
     WHERE email_ledger.status = 'failed'
    RETURNING status
)
SELECT NULL::text, NULL::timestamptz, NULL::bigint, NULL::double precision FROM claimed
UNION ALL
SELECT status, updated_at, msg_id, extract(epoch FROM now() - updated_at)::double precision
  FROM public.email_ledger
 WHERE idempotency_key = %(key)s AND NOT EXISTS (SELECT FROM claimed)
"""
# Delivery-unknown dead letters whose ledger row has since been written 'sent' (the
# worker was frozen, not dead, and wrote its verdict when it woke): archived out of the
# dead-letter queue. A concurrent replica's archive of the same letter returns false,
# so each is reported once.
RECONCILE_UNKNOWN: LiteralString = """
WITH resolved AS (
    SELECT d.msg_id, l.idempotency_key AS key, l.msg_id AS sent_by
      FROM pgmq.q_email_queue_dlq d
      JOIN public.email_ledger l
        ON l.idempotency_key = d.message -> 'original' ->> 'idempotency_key'
     WHERE l.status = 'sent' AND d.message ->> 'error' LIKE 'delivery state unknown%%'
     ORDER BY d.msg_id
     LIMIT 500
)
SELECT msg_id, key, sent_by FROM resolved WHERE pgmq.archive('email_queue_dlq', msg_id)
"""
# The 'sent' verdicts of several mails in one statement (a group commit: whoever writes
# takes every verdict waiting at that moment).
EMAIL_SENT_MANY: LiteralString = """
UPDATE public.email_ledger AS l
   SET status = 'sent', message_id = v.message_id, sent_at = now(), updated_at = now(),
       last_error = NULL
  FROM unnest(%(keys)s::text[], %(message_ids)s::text[]) AS v(idempotency_key, message_id)
 WHERE l.idempotency_key = v.idempotency_key
"""
# Only the claim of this delivery: a worker frozen past its claim's bound may wake after
# another delivery took the key over; its 'failed' must not overwrite that one's state.
EMAIL_FAILED: LiteralString = """
UPDATE public.email_ledger SET status = 'failed', last_error = %(error)s, updated_at = now()
 WHERE idempotency_key = %(key)s AND status = 'sending' AND msg_id = %(msg_id)s
"""
# `reactor email resolve`: the operator's verdict on a mail left 'sending' by a worker
# that was killed mid-send. 'sent' archives a replay without sending; 'failed' lets the
# next delivery (a replay) claim it and send.
RESOLVE_EMAIL: LiteralString = """
UPDATE public.email_ledger
   SET status = %(status)s, updated_at = now(),
       sent_at = CASE WHEN %(status)s = 'sent' THEN now() END,
       last_error = CASE WHEN %(status)s = 'failed' THEN 'resolved by the operator: resend'
                         ELSE last_error END
 WHERE idempotency_key = %(key)s AND status = 'sending'
RETURNING recipient, template
"""
STUCK_EMAILS: LiteralString = """
SELECT idempotency_key, recipient, template, updated_at FROM public.email_ledger
 WHERE status = 'sending' AND updated_at < now() - make_interval(secs => %(older_than_s)s)
 ORDER BY updated_at LIMIT 200
"""
PROFILE_LOCALE_BY_EMAIL: LiteralString = """
SELECT locale FROM public.profiles WHERE lower(email) = lower(%(email)s) LIMIT 1
"""

# -- reports ----------------------------------------------------------------------------
# results as text (decoded with the message limits) and its size: a checkup row is
# as untrusted as a message body.
LOAD_CHECKUP: LiteralString = """
SELECT a.status, a.user_id, a.completed_at,
       CASE WHEN octet_length(a.results::text) <= %(max_bytes)s THEN a.results::text END,
       octet_length(a.results::text), p.email, p.full_name, p.locale
  FROM public.assessments a JOIN public.profiles p ON p.id = a.user_id
 WHERE a.id = %(assessment_id)s
"""
# xmax = 0 tells a fresh insert from an update: only a new report mails the family.
UPSERT_REPORT: LiteralString = """
INSERT INTO public.reports (assessment_id, user_id, path, bytes, sha256, generated_at)
VALUES (%(assessment_id)s, %(user_id)s, %(path)s, %(bytes)s, %(sha256)s, now())
ON CONFLICT (assessment_id) DO UPDATE
   SET path = EXCLUDED.path, bytes = EXCLUDED.bytes, sha256 = EXCLUDED.sha256,
       generated_at = EXCLUDED.generated_at
RETURNING (xmax = 0) AS inserted
"""

# -- payments ---------------------------------------------------------------------------
# `sharing`: other rows (a few) naming the same provider payment, whatever their
# provider: one provider payment never pays for two rows (see migration 037).
LOAD_PAYMENT: LiteralString = """
SELECT p.status, p.amount, p.currency, p.provider, p.provider_payment_id, p.created_at,
       p.refunded_amount,
       ARRAY(SELECT o.id::text FROM public.payments AS o
              WHERE o.provider_payment_id = p.provider_payment_id AND o.id <> p.id
              ORDER BY o.id LIMIT 5) AS sharing
  FROM public.payments AS p WHERE p.id = %(payment_id)s
"""
# A final status never moves backwards: pending → completed|failed (refunds: RECORD_REFUND).
# The row must still be the one the provider was asked about: same amount, currency,
# provider and provider id, and no other row naming that provider payment; otherwise
# nothing is updated (and the processor checks again).
SET_PAYMENT_STATUS: LiteralString = """
UPDATE public.payments AS p SET status = %(status)s, status_reason = %(reason)s
 WHERE p.id = %(payment_id)s AND p.status = 'pending'
   AND p.amount = %(amount)s AND p.currency = %(currency)s
   AND p.provider = %(provider)s AND p.provider_payment_id = %(provider_payment_id)s
   AND NOT EXISTS (SELECT 1 FROM public.payments AS o
                    WHERE o.provider_payment_id = p.provider_payment_id AND o.id <> p.id)
RETURNING p.status
"""
PAYMENT_BY_PROVIDER_ID: LiteralString = """
SELECT id FROM public.payments WHERE provider_payment_id = %(provider_payment_id)s
"""
QUEUE_PAYMENT_VERIFY: LiteralString = (
    "SELECT public.queue_payment_processing(%(payment_id)s, 'verify')")

# -- payment operations (issue 11, migration 037) ----------------------------------------
# The open operation of a payment and action, or a new one (seq = last + 1): every
# delivery, requeue and replay of the same intent gets the same seq, hence the same
# Idempotence-Key; age_s is measured by the database from when it was first requested.
CLAIM_PAYMENT_OPERATION: LiteralString = """
INSERT INTO reactor.payment_operations AS o (payment_id, action, seq, amount)
SELECT %(payment_id)s::uuid, %(action)s::text, coalesce(max(p.seq), 0) + 1, %(amount)s::numeric
  FROM reactor.payment_operations AS p
 WHERE p.payment_id = %(payment_id)s::uuid AND p.action = %(action)s::text
ON CONFLICT (payment_id, action) WHERE finished_at IS NULL
DO UPDATE SET seq = o.seq
RETURNING o.seq, o.amount, o.provider_object_id,
          extract(epoch FROM now() - o.requested_at)::float8 AS age_s
"""
# An operation this very message already finished: a redelivery (the reactor stopped
# between recording the outcome and archiving the message) must not start another.
FINISHED_BY_MESSAGE: LiteralString = """
SELECT seq, outcome FROM reactor.payment_operations
 WHERE payment_id = %(payment_id)s AND action = %(action)s AND msg_id = %(msg_id)s
   AND finished_at IS NOT NULL
 ORDER BY seq DESC LIMIT 1
"""
# A refund the provider made: add it to the row, which becomes `refunded` once all of
# it is. Like SET_PAYMENT_STATUS, only while the row is the one the refund was made
# for, and never beyond the amount paid (NULL: nothing updated).
RECORD_REFUND: LiteralString = """
UPDATE public.payments AS p
   SET refunded_amount = p.refunded_amount + %(refund)s,
       status = CASE WHEN p.refunded_amount + %(refund)s >= p.amount THEN 'refunded'
                     ELSE p.status END
 WHERE p.id = %(payment_id)s AND p.status = 'completed'
   AND p.refunded_amount + %(refund)s <= p.amount
   AND p.amount = %(amount)s AND p.currency = %(currency)s
   AND p.provider = %(provider)s AND p.provider_payment_id = %(provider_payment_id)s
RETURNING p.status
"""
RECORD_PAYMENT_CHECK: LiteralString = """
UPDATE reactor.payment_operations
   SET checks = checks + 1, checked_at = now(),
       provider_object_id = coalesce(provider_object_id, %(object_id)s)
 WHERE payment_id = %(payment_id)s AND action = %(action)s AND seq = %(seq)s
"""
# msg_id: the message that finished it (see FINISHED_BY_MESSAGE).
FINISH_PAYMENT_OPERATION: LiteralString = """
UPDATE reactor.payment_operations
   SET outcome = %(outcome)s, finished_at = now(), msg_id = %(msg_id)s
 WHERE payment_id = %(payment_id)s AND action = %(action)s AND seq = %(seq)s
   AND finished_at IS NULL
"""
# The payment reached a final status some other way (staff, another message).
SUPERSEDE_PAYMENT_OPERATIONS: LiteralString = """
UPDATE reactor.payment_operations SET outcome = 'superseded', finished_at = now()
 WHERE payment_id = %(payment_id)s AND action = %(action)s AND finished_at IS NULL
"""
PAYMENT_BY_PROVIDER: LiteralString = """
SELECT id FROM public.payments
 WHERE provider = %(provider)s AND provider_payment_id = %(provider_payment_id)s
"""
# NULL when a verify of this payment is already queued (see migration 037).
QUEUE_PAYMENT_VERIFY_ONCE: LiteralString = (
    "SELECT reactor.queue_payment_verify_once(%(payment_id)s)")

