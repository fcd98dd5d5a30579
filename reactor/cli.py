"""The `reactor` command line.

Every error a user can cause ends in one line on stderr that names the fix:
exit code 2 for configuration, 1 for everything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import psycopg
import trio

from reactor import queues
from reactor.config import QUEUES, ConfigError, Settings, load_settings
from reactor.db import connect_sync, describe_db_error
from reactor.logs import configure_logging, mask_emails_in
from reactor.migrate import MigrationError, migrate

__all__ = ["main"]


class CliError(Exception):
    """A user-facing failure: `str()` is the one line shown, `code` the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise CliError(str(exc), 2) from None


def _with_db(settings: Settings, fn: Callable[[psycopg.Connection], Any]) -> Any:
    try:
        with connect_sync(settings.database_url, "reactor cli") as conn:
            return fn(conn)
    except psycopg.OperationalError as exc:
        raise CliError(f"cannot reach the database: {describe_db_error(exc)} "
                       "(check DATABASE_URL and that Postgres is running)") from None


# -- commands ------------------------------------------------------------------------
def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings()
    try:
        report = migrate(settings.database_url)
    except MigrationError as exc:
        raise CliError(str(exc)) from None
    except psycopg.OperationalError as exc:
        raise CliError(f"cannot reach the database: {describe_db_error(exc)} "
                       "(check DATABASE_URL and that Postgres is running)") from None
    except psycopg.Error as exc:
        raise CliError(f"migration failed and was rolled back: {describe_db_error(exc)}") from None
    for name in report.applied:
        print(f"applied {name}")
    print(f"pgmq: {report.pgmq}; {len(report.applied)} applied, "
          f"{report.already_applied} already applied")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from reactor.core.app import Reactor, SchemaNotReady

    settings = _settings()
    configure_logging(settings.log_level, settings.log_format_effective)
    try:
        reactor = Reactor(settings)
    except ConfigError as exc:
        raise CliError(str(exc), 2) from None
    try:
        trio.run(reactor.run)
    except* SchemaNotReady as group:
        raise CliError(str(group.exceptions[0]), 2) from None
    return 0


def cmd_enqueue(args: argparse.Namespace) -> int:
    settings = _settings()
    queue = _queue(args.queue)
    try:
        message = json.loads(args.json)
    except json.JSONDecodeError as exc:
        raise CliError(f"JSON is not valid: {exc}") from None
    if not isinstance(message, dict):
        raise CliError("JSON must be an object, e.g. '{\"event\": \"signup\"}'")
    msg_id = _with_db(settings, lambda c: queues.enqueue(c, queue, message, args.delay))
    print(msg_id)
    return 0


