-- The app's tables as DESIGN.md describes them. A real Supabase app already
-- has them, so every statement is "if absent"; columns the reactor relies on
-- are added if a pre-existing table lacks them.
CREATE EXTENSION IF NOT EXISTS pgcrypto;  -- gen_random_uuid() on PG < 13 and digest()

CREATE TABLE IF NOT EXISTS public.profiles (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email       text NOT NULL,
    full_name   text,
    locale      text NOT NULL DEFAULT 'ru' CHECK (locale IN ('ru', 'en')),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS public.assessments (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id       uuid NOT NULL REFERENCES public.profiles (id) ON DELETE CASCADE,
    status        text NOT NULL DEFAULT 'in_progress'
                  CHECK (status IN ('in_progress', 'completed', 'abandoned')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    completed_at  timestamptz,
    results       jsonb
);
CREATE INDEX IF NOT EXISTS assessments_in_progress_idx
    ON public.assessments (created_at) WHERE status = 'in_progress';

CREATE TABLE IF NOT EXISTS public.appointments (
    id                    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id               uuid NOT NULL REFERENCES public.profiles (id) ON DELETE CASCADE,
    specialist_name       text NOT NULL,
    scheduled_at          timestamptz NOT NULL,
    duration_minutes      integer NOT NULL DEFAULT 50 CHECK (duration_minutes > 0),
    status                text NOT NULL DEFAULT 'pending_payment'
                          CHECK (status IN ('pending_payment', 'scheduled', 'in_progress',
                                            'completed', 'cancelled')),
    paid_at               timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now(),
    reminder_24h_sent_at  timestamptz,
    reminder_1h_sent_at   timestamptz
);
ALTER TABLE public.appointments ADD COLUMN IF NOT EXISTS reminder_24h_sent_at timestamptz;
ALTER TABLE public.appointments ADD COLUMN IF NOT EXISTS reminder_1h_sent_at timestamptz;
-- The cron functions only ever look at consultations that are still moving.
CREATE INDEX IF NOT EXISTS appointments_active_idx
    ON public.appointments (scheduled_at) WHERE status IN ('scheduled', 'in_progress');

CREATE TABLE IF NOT EXISTS public.payments (
    id                   uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id              uuid NOT NULL REFERENCES public.profiles (id) ON DELETE CASCADE,
    appointment_id       uuid REFERENCES public.appointments (id) ON DELETE SET NULL,
    amount               numeric(12, 2) NOT NULL CHECK (amount >= 0),
    currency             text NOT NULL DEFAULT 'RUB',
    status               text NOT NULL DEFAULT 'pending'
                         CHECK (status IN ('pending', 'completed', 'failed', 'refunded')),
    provider             text NOT NULL DEFAULT 'manual',
    provider_payment_id  text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS public.reports (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    assessment_id  uuid NOT NULL UNIQUE REFERENCES public.assessments (id) ON DELETE CASCADE,
    user_id        uuid NOT NULL REFERENCES public.profiles (id) ON DELETE CASCADE,
    path           text NOT NULL,
    bytes          bigint NOT NULL,
    sha256         text NOT NULL,
    generated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS public.analytics_events (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    event          text NOT NULL,
    user_id        uuid REFERENCES public.profiles (id) ON DELETE SET NULL,
    properties     jsonb NOT NULL DEFAULT '{}'::jsonb,
    occurred_at    timestamptz NOT NULL DEFAULT now(),
    -- pgmq msg_id of analytics_queue: a redelivered message inserts nothing.
    source_msg_id  bigint UNIQUE
);

-- updated_at follows every change of a payment.
CREATE OR REPLACE FUNCTION public.touch_updated_at() RETURNS trigger
LANGUAGE plpgsql SET search_path = '' AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;
DROP TRIGGER IF EXISTS payments_touch_updated_at ON public.payments;
CREATE TRIGGER payments_touch_updated_at BEFORE UPDATE ON public.payments
    FOR EACH ROW EXECUTE FUNCTION public.touch_updated_at();

-- A checkup that becomes completed gets its completion time if the app did not set one.
CREATE OR REPLACE FUNCTION public.stamp_checkup_completed_at() RETURNS trigger
LANGUAGE plpgsql SET search_path = '' AS $$
BEGIN
    IF NEW.status = 'completed' AND NEW.completed_at IS NULL THEN
        NEW.completed_at := now();
    END IF;
    RETURN NEW;
END
$$;
DROP TRIGGER IF EXISTS assessments_stamp_completed_at ON public.assessments;
CREATE TRIGGER assessments_stamp_completed_at BEFORE INSERT OR UPDATE OF status ON public.assessments
    FOR EACH ROW EXECUTE FUNCTION public.stamp_checkup_completed_at();

-- Row level security: with no policy, anon and authenticated see nothing;
-- the app adds its own policies, service_role bypasses RLS.
ALTER TABLE public.profiles         ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.assessments      ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.appointments     ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.payments         ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.reports          ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.analytics_events ENABLE ROW LEVEL SECURITY;

GRANT SELECT, INSERT, UPDATE, DELETE ON
    public.profiles, public.assessments, public.appointments,
    public.payments, public.reports, public.analytics_events
TO service_role;
