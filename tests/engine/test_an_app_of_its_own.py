"""Queues are data: an app that exists only in this test declares a queue, its own
migration creates and registers it, and the engine drains it, with no edit to the
engine. Also the CLI's --app, on the same app."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import ClassVar

import psycopg
import pytest
import trio

from reactor.engine.app import App, Queue
from reactor.engine.commands import Command, with_db
from reactor.engine.migrate import migrate
from reactor.engine.processor import Job, MessageModel, Processor
from reactor.engine.runtime import Reactor, SchemaNotReady
from reactor.engine.settings import ConfigError, EngineSettings, load_settings
from reactor.testing import enqueue, eventually, of_type, sql, wait_for_event, wait_until
from tests.harness import CHECKOUT

# The greeter's own migration line (its one queue registered there).
GREETER_MIGRATIONS = Path(__file__).parent / "greeter_migrations"
MIGRATION = (GREETER_MIGRATIONS / "001_greetings.sql").read_text()


class Greeting(MessageModel):
    name: str


class GreetingProcessor(Processor[Greeting]):
    """Records each greeting once, keyed by name (an idempotent effect)."""

    model = Greeting
    seen: ClassVar[list[str]] = []

    async def handle(self, job: Job[Greeting]) -> None:
        GreetingProcessor.seen.append(self.queue)
        await self.db.run(lambda c: c.execute(
            "INSERT INTO public.greetings VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (job.message.name, job.msg_id)))


def _count_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True)


def count_greetings(args: argparse.Namespace, app: App) -> int:
    """`reactor greetings --name N`: the app's own command, on the app's own database."""
    [(count,)] = with_db(app.settings, lambda c: c.execute(
        "SELECT count(*) FROM public.greetings WHERE name = %s", (args.name,)).fetchall())
    print(f"{args.name}: {count}")
    return 0


def greeter(migrations: Path, url: str) -> App:
    settings = load_settings(EngineSettings, _env_file=None, DATABASE_URL=url,
                             FEED_PORT=0, METRICS_PORT=0, LOG_LEVEL="warning",
                             WORKER_INTERVAL_MS=60_000)
    return App(name="greeter", settings=settings, migrations=migrations,
               queues=(Queue("greeting_queue", GreetingProcessor),),
               commands=(Command("greetings", "how often a name was greeted",
                                 _count_arguments, count_greetings),))


def build(settings: EngineSettings | None = None) -> App:
    """The factory `reactor --app` and reactor.testing load: its settings from the
    environment, on first use, like any app's."""
    return App(name="greeter", settings=settings or EngineSettings, migrations=GREETER_MIGRATIONS,
               queues=(Queue("greeting_queue", GreetingProcessor),),
               commands=(Command("greetings", "how often a name was greeted",
                                 _count_arguments, count_greetings),))


@pytest.fixture(scope="session")
def reactor_app_path() -> str:
    """reactor.testing's fixtures in this module are about the greeter."""
    return "tests.engine.test_an_app_of_its_own:build"


async def test_the_pytest_plugin_migrates_runs_and_waits_for_an_apps_jobs(
        running_reactor: Reactor, reactor_database: str) -> None:
    """reactor.testing (the plugin the wheel ships): a database migrated for the app, the
    app running in the test's nursery, enqueue and wait for the job's event."""
    with running_reactor.bus.subscribe() as sub:
        msg_id = await enqueue(reactor_database, "greeting_queue", {"name": "Vera"})
        [event] = await wait_for_event(sub, of_type("job.succeeded", msg_id))
    assert event["queue"] == "greeting_queue"
    assert await sql(reactor_database, "SELECT name, greeted_by FROM public.greetings") == [
        ("Vera", msg_id)]


