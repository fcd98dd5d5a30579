-- "Database webhooks": row triggers that turn app changes into queued work.
-- They run inside the app's own transaction, so the work exists if and only
-- if the change commits, and the reactor is woken at that commit.
-- SECURITY DEFINER: an app role that may insert a row need not be allowed to
-- touch pgmq itself.

-- A checkup that becomes completed: PDF report, "results are in" mail, analytics.
CREATE OR REPLACE FUNCTION public.handle_completed_checkup() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    p public.profiles%ROWTYPE;
BEGIN
    -- Only the transition counts: re-saving a completed checkup does nothing.
    IF TG_OP = 'UPDATE' AND OLD.status = 'completed' THEN
        RETURN NEW;
    END IF;
    SELECT * INTO p FROM public.profiles WHERE id = NEW.user_id;
    PERFORM public.queue_report_generation(NEW.id, NEW.user_id, 'pdf');
    IF FOUND THEN
        PERFORM public.queue_email_task(
            p.email, NULL, 'checkup_completed',
            jsonb_build_object('full_name', p.full_name, 'assessment_id', NEW.id),
            3, p.locale);
    END IF;
    PERFORM public.queue_analytics_event(
        'checkup_completed', NEW.user_id,
        jsonb_build_object('assessment_id', NEW.id,
                           'duration_s', extract(epoch FROM NEW.completed_at - NEW.created_at)::bigint));
    RETURN NEW;
END
$$;

-- A new consultation: confirmation mail.
CREATE OR REPLACE FUNCTION public.handle_new_appointment() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    p public.profiles%ROWTYPE;
BEGIN
    SELECT * INTO p FROM public.profiles WHERE id = NEW.user_id;
    IF FOUND THEN
        PERFORM public.queue_email_task(
            p.email, NULL, 'appointment_confirmation',
            public.appointment_email_variables(p.full_name, NEW.specialist_name, NEW.scheduled_at,
                                               NEW.duration_minutes, NEW.id),
            5, p.locale);
    END IF;
    PERFORM public.queue_analytics_event(
        'appointment_created', NEW.user_id, jsonb_build_object('appointment_id', NEW.id));
    RETURN NEW;
END
$$;

-- A payment whose status changed: completed → receipt + consultation paid;
-- failed → notice. Other transitions (refunded, back to pending) send nothing.
CREATE OR REPLACE FUNCTION public.handle_payment_status_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    p public.profiles%ROWTYPE;
    a public.appointments%ROWTYPE;
BEGIN
    SELECT * INTO p FROM public.profiles WHERE id = NEW.user_id;
    IF NEW.appointment_id IS NOT NULL THEN
        SELECT * INTO a FROM public.appointments WHERE id = NEW.appointment_id;
    END IF;

    IF NEW.status = 'completed' THEN
        IF a.id IS NOT NULL THEN
            UPDATE public.appointments
               SET paid_at = coalesce(paid_at, now()),
                   status = CASE WHEN status = 'pending_payment' THEN 'scheduled' ELSE status END
             WHERE id = a.id;
        END IF;
        IF p.id IS NOT NULL THEN
            PERFORM public.queue_email_task(
                p.email, NULL, 'payment_confirmation',
                jsonb_build_object('full_name', p.full_name, 'amount', NEW.amount,
                                   'currency', NEW.currency, 'appointment_id', NEW.appointment_id,
                                   'scheduled_at', a.scheduled_at),
                7, p.locale);
        END IF;
    ELSIF NEW.status = 'failed' THEN
        IF p.id IS NOT NULL THEN
            PERFORM public.queue_email_task(
                p.email, NULL, 'payment_failed',
                jsonb_build_object('full_name', p.full_name, 'amount', NEW.amount,
                                   'currency', NEW.currency, 'appointment_id', NEW.appointment_id),
                7, p.locale);
        END IF;
    END IF;
    PERFORM public.queue_analytics_event(
        'payment_' || NEW.status, NEW.user_id,
        jsonb_build_object('payment_id', NEW.id, 'amount', NEW.amount, 'currency', NEW.currency,
                           'previous_status', OLD.status));
    RETURN NEW;
END
$$;

REVOKE EXECUTE ON FUNCTION public.handle_completed_checkup(), public.handle_new_appointment(),
    public.handle_payment_status_change() FROM PUBLIC, anon, authenticated;

DROP TRIGGER IF EXISTS on_checkup_completed ON public.assessments;
CREATE TRIGGER on_checkup_completed
    AFTER INSERT OR UPDATE OF status ON public.assessments
    FOR EACH ROW
    WHEN (NEW.status = 'completed')
    EXECUTE FUNCTION public.handle_completed_checkup();

DROP TRIGGER IF EXISTS on_new_appointment ON public.appointments;
CREATE TRIGGER on_new_appointment
    AFTER INSERT ON public.appointments
    FOR EACH ROW EXECUTE FUNCTION public.handle_new_appointment();

DROP TRIGGER IF EXISTS on_payment_status_change ON public.payments;
CREATE TRIGGER on_payment_status_change
    AFTER UPDATE OF status ON public.payments
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION public.handle_payment_status_change();
