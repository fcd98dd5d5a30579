"""The functions pg_cron calls (030): statuses, abandoned checkups, reminders, pruning."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import psycopg

from tests import factories as f
from tests.harness import wait_until


def status_of(db: psycopg.Connection, appointment: object) -> str:
    row = db.execute("SELECT status FROM public.appointments WHERE id = %s",
                     (appointment,)).fetchone()
    assert row is not None
    return str(row[0])


def test_statuses_follow_the_clock_and_a_missed_run_catches_up(db: psycopg.Connection) -> None:
    user = f.profile(db)
    future = f.appointment(db, user, starts_in=timedelta(hours=2))
    running = f.appointment(db, user, starts_in=-timedelta(minutes=10), duration_minutes=50)
    ended_long_ago = f.appointment(db, user, starts_in=-timedelta(days=1))  # missed runs
    in_progress_done = f.appointment(db, user, starts_in=-timedelta(hours=2),
                                     status="in_progress")
    cancelled = f.appointment(db, user, starts_in=-timedelta(days=1), status="cancelled")
    unpaid = f.appointment(db, user, starts_in=-timedelta(days=1), status="pending_payment")

    started, completed = db.execute(
        "SELECT * FROM public.update_appointment_statuses()").fetchone() or (0, 0)

    assert (started, completed) == (1, 2)
    assert status_of(db, future) == "scheduled"
    assert status_of(db, running) == "in_progress"
    assert status_of(db, ended_long_ago) == "completed"
    assert status_of(db, in_progress_done) == "completed"
    assert status_of(db, cancelled) == "cancelled"
    assert status_of(db, unpaid) == "pending_payment"
    assert db.execute("SELECT * FROM public.update_appointment_statuses()").fetchone() == (0, 0)


def test_checkups_in_progress_for_over_30_days_are_abandoned(db: psycopg.Connection) -> None:
    user = f.profile(db)
    stale = f.assessment(db, user, age=timedelta(days=31))
    recent = f.assessment(db, user, age=timedelta(days=29))
    old_completed = f.assessment(db, user, status="completed", age=timedelta(days=90))
    assert db.execute("SELECT public.cleanup_old_assessments()").fetchone() == (1,)
    rows: dict[object, str] = dict(
        db.execute("SELECT id, status FROM public.assessments").fetchall())
    assert rows[stale] == "abandoned"
    assert rows[recent] == "in_progress"
    assert rows[old_completed] == "completed"


def reminders(db: psycopg.Connection) -> list[tuple[str, str]]:
    return [(m["template"], m["variables"]["appointment_id"])
            for m in f.queued(db, "email_queue")
            if m["template"].startswith("appointment_reminder")]


def test_reminders_are_queued_once_and_a_later_run_adds_none(db: psycopg.Connection) -> None:
    user = f.profile(db, locale="en")
    tomorrow = f.appointment(db, user, starts_in=timedelta(hours=23))
    soon = f.appointment(db, user, starts_in=timedelta(minutes=30))
    f.appointment(db, user, starts_in=timedelta(hours=30))  # too far for either
    f.appointment(db, user, starts_in=timedelta(hours=5), status="cancelled")
    f.appointment(db, user, starts_in=timedelta(minutes=20), status="cancelled")

    assert db.execute("SELECT * FROM public.send_appointment_reminders()").fetchone() == (1, 1)
    assert sorted(reminders(db)) == sorted([
        ("appointment_reminder_24h", str(tomorrow)), ("appointment_reminder_1h", str(soon))])
    # The next hourly run sends nothing again (overlapping runs: the next test).
    assert db.execute("SELECT * FROM public.send_appointment_reminders()").fetchone() == (0, 0)
    assert len(reminders(db)) == 2
    [mail] = [m for m in f.queued(db, "email_queue")
              if m["template"] == "appointment_reminder_24h"]
    assert mail["locale"] == "en"
    assert set(mail["variables"]) == {"full_name", "specialist_name", "scheduled_at",
                                      "duration_minutes", "appointment_id"}
    sent = db.execute("SELECT reminder_24h_sent_at, reminder_1h_sent_at FROM public.appointments "
                      "WHERE id = %s", (soon,)).fetchone()
    assert sent is not None
    assert sent[0] is None
    assert sent[1] is not None


def test_overlapping_reminder_runs_queue_each_reminder_exactly_once(
        database_url: str, db: psycopg.Connection) -> None:
    """Two runs at once (a slow hourly run still going when the next starts): the second
    waits on the first's row locks, then finds the reminders sent and queues none."""
    user = f.profile(db, locale="en")
    f.appointment(db, user, starts_in=timedelta(hours=23))
    f.appointment(db, user, starts_in=timedelta(minutes=30))
    with psycopg.connect(database_url) as first, \
            psycopg.connect(database_url, autocommit=True) as second:
        assert first.execute("SELECT * FROM public.send_appointment_reminders()"
                             ).fetchone() == (1, 1)  # not committed yet
        pid = second.info.backend_pid
        with ThreadPoolExecutor(1) as pool:
            overlapping = pool.submit(lambda: second.execute(
                "SELECT * FROM public.send_appointment_reminders()").fetchone())
            # The second run is really inside the function, blocked on the first's rows.
            wait_until(lambda: db.execute(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                (pid,)).fetchone() == (True,), what="the second run to wait on a row lock")
            assert not overlapping.done()
            first.commit()
            assert overlapping.result(timeout=60) == (0, 0)
    assert len(reminders(db)) == 2


