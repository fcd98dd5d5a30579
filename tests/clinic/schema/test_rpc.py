"""RPC wrappers (033): service_role only, known queues only, hardened definitions."""

from __future__ import annotations

import psycopg
import pytest

WRAPPERS = {
    "pgmq_send": "SELECT public.pgmq_send('analytics_queue', '{\"event\": \"rpc\"}')",
    "pgmq_read": "SELECT * FROM public.pgmq_read('analytics_queue', 30, 5)",
    "pgmq_archive": "SELECT public.pgmq_archive('analytics_queue', 1)",
    "pgmq_delete": "SELECT public.pgmq_delete('analytics_queue', 1)",
    "pgmq_metrics": "SELECT * FROM public.pgmq_metrics('analytics_queue')",
}


@pytest.mark.parametrize("role", ["anon", "authenticated"])
@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_api_roles_cannot_call_wrappers(db: psycopg.Connection, role: str, wrapper: str) -> None:
    with db.transaction():
        db.execute(f"SET LOCAL ROLE {role}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            db.execute(WRAPPERS[wrapper])


@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_api_roles_cannot_enqueue_directly(db: psycopg.Connection, role: str) -> None:
    with db.transaction():
        db.execute(f"SET LOCAL ROLE {role}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            db.execute("SELECT public.enqueue('analytics_queue', '{}')")


CRON_CALLS = {
    "update_appointment_statuses": "SELECT * FROM public.update_appointment_statuses()",
    "send_appointment_reminders": "SELECT * FROM public.send_appointment_reminders()",
    "cleanup_old_assessments": "SELECT public.cleanup_old_assessments()",
    "prune_reactor_history": "SELECT public.prune_reactor_history()",
    "schedule_reactor_cron_jobs": "SELECT public.schedule_reactor_cron_jobs()",
}
TRIGGER_FUNCTIONS = ["handle_completed_checkup()", "handle_new_appointment()",
                     "handle_payment_status_change()"]


@pytest.mark.parametrize("role", ["anon", "authenticated"])
@pytest.mark.parametrize("function", sorted(CRON_CALLS))
def test_api_roles_cannot_run_the_cron_functions(db: psycopg.Connection, role: str,
                                                 function: str) -> None:
    """REVOKE ... FROM PUBLIC, anon, authenticated (030): a browser cannot send every
    reminder or abandon checkups through PostgREST's /rpc."""
    with db.transaction():
        db.execute(f"SET LOCAL ROLE {role}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            db.execute(CRON_CALLS[function])


@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_api_roles_hold_no_execute_on_the_trigger_functions(db: psycopg.Connection,
                                                            role: str) -> None:
    """REVOKE (032): the triggers still fire for them (test_triggers), the functions
    themselves are not theirs to execute."""
    for function in TRIGGER_FUNCTIONS:
        row = db.execute("SELECT has_function_privilege(%s, %s, 'EXECUTE')",
                         (role, f"public.{function}")).fetchone()
        assert row == (False,), function


def test_service_role_round_trip(database_url: str, db: psycopg.Connection) -> None:
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN reactor_wakeup")
        with db.transaction():
            db.execute("SET LOCAL ROLE service_role")
            msg_id = db.execute(WRAPPERS["pgmq_send"]).fetchone()
        assert [n.payload for n in listener.notifies(timeout=0.5)] == ["analytics_queue"]
    assert msg_id is not None
    with db.transaction():
        db.execute("SET LOCAL ROLE service_role")
        metrics = db.execute(
            "SELECT queue_name, queue_length, newest_msg_age_sec, oldest_msg_age_sec, "
            "total_messages FROM public.pgmq_metrics('analytics_queue')").fetchone()
        assert metrics is not None
        assert metrics[:2] == ("analytics_queue", 1)
        [read] = db.execute(WRAPPERS["pgmq_read"]).fetchall()
        assert read[0] == msg_id[0]
        assert read[4] == {"event": "rpc"}
        assert db.execute("SELECT public.pgmq_archive('analytics_queue', %s)",
                          (msg_id[0],)).fetchone() == (True,)
        assert db.execute("SELECT public.pgmq_delete('analytics_queue', %s)",
                          (msg_id[0],)).fetchone() == (False,)


def test_wrappers_refuse_unknown_queues(db: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match='unknown queue "secret"'):
        db.execute("SELECT public.pgmq_send('secret', '{}')")
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        db.execute("SELECT * FROM public.pgmq_read('email_queue_x', 1, 1)")
    # Dead-letter queues can be inspected, not written.
    db.execute("SELECT * FROM public.pgmq_metrics('email_queue_dlq')")
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        db.execute("SELECT public.pgmq_send('email_queue_dlq', '{}')")


def test_wrappers_are_security_definer_with_empty_search_path(db: psycopg.Connection) -> None:
    rows = db.execute(
        "SELECT proname, prosecdef, proconfig FROM pg_proc "
        "WHERE pronamespace = 'public'::regnamespace AND proname = ANY(%s)",
        (list(WRAPPERS),)).fetchall()
    assert {r[0] for r in rows} == set(WRAPPERS)
    for name, secdef, config in rows:
        assert secdef, name
        assert config == ['search_path=""'], (name, config)