def cmd_dlq(args: argparse.Namespace) -> int:
    settings = _settings()
    queue = _queue(args.queue)
    if args.action == "list":
        letters = _with_db(settings, lambda c: queues.peek(c, queues.dlq_name(queue),
                                                           limit=args.limit))
        if args.json:
            for m in letters:
                print(json.dumps({"msg_id": m.msg_id, "enqueued_at": m.enqueued_at.isoformat(),
                                  **(m.body if isinstance(m.body, dict) else {"body": m.body})},
                                 ensure_ascii=False, default=str))
            return 0
        if not letters:
            print(f"no dead letters in {queue}")
        for m in letters:
            body = m.body if isinstance(m.body, dict) else {}
            print(f"{m.msg_id:>8}  {m.enqueued_at:%Y-%m-%d %H:%M:%S}  "
                  f"attempts={body.get('attempts')}  source={body.get('source_msg_id')}  "
                  f"{mask_emails_in(str(body.get('error')))}")
        return 0
    if args.action == "replay":
        ids = _with_db(settings, lambda c: queues.replay_dead_letters(c, queue, args.id))
        print(f"replayed {len(ids)} message(s) onto {queue}")
        return 0
    if not args.yes:
        raise CliError(f"purge deletes every dead letter of {queue}: add --yes to confirm")
    count = _with_db(settings, lambda c: queues.purge_dead_letters(c, queue))
    print(f"purged {count} dead letter(s) of {queue}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from reactor.status import cron_status, queue_status

    settings = _settings()
    queue_rows, cron = _with_db(settings, lambda c: (queue_status(c), cron_status(c)))
    if args.json:
        print(json.dumps({"queues": [q.as_dict() for q in queue_rows],
                          "cron": None if cron is None else [j.as_dict() for j in cron]}))
        return 0
    print(f"{'queue':<26} {'depth':>7} {'oldest':>8} {'done 1h':>8} {'dead':>6}")
    for q in queue_rows:
        oldest = f"{q.oldest_age_s}s" if q.oldest_age_s is not None else "-"
        print(f"{q.queue:<26} {q.depth:>7} {oldest:>8} {q.processed_last_hour:>8} "
              f"{q.dead_letters:>6}")
    print()
    if cron is None:
        print("cron: pg_cron is not installed in this database (see docs/operations.md)")
        return 0
    print(f"{'cron job':<30} {'schedule':<13} {'last run':<20} {'status':<10} {'failed 24h':>10}")
    for j in cron:
        last = j.last_run.strftime("%Y-%m-%d %H:%M:%S") if j.last_run else "never"
        state = j.last_status or "-"
        if not j.active:
            state += " (inactive)"
        print(f"{j.name:<30} {j.schedule:<13} {last:<20} {state:<10} {j.failures_last_day:>10}")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from reactor.config import load_feed_client_settings
    from reactor.watch import feed_url, run_watch

    try:
        feed = load_feed_client_settings()
    except ConfigError as exc:
        raise CliError(str(exc), 2) from None
    token = args.token or (feed.feed_token.get_secret_value() if feed.feed_token else None)
    url = feed_url(args.host or feed.feed_host, args.port or feed.feed_port, queue=args.queue,
                   type_prefix=args.type, replay=args.replay, token=token)
    return run_watch(url, args.json)


def cmd_dev(args: argparse.Namespace) -> int:
    from reactor.devstack import run_dev

    return run_dev(Path(args.dir), args.reset)


def _queue(name: str) -> str:
    if name not in QUEUES:
        raise CliError(f"unknown queue {name!r}: use one of {', '.join(QUEUES)}")
    return name


# -- parser --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reactor",
        description="Event-driven worker for pgmq queues, pg_cron jobs and database webhooks.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("migrate", help="apply pending migrations (idempotent)").set_defaults(
        func=cmd_migrate)
    sub.add_parser("run", help="run the reactor until SIGTERM/SIGINT").set_defaults(func=cmd_run)

    enqueue = sub.add_parser("enqueue", help="put a JSON message on a queue")
    enqueue.add_argument("queue", help=", ".join(QUEUES))
    enqueue.add_argument("json", help="the message, a JSON object")
    enqueue.add_argument("--delay", type=int, default=0, help="seconds before it is visible")
    enqueue.set_defaults(func=cmd_enqueue)

    status = sub.add_parser("status", help="queues and cron jobs, from the database")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    watch = sub.add_parser("watch", help="follow the live event feed")
    watch.add_argument("--queue", help="only this queue")
    watch.add_argument("--type", help="only event types with this prefix, e.g. job.")
    watch.add_argument("--replay", type=int, default=0, help="first show the last N events")
    watch.add_argument("--json", action="store_true", help="raw JSON lines, for piping")
    watch.add_argument("--host", help="feed host (default FEED_HOST)")
    watch.add_argument("--port", type=int, help="feed port (default FEED_PORT)")
    watch.add_argument("--token", help="feed token (default FEED_TOKEN)")
    watch.set_defaults(func=cmd_watch)

    dev = sub.add_parser("dev", help="embedded local stack with demo data (Ctrl-C stops it)")
    dev.add_argument("--reset", action="store_true", help="delete the stack's data first")
    dev.add_argument("--dir", default=".reactor", help="where the stack keeps its state")
    dev.set_defaults(func=cmd_dev)

    dlq = sub.add_parser("dlq", help="dead letters: list, replay, purge")
    dlq.add_argument("action", choices=["list", "replay", "purge"])
    dlq.add_argument("queue", help=", ".join(QUEUES))
    dlq.add_argument("--id", type=int, help="replay only this dead letter")
    dlq.add_argument("--limit", type=int, default=100, help="list at most this many")
    dlq.add_argument("--json", action="store_true", help="list as JSON lines")
    dlq.add_argument("--yes", action="store_true", help="confirm purge")
    dlq.set_defaults(func=cmd_dlq)
    return parser


def main(argv: Sequence[str] | None = None) -> NoReturn:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except CliError as exc:
        print(f"reactor: {exc}", file=sys.stderr)
        code = exc.code
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