def test_tomorrow_reminder_then_one_hour_reminder_later(db: psycopg.Connection) -> None:
    user = f.profile(db)
    appointment = f.appointment(db, user, starts_in=timedelta(hours=20))
    db.execute("SELECT public.send_appointment_reminders()")
    # Nineteen hours later the consultation is 50 minutes away.
    db.execute("UPDATE public.appointments SET scheduled_at = now() + interval '50 minutes' "
               "WHERE id = %s", (appointment,))
    assert db.execute("SELECT * FROM public.send_appointment_reminders()").fetchone() == (0, 1)
    assert [t for t, _ in reminders(db)] == ["appointment_reminder_24h",
                                            "appointment_reminder_1h"]


def test_prune_removes_only_old_archive_rows(db: psycopg.Connection) -> None:
    db.execute("SELECT public.enqueue('analytics_queue', '{\"event\": \"a\"}')")
    db.execute("SELECT public.enqueue('analytics_queue', '{\"event\": \"b\"}')")
    db.execute("SELECT pgmq.archive('analytics_queue', ARRAY[1, 2]::bigint[])")
    db.execute("UPDATE pgmq.a_analytics_queue SET archived_at = now() - interval '40 days' "
               "WHERE msg_id = 1")
    assert db.execute("SELECT public.prune_reactor_history()").fetchone() == (1,)
    assert [m["event"] for m in f.archived(db, "analytics_queue")] == ["b"]


# -- one family's bad data never stops a run for the others (migration 041) ------------------

def test_a_reminder_run_with_a_bad_profile_still_reminds_everyone_else(
        db: psycopg.Connection) -> None:
    good = [f.profile(db, email=f"parent{i}@example.com") for i in range(3)]
    bad = f.profile(db, email="user@@example.com")
    appointments = [f.appointment(db, user, starts_in=timedelta(hours=20))
                    for user in (good[0], bad, good[1], good[2])]
    soon_bad = f.appointment(db, bad, starts_in=timedelta(minutes=40))
    soon_good = f.appointment(db, good[0], starts_in=timedelta(minutes=45))
    db.execute("DELETE FROM pgmq.q_email_queue")  # the confirmations

    assert db.execute("SELECT * FROM public.send_appointment_reminders()").fetchone() == (3, 1)

    assert sorted(reminders(db)) == sorted(
        [("appointment_reminder_24h", str(a)) for a in appointments if a != appointments[1]]
        + [("appointment_reminder_1h", str(soon_good))])
    letters = f.queued(db, "email_queue_dlq")
    refused = sorted((letter["original"]["template"], letter["refused_by"])
                     for letter in letters if letter["original"]["template"].startswith(
                         "appointment_reminder"))
    assert refused == sorted([
        ("appointment_reminder_24h",
         f"send_appointment_reminders() for appointment {appointments[1]}"),
        ("appointment_reminder_1h", f"send_appointment_reminders() for appointment {soon_bad}")])
    # Claimed all the same: exactly once, not refused again every hour.
    assert db.execute("SELECT * FROM public.send_appointment_reminders()").fetchone() == (0, 0)
    assert len(f.queued(db, "email_queue_dlq")) == len(letters)


REFUSE_ONE_ROW = """
CREATE FUNCTION public.app_refuses_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id = %s THEN
        RAISE EXCEPTION 'the app refuses this row';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER app_refuses_row BEFORE UPDATE ON public.{table}
    FOR EACH ROW EXECUTE FUNCTION public.app_refuses_row();
"""


def test_a_row_the_app_refuses_holds_back_no_other_status_update(
        db: psycopg.Connection) -> None:
    """An app's own trigger refuses one consultation: the others still move, the refused
    one is recorded in reactor.refusals, and the run itself does not fail."""
    user = f.profile(db)
    stuck = f.appointment(db, user, starts_in=-timedelta(days=1))
    ended = f.appointment(db, user, starts_in=-timedelta(days=1))
    running = f.appointment(db, user, starts_in=-timedelta(minutes=10))
    db.execute(REFUSE_ONE_ROW.replace("{table}", "appointments").replace("%s", f"'{stuck}'"))

    assert db.execute("SELECT * FROM public.update_appointment_statuses()").fetchone() == (1, 1)

    assert status_of(db, stuck) == "scheduled"
    assert status_of(db, ended) == "completed"
    assert status_of(db, running) == "in_progress"
    [(source, reason)] = db.execute("SELECT source, reason FROM reactor.refusals").fetchall()
    assert source == f"update_appointment_statuses() for appointment {stuck}"
    assert "the app refuses this row" in reason