async def test_a_queue_declared_only_here_is_migrated_and_drained(
        empty_database_url: str, tmp_path: Path) -> None:
    GreetingProcessor.seen.clear()  # other tests here run the greeter too
    (tmp_path / "001_greetings.sql").write_text(MIGRATION)
    report = migrate(empty_database_url, tmp_path)
    assert report.applied[:5] == ["engine_001_queue_registry", "engine_002_prune_history",
                                  "engine_003_dead_letter_actions", "engine_004_queue_waits",
                                  "001_greetings"]
    app = greeter(tmp_path, empty_database_url)

    reactor = Reactor(app)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(reactor.run, handle_signals=False))
        await sql(empty_database_url, "SELECT public.enqueue('greeting_queue', %s)",
                  (json.dumps({"name": "Anna"}),))
        await eventually(lambda: sql(empty_database_url, "SELECT 1 FROM public.greetings"))
        reactor.stop()
    assert GreetingProcessor.seen == ["greeting_queue"]
    assert await sql(empty_database_url, "SELECT name FROM public.greetings") == [("Anna",)]
    # The engine's SQL knows the queue from the registry, and no other.
    assert await sql(empty_database_url, "SELECT reactor.queue_names()") == [
        (["greeting_queue"],)]


def test_the_engine_prunes_an_apps_history_with_no_clinic_in_the_database(
        reactor_database: str) -> None:
    """reactor.prune_history (the engine's line) forgets old archive rows and failure
    bookkeeping of any app's queues; the clinic's prune_reactor_history is built on it."""
    with psycopg.connect(reactor_database, autocommit=True) as db:
        for name in ("old", "new"):
            db.execute("SELECT public.enqueue('greeting_queue', %s)",
                       (json.dumps({"name": name}),))
        db.execute("SELECT pgmq.archive('greeting_queue', ARRAY[1, 2]::bigint[])")
        db.execute("UPDATE pgmq.a_greeting_queue SET archived_at = now() - interval '40 days'"
                   " WHERE msg_id = 1")
        db.execute("SELECT pgmq.create('someone_elses_queue')")  # not the engine's to prune
        db.execute("SELECT pgmq.send('someone_elses_queue', '{}')")
        db.execute("SELECT pgmq.archive('someone_elses_queue', 1::bigint)")
        db.execute("UPDATE pgmq.a_someone_elses_queue SET archived_at = now() - interval "
                   "'40 days'")
        db.execute("INSERT INTO reactor.job_failures (queue, msg_id, enqueued_at, updated_at)"
                   " VALUES ('greeting_queue', 1, now(), now() - interval '40 days')")
        assert db.execute("SELECT reactor.prune_history()").fetchone() == (2,)
        assert db.execute("SELECT message->>'name' FROM pgmq.a_greeting_queue").fetchall() \
            == [("new",)]
        assert db.execute("SELECT count(*) FROM pgmq.a_someone_elses_queue").fetchone() == (1,)
        assert db.execute("SELECT to_regprocedure('public.prune_reactor_history(interval)')"
                          ).fetchone() == (None,)


def test_the_cli_runs_another_app_by_name(empty_database_url: str, tmp_path: Path) -> None:
    """`reactor migrate|enqueue|status --app module:factory` on the test's own app, and
    the command the app declares (the clinic's `email` and `dev` are not there)."""
    env = {**os.environ, "DATABASE_URL": empty_database_url, "PYTHONPATH": str(CHECKOUT)}
    app = "tests.engine.test_an_app_of_its_own:build"

    def reactor(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "reactor", *args, "--app", app],
                              env=env, capture_output=True, text=True, timeout=120,
                              check=False, cwd=tmp_path)

    migrated = reactor("migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert "applied 001_greetings" in migrated.stdout
    enqueued = reactor("enqueue", "greeting_queue", '{"name": "Boris"}')
    assert enqueued.returncode == 0, enqueued.stderr
    unknown = reactor("enqueue", "email_queue", "{}")
    assert unknown.returncode == 1
    assert "unknown queue 'email_queue': use one of greeting_queue" in unknown.stderr
    status = reactor("status", "--json")
    assert [q["queue"] for q in json.loads(status.stdout)["queues"]] == ["greeting_queue"]
    with psycopg.connect(empty_database_url) as conn:
        wait_until(lambda: conn.execute(
            "SELECT count(*) FROM pgmq.q_greeting_queue").fetchone() == (1,))
        conn.execute("INSERT INTO public.greetings VALUES ('Boris', 1)")
        conn.commit()
    own = reactor("greetings", "--name", "Boris")
    assert (own.returncode, own.stdout) == (0, "Boris: 1\n"), own.stderr
    clinics = reactor("email", "stuck")
    assert clinics.returncode == 2
    assert "invalid choice: 'email'" in clinics.stderr


@pytest.mark.parametrize("name", [
    "x; DROP TABLE reactor.queues", "Email", "a" * 45, "email_queue_dlq", "", "bad-name"])
def test_a_name_that_cannot_be_a_queue_is_refused_at_registration(
        db: psycopg.Connection, name: str) -> None:
    """register_queue composes the name into pgmq's table names: only [a-z0-9_], at most 44,
    and never a dead-letter queue's; the registry is unchanged."""
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="cannot be a queue name"):
        db.execute("SELECT reactor.register_queue(%s)", (name,))
    assert db.execute("SELECT count(*) FROM reactor.queues").fetchone() == (4,)


