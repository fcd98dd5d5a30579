"""Database webhooks (032): what each app change puts on the queues."""

from __future__ import annotations

import uuid
from datetime import timedelta

import psycopg
import pytest

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


def book_as_an_api_role(db: psycopg.Connection, user: uuid.UUID) -> None:
    """A booking as supabase-js makes it: an INSERT by `authenticated`, allowed by RLS."""
    db.execute("GRANT INSERT ON public.appointments TO authenticated")
    db.execute("CREATE POLICY own_insert ON public.appointments FOR INSERT TO authenticated "
               "WITH CHECK (true)")
    with db.transaction():
        db.execute("SET LOCAL ROLE authenticated")
        db.execute("INSERT INTO public.appointments (user_id, specialist_name, scheduled_at) "
                   "VALUES (%s, 'Dr. X', now() + interval '2 days')", (user,))


def test_app_role_insert_fires_trigger_without_pgmq_rights(db: psycopg.Connection) -> None:
    """SECURITY DEFINER triggers: an API role that may insert need not touch pgmq."""
    book_as_an_api_role(db, f.profile(db))
    assert [m["template"] for m in f.queued(db, "email_queue")] == ["appointment_confirmation"]


# -- the app's write never fails because of the worker's side (migration 041) ----------------

# Profiles whose address the mail side cannot use (two @, a list, not an address, empty,
# 300 characters): the family's own writes commit all the same. (Internationalized
# addresses are mail like any other since 044: test_a_profile_on_an_idn_address_...)
UNSENDABLE = ["user@@example.com", "anna@example.com, bob@example.com", "not an address", "",
              "a" * 288 + "@example.com"]


def dead_letters(conn: psycopg.Connection, queue: str) -> list[dict[str, object]]:
    return f.queued(conn, f"{queue}_dlq")


def refused(conn: psycopg.Connection, queue: str, address: str) -> dict[str, object]:
    """The one dead letter of `queue` refused at enqueue for `address`."""
    [letter] = dead_letters(conn, queue)
    assert letter["attempts"] == 0
    assert letter["source_msg_id"] is None
    assert letter["queue"] == queue
    assert letter["error"] == 'refused at enqueue: "to" is not a valid email address'
    assert isinstance(letter["original"], dict)
    assert letter["original"]["to"] == address
    return letter


@pytest.mark.parametrize("address", UNSENDABLE)
def test_a_booking_commits_whatever_the_families_address(
        db: psycopg.Connection, address: str) -> None:
    user = f.profile(db, email=address)
    appointment = f.appointment(db, user, starts_in=timedelta(days=2))

    assert db.execute("SELECT count(*) FROM public.appointments WHERE id = %s",
                      (appointment,)).fetchone() == (1,)
    assert f.queued(db, "email_queue") == []
    letter = refused(db, "email_queue", address)
    assert letter["refused_by"] == f"handle_new_appointment() for appointment {appointment}"
    assert letter["original"]["template"] == "appointment_confirmation"  # type: ignore[index]
    # The rest of the trigger's work is queued as usual.
    assert [e["event"] for e in f.queued(db, "analytics_queue")] == ["appointment_created"]


@pytest.mark.parametrize("address", UNSENDABLE)
def test_a_checkup_completes_whatever_the_families_address(
        db: psycopg.Connection, address: str) -> None:
    user = f.profile(db, email=address)
    checkup = f.assessment(db, user)

    db.execute("UPDATE public.assessments SET status = 'completed' WHERE id = %s", (checkup,))

    assert db.execute("SELECT status FROM public.assessments WHERE id = %s",
                      (checkup,)).fetchone() == ("completed",)
    refused(db, "email_queue", address)
    assert [r["assessment_id"] for r in f.queued(db, "report_generation_queue")] == [str(checkup)]
    assert [e["event"] for e in f.queued(db, "analytics_queue")] == ["checkup_completed"]


@pytest.mark.parametrize("address", UNSENDABLE)
@pytest.mark.parametrize("outcome", ["completed", "failed"])
def test_a_payment_is_recorded_whatever_the_families_address(
        db: psycopg.Connection, address: str, outcome: str) -> None:
    user = f.profile(db, email=address)
    appointment = f.appointment(db, user, starts_in=timedelta(days=1), status="pending_payment")
    payment = f.payment(db, user, appointment)
    db.execute("DELETE FROM pgmq.q_email_queue_dlq")

    db.execute("UPDATE public.payments SET status = %s WHERE id = %s", (outcome, payment))

    assert db.execute("SELECT status FROM public.payments WHERE id = %s",
                      (payment,)).fetchone() == (outcome,)
    expected = ("scheduled", True) if outcome == "completed" else ("pending_payment", False)
    assert db.execute("SELECT status, paid_at IS NOT NULL FROM public.appointments WHERE id = %s",
                      (appointment,)).fetchone() == expected
    letter = refused(db, "email_queue", address)
    assert letter["original"]["template"] == f"payment_{outcome}".replace(  # type: ignore[index]
        "payment_completed", "payment_confirmation")


