-- A subject an email task gives is at most 998 characters (RFC 5322's line), as the
-- reactor's EmailMessage model has it (reactor/clinic/email.py, MAX_SUBJECT): the
-- email package refolds a subject in time that grows with the square of its words,
-- so a subject of a quarter of a megabyte took seconds of the reactor's CPU to build.
-- A longer one is refused here, where the app can see why, with the same words.
-- Otherwise 044's function, unchanged.
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
            WHEN length(email_task.subject) > 998
                THEN 'subject must be at most 998 characters'
            WHEN email_task.template IS NULL OR email_task.template !~ '^[a-z0-9_]+$'
                THEN 'template must match [a-z0-9_]+'
            WHEN email_task.variables IS NOT NULL AND jsonb_typeof(email_task.variables) <> 'object'
                THEN 'variables must be a JSON object'
            WHEN email_task.locale IS NOT NULL AND email_task.locale NOT IN ('ru', 'en')
                THEN 'locale must be ru or en'
        END)::reactor.task
$$;