def test_a_registered_queue_whose_table_is_gone_refuses_enqueue_clearly(
        db: psycopg.Connection) -> None:
    """The registry names it, pgmq lost it (dropped by hand): public.enqueue says so, and
    registering it again brings it back."""
    db.execute("SELECT pgmq.drop_queue('analytics_queue')")
    with pytest.raises(psycopg.Error, match="analytics_queue"):
        db.execute("SELECT public.enqueue('analytics_queue', '{}')")
    db.execute("SELECT reactor.register_queue('analytics_queue')")
    assert db.execute("SELECT public.enqueue('analytics_queue', '{}')").fetchone() == (1,)


def test_status_leaves_out_a_queue_whose_tables_were_dropped(db: psycopg.Connection) -> None:
    """The others are still shown (reactor status, /api/overview); the drainer of the
    missing one reports it on /healthz."""
    from reactor.engine.status import queue_status

    db.execute("SELECT pgmq.drop_queue('analytics_queue')")
    assert [q.queue for q in queue_status(db)] == [
        "email_queue", "payment_processing_queue", "report_generation_queue"]


def test_an_empty_registry_says_how_to_register_a_queue(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as db:
        db.execute("DELETE FROM reactor.queues")
        with pytest.raises(psycopg.errors.InvalidParameterValue) as refused:
            db.execute("SELECT public.enqueue('email_queue', '{}')")
    assert refused.value.diag.message_hint is not None
    assert "reactor.register_queue" in refused.value.diag.message_hint
    status = subprocess.run([sys.executable, "-m", "reactor", "status", "--json"],
                            env={**os.environ, "DATABASE_URL": database_url},
                            capture_output=True, text=True, timeout=120, check=False)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["queues"] == []


async def test_a_declared_queue_the_database_lacks_stops_run_naming_the_fix(
        empty_database_url: str, tmp_path: Path) -> None:
    (tmp_path / "001_greetings.sql").write_text(MIGRATION)
    migrate(empty_database_url, tmp_path)
    app = greeter(tmp_path, empty_database_url)
    ghost = App(name="greeter", settings=app.settings, migrations=tmp_path,
                queues=(Queue("ghost_queue", GreetingProcessor),))
    with pytest.RaisesGroup(pytest.RaisesExc(
            SchemaNotReady, match=r"drains ghost_queue, which the database has not registered: "
                                  r"add SELECT reactor.register_queue\('ghost_queue'\)"),
                            flatten_subgroups=True):
        await Reactor(ghost).run(handle_signals=False)


@pytest.mark.parametrize("name", ["Greeting-Queue", "greeting_queue_dlq", "a" * 44])
def test_an_app_that_declares_an_impossible_queue_name_is_refused(
        tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="cannot be a queue's name"):
        App(name="x", settings=greeter(tmp_path, "postgresql://u@h/db").settings,
            migrations=tmp_path, queues=(Queue(name, GreetingProcessor),))