def test_a_locale_the_templates_lack_means_the_default_not_a_failed_booking(
        db: psycopg.Connection) -> None:
    """A real app's profiles may allow any locale: the mail goes out in the default one."""
    db.execute("ALTER TABLE public.profiles DROP CONSTRAINT profiles_locale_check")
    user = f.profile(db, locale="de")
    f.appointment(db, user, starts_in=timedelta(days=2))
    [mail] = f.queued(db, "email_queue")
    assert mail["locale"] == "ru"
    assert dead_letters(db, "email_queue") == []


def test_a_profile_without_address_or_row_is_refused_and_recorded(
        db: psycopg.Connection) -> None:
    """Incomplete profiles, as a real app's schema may allow them."""
    db.execute("ALTER TABLE public.profiles ALTER COLUMN email DROP NOT NULL")
    db.execute("ALTER TABLE public.appointments DROP CONSTRAINT appointments_user_id_fkey")
    no_email = db.execute("INSERT INTO public.profiles (email) VALUES (NULL) RETURNING id"
                          ).fetchone()
    assert no_email is not None
    f.appointment(db, no_email[0], starts_in=timedelta(days=2))
    nobody = f.appointment(db, uuid.uuid4(), starts_in=timedelta(days=3))

    letters = dead_letters(db, "email_queue")
    assert [letter["error"] for letter in letters] == [
        'refused at enqueue: "to" is not a valid email address',
        "refused at enqueue: no profile for this user"]
    assert letters[1]["refused_by"] == f"handle_new_appointment() for appointment {nobody}"
    assert db.execute("SELECT count(*) FROM public.appointments").fetchone() == (2,)


def test_a_message_over_the_size_limit_is_dead_lettered_cut_short(
        db: psycopg.Connection) -> None:
    user = f.profile(db, full_name="Я" * 200_000)  # 400 KB of variables: over 256 KiB
    f.appointment(db, user, starts_in=timedelta(days=2))
    [letter] = dead_letters(db, "email_queue")
    assert str(letter["error"]).startswith("refused at enqueue: message is ")
    assert "more than the limit of 262144 bytes" in str(letter["error"])
    assert letter["original"] is None
    assert len(str(letter["original_text"])) == 2000


def test_a_queue_that_does_not_exist_refuses_into_reactor_refusals(
        db: psycopg.Connection) -> None:
    """Both the queue and its dead-letter queue dropped: the booking still commits, and
    the refusal is a row of reactor.refusals."""
    db.execute("SELECT pgmq.drop_queue('analytics_queue')")
    user = f.profile(db)
    f.appointment(db, user, starts_in=timedelta(days=2))
    [letter] = dead_letters(db, "analytics_queue")
    assert letter["error"] == 'refused at enqueue: queue "analytics_queue" does not exist in pgmq'

    db.execute("SELECT pgmq.drop_queue('analytics_queue_dlq')")
    appointment = f.appointment(db, user, starts_in=timedelta(days=3))
    assert db.execute("SELECT source, queue, reason FROM reactor.refusals").fetchall() == [
        (f"handle_new_appointment() for appointment {appointment}", "analytics_queue",
         'queue "analytics_queue" does not exist in pgmq')]
    assert len(f.queued(db, "email_queue")) == 2  # the mails went out all the same


def test_a_refused_mail_is_listed_and_replayed_like_any_dead_letter(
        db: psycopg.Connection) -> None:
    """The operator's tools see it: `reactor dlq` reads it, and a replay puts it back on
    email_queue as it is (where the reactor judges it again)."""
    from reactor.engine import dead_letters as actions
    from reactor.engine.queues import peek
    user = f.profile(db, email="not an address")
    f.appointment(db, user, starts_in=timedelta(days=2))
    [letter] = peek(db, "email_queue_dlq")
    assert isinstance(letter.body, dict)
    assert letter.body["queue"] == "email_queue"
    assert actions.replay(db, actions.Selection("email_queue"), client="test").new_msg_ids
    assert [m["template"] for m in f.queued(db, "email_queue")] == ["appointment_confirmation"]
    assert dead_letters(db, "email_queue") == []


def test_a_checkup_with_infinite_times_still_completes(db: psycopg.Connection) -> None:
    """±infinity is a valid timestamptz: the duration is then unknown, not an error."""
    user = f.profile(db)
    checkup = f.assessment(db, user)
    db.execute("UPDATE public.assessments SET status = 'completed', completed_at = 'infinity' "
               "WHERE id = %s", (checkup,))
    db.execute("INSERT INTO public.assessments (user_id, status, created_at) "
               "VALUES (%s, 'completed', '-infinity')", (user,))
    assert len(f.queued(db, "report_generation_queue")) == 2
    assert [e["properties"]["duration_s"] for e in f.queued(db, "analytics_queue")] == [
        None, None]


def test_an_api_role_booking_commits_with_the_queues_gone(db: psycopg.Connection) -> None:
    """SECURITY DEFINER: the refusal is recorded for an `authenticated` insert too."""
    db.execute("SELECT pgmq.drop_queue('email_queue_dlq')")
    db.execute("SELECT pgmq.drop_queue('email_queue')")
    book_as_an_api_role(db, f.profile(db, email="not an address"))
    assert db.execute("SELECT queue, reason FROM reactor.refusals").fetchall() == [
        ("email_queue", '"to" is not a valid email address')]