def test_a_checkup_the_app_refuses_holds_back_no_other_cleanup(db: psycopg.Connection) -> None:
    user = f.profile(db)
    stuck = f.assessment(db, user, age=timedelta(days=40))
    stale = f.assessment(db, user, age=timedelta(days=40))
    db.execute(REFUSE_ONE_ROW.replace("{table}", "assessments").replace("%s", f"'{stuck}'"))

    assert db.execute("SELECT public.cleanup_old_assessments()").fetchone() == (1,)

    rows: dict[object, str] = dict(
        db.execute("SELECT id, status FROM public.assessments").fetchall())
    assert rows == {stuck: "in_progress", stale: "abandoned"}
    assert db.execute("SELECT source FROM reactor.refusals").fetchall() == [
        (f"cleanup_old_assessments() for assessment {stuck}",)]


def test_a_far_future_consultation_holds_back_no_status_update(db: psycopg.Connection) -> None:
    """scheduled_at + duration would overflow near the end of the timestamp range."""
    user = f.profile(db)
    ended = f.appointment(db, user, starts_in=-timedelta(days=1))
    far = db.execute("INSERT INTO public.appointments (user_id, specialist_name, scheduled_at, "
                     "status) VALUES (%s, 'Dr', '294276-12-31 23:30:00+00', 'scheduled') "
                     "RETURNING id", (user,)).fetchone()
    assert far is not None
    assert db.execute("SELECT * FROM public.update_appointment_statuses()").fetchone() == (0, 1)
    assert status_of(db, ended) == "completed"
    assert status_of(db, far[0]) == "scheduled"


def test_a_reminder_the_app_refuses_holds_back_no_other_reminder(
        db: psycopg.Connection) -> None:
    user = f.profile(db)
    stuck = f.appointment(db, user, starts_in=timedelta(hours=20))
    other = f.appointment(db, user, starts_in=timedelta(hours=21))
    soon = f.appointment(db, user, starts_in=timedelta(minutes=30))
    db.execute(REFUSE_ONE_ROW.replace("{table}", "appointments").replace("%s", f"'{stuck}'"))

    assert db.execute("SELECT * FROM public.send_appointment_reminders()").fetchone() == (1, 1)

    assert sorted(reminders(db)) == sorted([("appointment_reminder_24h", str(other)),
                                            ("appointment_reminder_1h", str(soon))])
    [(source, reason)] = db.execute("SELECT source, reason FROM reactor.refusals").fetchall()
    assert source == f"send_appointment_reminders() for appointment {stuck}"
    assert "the app refuses this row" in reason


def _cron_waits_for_the_apps_commit(database_url: str, app_sql: str, row: object,
                                    cron_sql: str) -> None:
    """The app holds an uncommitted change of `row`; the cron run (on its row-by-row
    path) waits for that row's lock; then the app commits."""
    with psycopg.connect(database_url) as app, \
            psycopg.connect(database_url, autocommit=True) as cron, \
            psycopg.connect(database_url, autocommit=True) as monitor, \
            ThreadPoolExecutor(1) as pool:
        app.execute(app_sql, (row,))
        pid = cron.info.backend_pid
        running = pool.submit(lambda: cron.execute(cron_sql).fetchone())
        wait_until(lambda: monitor.execute(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
            (pid,)).fetchone() == (True,), what="the cron run to wait on the app's row")
        app.commit()
        running.result(timeout=60)


def test_the_row_by_row_path_leaves_a_cancellation_made_meanwhile(
        database_url: str, db: psycopg.Connection) -> None:
    user = f.profile(db)
    refused = f.appointment(db, user, starts_in=-timedelta(days=2))
    cancelled = f.appointment(db, user, starts_in=-timedelta(days=1))
    db.execute(REFUSE_ONE_ROW.replace("{table}", "appointments").replace("%s", f"'{refused}'"))
    _cron_waits_for_the_apps_commit(
        database_url, "UPDATE public.appointments SET status = 'cancelled' WHERE id = %s",
        cancelled, "SELECT * FROM public.update_appointment_statuses()")
    assert status_of(db, cancelled) == "cancelled"


def test_the_row_by_row_path_leaves_a_checkup_completed_meanwhile(
        database_url: str, db: psycopg.Connection) -> None:
    user = f.profile(db)
    refused = f.assessment(db, user, age=timedelta(days=41))
    completed = f.assessment(db, user, age=timedelta(days=40))
    db.execute(REFUSE_ONE_ROW.replace("{table}", "assessments").replace("%s", f"'{refused}'"))
    _cron_waits_for_the_apps_commit(
        database_url, "UPDATE public.assessments SET status = 'completed' WHERE id = %s",
        completed, "SELECT public.cleanup_old_assessments()")
    assert db.execute("SELECT status FROM public.assessments WHERE id = %s",
                      (completed,)).fetchone() == ("completed",)
