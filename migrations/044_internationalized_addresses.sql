-- Mail to internationalized addresses (issue 29): a family on a Cyrillic
-- domain (user@пример.рф) or with a Cyrillic local part (мама@example.org)
-- gets its mail.
--
-- Until now reactor.email_task (041), and with it public.queue_email_task and
-- every trigger and cron job that mails a profile, refused any address that
-- was not ASCII ('"to" is not a valid email address'). The reactor now checks
-- addresses as RFC 6531 and IDNA 2008 allow them, with a maintained validator
-- (email-validator; reactor/clinic/services/mailer/address.py), and sends them
-- (the domain as A-labels where the local part is ASCII; SMTPUTF8 otherwise).
--
-- SQL cannot run that validator, so the check here is only the shape of an
-- address, and it accepts everything the reactor accepts: one @ with
-- something on each side, no space, control character or anything that
-- cannot stand unquoted in an address (@ < > ( ) [ ] , ; : \ "), a dot in the
-- domain (or one of the three that IDNA maps to a dot: 。．｡), and at most 254
-- characters (the reactor's own bound, EmailMessage.to). What passes here
-- and still is not an address (a..b@example.org, a label of 64 letters) is
-- dead-lettered by the reactor at once with the validator's reason.
-- tests/clinic/email/test_idn.py checks that the two ends agree on samples.

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
            WHEN email_task."to" IS NULL OR length(email_task."to") > 254
                 OR email_task."to" !~ '^[^[:space:][:cntrl:]@<>()\[\],;:\\"]+@[^[:space:][:cntrl:]@<>()\[\],;:\\"]*[.。．｡][^[:space:][:cntrl:]@<>()\[\],;:\\"]*$'
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
