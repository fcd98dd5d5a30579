"""Database webhooks (032): what each app change puts on the queues."""

from __future__ import annotations

from datetime import timedelta

import psycopg

from tests import factories as f


def test_completed_checkup_queues_report_mail_and_analytics(db: psycopg.Connection) -> None:
    user = f.profile(db, email="mama@example.com", full_name="Мария", locale="ru")
    checkup = f.assessment(db, user)
    assert f.queued(db, "report_generation_queue") == []

    db.execute("UPDATE public.assessments SET status = 'completed' WHERE id = %s", (checkup,))

    assert f.queued(db, "report_generation_queue") == [
        {"assessment_id": str(checkup), "user_id": str(user), "report_type": "pdf"}]
    [mail] = f.queued(db, "email_queue")
    assert mail["to"] == "mama@example.com"
    assert mail["template"] == "checkup_completed"
    assert mail["subject"] is None
    assert mail["locale"] == "ru"
    assert mail["variables"] == {"full_name": "Мария", "assessment_id": str(checkup)}
    [event] = f.queued(db, "analytics_queue")
    assert event["event"] == "checkup_completed"
    completed_at = db.execute("SELECT completed_at FROM public.assessments WHERE id = %s",
                              (checkup,)).fetchone()
    assert completed_at is not None
    assert completed_at[0] is not None


def test_only_the_transition_to_completed_fires(db: psycopg.Connection) -> None:
    user = f.profile(db)
    checkup = f.assessment(db, user, status="completed")  # inserted completed: fires once
    assert len(f.queued(db, "report_generation_queue")) == 1
    db.execute("UPDATE public.assessments SET status = 'completed', results = '{}' "
               "WHERE id = %s", (checkup,))
    other = f.assessment(db, user)
    db.execute("UPDATE public.assessments SET results = '{}' WHERE id = %s", (other,))
    db.execute("UPDATE public.assessments SET status = 'abandoned' WHERE id = %s", (other,))
    assert len(f.queued(db, "report_generation_queue")) == 1
    assert len(f.queued(db, "email_queue")) == 1


def test_new_appointment_queues_confirmation_in_the_profile_locale(
        db: psycopg.Connection) -> None:
    user = f.profile(db, email="dad@example.com", full_name="John Smith", locale="en")
    appointment = f.appointment(db, user, starts_in=timedelta(days=2), status="pending_payment",
                                duration_minutes=45, specialist_name="Dr. Brown")
    [mail] = f.queued(db, "email_queue")
    assert mail["template"] == "appointment_confirmation"
    assert mail["locale"] == "en"
    assert mail["to"] == "dad@example.com"
    variables = mail["variables"]
    assert variables["full_name"] == "John Smith"
    assert variables["specialist_name"] == "Dr. Brown"
    assert variables["duration_minutes"] == 45
    assert variables["appointment_id"] == str(appointment)
    assert variables["scheduled_at"]


def test_completed_payment_confirms_and_marks_the_consultation_paid(
        db: psycopg.Connection) -> None:
    user = f.profile(db)
    appointment = f.appointment(db, user, starts_in=timedelta(days=1), status="pending_payment")
    payment = f.payment(db, user, appointment)
    db.execute("DELETE FROM pgmq.q_email_queue")

    db.execute("UPDATE public.payments SET status = 'completed' WHERE id = %s", (payment,))

    status, paid_at = db.execute("SELECT status, paid_at FROM public.appointments WHERE id = %s",
                                 (appointment,)).fetchone() or (None, None)
    assert status == "scheduled"
    assert paid_at is not None
    [mail] = f.queued(db, "email_queue")
    assert mail["template"] == "payment_confirmation"
    assert mail["variables"]["amount"] == 3500.0
    assert mail["variables"]["currency"] == "RUB"
    assert mail["variables"]["appointment_id"] == str(appointment)
    assert mail["variables"]["scheduled_at"]


def test_failed_payment_sends_a_notice_and_leaves_the_consultation(
        db: psycopg.Connection) -> None:
    user = f.profile(db)
    appointment = f.appointment(db, user, starts_in=timedelta(days=1), status="pending_payment")
    payment = f.payment(db, user, appointment)
    db.execute("DELETE FROM pgmq.q_email_queue")

    db.execute("UPDATE public.payments SET status = 'failed' WHERE id = %s", (payment,))

    assert db.execute("SELECT status, paid_at FROM public.appointments WHERE id = %s",
                      (appointment,)).fetchone() == ("pending_payment", None)
    [mail] = f.queued(db, "email_queue")
    assert mail["template"] == "payment_failed"


def test_payment_update_without_status_change_fires_nothing(db: psycopg.Connection) -> None:
    user = f.profile(db)
    payment = f.payment(db, user, None, status="completed")
    db.execute("DELETE FROM pgmq.q_email_queue")
    db.execute("UPDATE public.payments SET status = 'completed', provider_payment_id = 'x' "
               "WHERE id = %s", (payment,))
    db.execute("UPDATE public.payments SET amount = 1 WHERE id = %s", (payment,))
    assert f.queued(db, "email_queue") == []


def test_trigger_work_is_rolled_back_with_the_app_change(db: psycopg.Connection) -> None:
    user = f.profile(db)
    db.execute("BEGIN")
    f.appointment(db, user, starts_in=timedelta(days=1))
    db.execute("ROLLBACK")
    assert f.queued(db, "email_queue") == []


def test_app_role_insert_fires_trigger_without_pgmq_rights(db: psycopg.Connection) -> None:
    """SECURITY DEFINER triggers: an API role that may insert need not touch pgmq."""
    user = f.profile(db)
    db.execute("GRANT INSERT ON public.appointments TO authenticated")
    db.execute("CREATE POLICY own_insert ON public.appointments FOR INSERT TO authenticated "
               "WITH CHECK (true)")
    with db.transaction():
        db.execute("SET LOCAL ROLE authenticated")
        db.execute("INSERT INTO public.appointments (user_id, specialist_name, scheduled_at) "
                   "VALUES (%s, 'Dr. X', now() + interval '2 days')", (user,))
    assert [m["template"] for m in f.queued(db, "email_queue")] == ["appointment_confirmation"]
