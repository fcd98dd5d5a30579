"""The `reactor` command line: the engine's commands, plus the ones the app declares
(`App.commands`; the clinic adds `email` and `dev`).

Every error a user can cause ends in one line on stderr that names the fix:
exit code 2 for configuration, 1 for everything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import psycopg
import structlog
import trio

from reactor.engine import dead_letters, queues
from reactor.engine.app import App, load_app
from reactor.engine.commands import CliError, with_db
from reactor.engine.db import describe_db_error
from reactor.engine.logs import configure_logging, mask_emails_in
from reactor.engine.migrate import MigrationError, migrate
from reactor.engine.settings import ConfigError, load_feed_client_settings

__all__ = ["DEFAULT_APP", "main"]

# The app `reactor` commands are about unless --app names another.
DEFAULT_APP = "reactor.clinic.app:build"


def _load(path: str) -> App:
    """The app the command line is about (--app, default the clinic). Its settings load
    when a command first needs them."""
    try:
        return load_app(path)
    except ConfigError as exc:
        raise CliError(str(exc), 2) from None


# -- commands ------------------------------------------------------------------------
def cmd_migrate(args: argparse.Namespace, app: App) -> int:
    try:
        report = migrate(app.settings.database_url, app.migrations, pg_cron=app.pg_cron)
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


def cmd_run(args: argparse.Namespace, app: App) -> int:
    from reactor.engine.runtime import Reactor, SchemaNotReady
    from reactor.engine.startup import DatabaseRefused, raise_open_files_limit

    settings = app.settings
    configure_logging(settings.log_level, settings.log_format_effective)
    raise_open_files_limit()
    try:
        reactor = Reactor(app, freeze_heap=True)
    except ConfigError as exc:
        raise CliError(str(exc), 2) from None
    def report_ports(event: Any) -> None:
        # FEED_PORT/METRICS_PORT may be 0 (any free port): say which ones were bound.
        if event["type"] == "reactor.started":
            structlog.get_logger("reactor").info(
                "reactor.listening", feed_port=reactor.feed_port, http_port=reactor.http_port)

    reactor.bus.add_sink(report_ports)  # no job event concerns it
    try:
        trio.run(reactor.run)
    except* (SchemaNotReady, DatabaseRefused, MigrationError) as group:
        raise CliError(str(group.exceptions[0]), 2) from None
    return 0


def cmd_enqueue(args: argparse.Namespace, app: App) -> int:
    settings = app.settings
    queue = _queue(app, args.queue)
    try:
        message = json.loads(args.json)
    except json.JSONDecodeError as exc:
        raise CliError(f"JSON is not valid: {exc}") from None
    if not isinstance(message, dict):
        raise CliError("JSON must be an object, e.g. '{\"event\": \"signup\"}'")
    msg_id = with_db(settings, lambda c: queues.enqueue(c, queue, message, args.delay))
    print(msg_id)
    return 0


def _cli_client() -> str:
    """Who ran a `reactor dlq` action, for the audit row: `cli user@host`."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        user = "?"
    return f"cli {user}@{socket.gethostname()}"


def _selection(args: argparse.Namespace, queue: str) -> dead_letters.Selection:
    if args.id is not None and args.msg_id is not None:
        raise CliError("give --id (dead-letter id) or --msg-id (original message id), "
                       "not both")
    try:  # a blank --reason is refused (only no --reason means all), ids are bigints
        return dead_letters.Selection(queue, dlq_ids=None if args.id is None else (args.id,),
                                      msg_id=args.msg_id, reason=args.reason)
    except ValueError as exc:
        raise CliError(f"{exc}{' (--reason)' if 'reason' in str(exc) else ''}") from None


def _note(args: argparse.Namespace) -> str | None:
    try:
        return dead_letters.check_note(args.note)
    except ValueError as exc:
        raise CliError(f"--note: {exc}") from None


def _acted(action: Any, queue: str) -> Any:
    """Run an action; a connection lost while it committed is said to be just that."""
    try:
        return action()
    except dead_letters.CommitUnknown as exc:
        raise CliError(f"{exc}: the state is unknown; see `reactor dlq history {queue}` "
                       "before you run it again") from None


def _which(args: argparse.Namespace, queue: str) -> str:
    if args.id is not None:
        return f"with dlq id {args.id}"
    if args.msg_id is not None:
        return f"of message {args.msg_id}"
    return f"whose reason contains {args.reason!r}" if args.reason else f"in {queue}_dlq"


def cmd_dlq(args: argparse.Namespace, app: App) -> int:
    """Dead letters. Two ids, never confused: `msg` is the original message's id (what
    events, logs and the dashboard show), `dlq` the dead letter's own id in <queue>_dlq.
    Every action goes through reactor.engine.dead_letters, as the dashboard's do."""
    from reactor.engine.watch import json_line_safe, terminal_safe

    settings = app.settings
    queue = _queue(app, args.queue)
    if args.action == "list":
        selection = _selection(args, queue)
        letters = with_db(settings, lambda c: dead_letters.select(c, selection, args.limit))
        if args.json:
            for d in letters:
                print(json_line_safe(json.dumps(
                    {**d.detail(), "dlq_msg_id": d.dlq_id, "source_msg_id": d.msg_id,
                     "enqueued_at": d.at.isoformat()}, ensure_ascii=False, default=str)))
            return 0
        if not letters:
            print(terminal_safe(f"no dead letters in {queue}" + (
                "" if selection.everything else " " + _which(args, queue))))
            return 0
        print(f"{'dlq id':>8}  {'msg id':>8}  {'dead-lettered at':<19}  {'tries':>5}  reason")
        for d in letters:
            print(f"{d.dlq_id:>8}  {d.msg_id if d.msg_id is not None else '-':>8}  "
                  f"{d.at:%Y-%m-%d %H:%M:%S}  {d.attempts or '-':>5}  "
                  f"{terminal_safe(mask_emails_in(str(d.error)))}")
        print(f"inspect one: reactor dlq inspect {queue} --id DLQ_ID; replay one: "
              f"reactor dlq replay {queue} --id DLQ_ID (or --msg-id MSG_ID)")
        return 0
    if args.action == "inspect":
        if args.id is None and args.msg_id is None:
            raise CliError("inspect one dead letter: give --id DLQ_ID or --msg-id MSG_ID")
        selection = _selection(args, queue)
        letters = with_db(settings, lambda c: dead_letters.select(c, selection, 1))
        if not letters:
            raise CliError(f"no dead letter {_which(args, queue)} in {queue}_dlq "
                           f"(see `reactor dlq list {queue}`)")
        print(json_line_safe(json.dumps(letters[0].detail(), ensure_ascii=False, indent=2,
                                        default=str)))
        return 0
    if args.action == "history":
        rows = with_db(settings, lambda c: dead_letters.history(c, queue, args.limit))
        if args.json:
            for row in rows:
                print(json_line_safe(json.dumps(row, ensure_ascii=False)))
            return 0
        if not rows:
            print(f"no actions on the dead letters of {queue} yet")
        for row in rows:
            ids = ", ".join(f"dlq #{i}" for i in row["dlq_ids"])
            print(terminal_safe(f"{row['at'][:19]}  {row['action']:<7}  {ids}  by "
                                f"{row['client']}"
                                + (f"  note: {row['note']}" if row["note"] else "")))
        return 0
    client = _cli_client()
    note = _note(args)
    if args.action == "replay":
        selection = _selection(args, queue)
        result = _acted(lambda: with_db(settings, lambda c: dead_letters.replay(
            c, selection, client=client, note=note)), queue)
        if not result.dlq_ids and not selection.everything:
            raise CliError(f"no replayable dead letter {_which(args, queue)} in {queue}_dlq "
                           f"(see `reactor dlq list {queue}`)")
        for dlq_id, source, new_id in zip(result.dlq_ids, result.msg_ids,
                                          result.new_msg_ids or [], strict=True):
            print(f"replayed dlq #{dlq_id} (msg #{source if source is not None else '?'}) "
                  f"onto {queue} as msg #{new_id}")
        for dlq_id, why in result.skipped:
            print(f"left dlq #{dlq_id}: {why}")
        print(f"replayed {len(result.dlq_ids)} message(s) onto {queue}")
        if result.more:
            print(f"more dead letters match: run it again (at most "
                  f"{dead_letters.MAX_PER_ACTION} a time)")
        return 0
    if args.action == "discard":
        selection = _selection(args, queue)
        if selection.everything and not args.all:
            raise CliError("discard which? give --id, --msg-id or --reason, or --all for "
                           f"every dead letter of {queue}")
        if note is None:
            raise CliError("a discard needs --note: say why these messages will never be "
                           "sent (it goes into the audit trail)")
        result = _acted(lambda: with_db(settings, lambda c: dead_letters.discard(
            c, selection, client=client, note=note)), queue)
        if not result.dlq_ids:
            raise CliError(f"no dead letter {_which(args, queue)} in {queue}_dlq "
                           f"(see `reactor dlq list {queue}`)")
        for dlq_id, source in zip(result.dlq_ids, result.msg_ids, strict=True):
            print(f"discarded dlq #{dlq_id} (msg #{source if source is not None else '?'})")
        print(f"discarded {len(result.dlq_ids)} dead letter(s) of {queue} "
              f"(audit #{result.audit_id})")
        return 0
    if not args.yes:
        raise CliError(f"purge deletes every dead letter of {queue}: add --yes to confirm")
    result = _acted(lambda: with_db(settings, lambda c: dead_letters.purge(
        c, queue, client=client, note=note)), queue)
    print(f"purged {len(result.dlq_ids)} dead letter(s) of {queue}")
    return 0


def cmd_status(args: argparse.Namespace, app: App) -> int:
    from reactor.engine.status import cron_status, queue_status

    settings = app.settings
    queue_rows, cron = with_db(settings, lambda c: (queue_status(c), cron_status(c)))
    if args.json:
        print(json.dumps({"queues": [{k: v for k, v in q.as_dict().items() if k != "throughput"}
                                     for q in queue_rows],
                          "cron": None if cron is None else [j.as_dict() for j in cron]}))
        return 0
    # done = finished successfully; dead = dead-lettered (never counted as done);
    # retrying = failed at least once and waiting for another try; dlq = dead letters waiting.
    width = max([26, *(len(q.queue) for q in queue_rows)])
    print(f"{'queue':<{width}} {'depth':>6} {'retrying':>8} {'oldest':>7} {'done 1h':>8} "
          f"{'dead 1h':>8} {'done 24h':>9} {'dead 24h':>9} {'dlq':>5}")
    for q in queue_rows:
        oldest = f"{q.oldest_age_s}s" if q.oldest_age_s is not None else "-"
        print(f"{q.queue:<{width}} {q.depth:>6} {q.retrying:>8} {oldest:>7} {q.done_1h:>8} "
              f"{q.dead_lettered_1h:>8} {q.done_24h:>9} {q.dead_lettered_24h:>9} "
              f"{q.dead_letters:>5}")
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


def cmd_watch(args: argparse.Namespace, app: App) -> int:
    from reactor.engine.watch import feed_url, run_watch

    try:
        feed = load_feed_client_settings()
    except ConfigError as exc:
        raise CliError(str(exc), 2) from None
    token = args.token or (feed.feed_token.get_secret_value() if feed.feed_token else None)
    url = feed_url(args.host or feed.feed_host, args.port or feed.feed_port, queue=args.queue,
                   type_prefix=args.type, replay=args.replay)
    return run_watch(url, args.json, token=token, depth=args.depth)


def _queue(app: App, name: str) -> str:
    try:
        return app.check_queue(name)
    except ValueError as exc:
        raise CliError(str(exc)) from None


# -- parser --------------------------------------------------------------------------
def build_parser(app: App) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reactor",
        description="Event-driven worker for pgmq queues, pg_cron jobs and database webhooks.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("migrate", help="apply pending migrations (idempotent)").set_defaults(
        func=cmd_migrate)
    sub.add_parser("run", help="run the reactor until SIGTERM/SIGINT").set_defaults(func=cmd_run)

    enqueue = sub.add_parser("enqueue", help="put a JSON message on a queue")
    enqueue.add_argument("queue", help="one of the app's queues (e.g. analytics_queue)")
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
    watch.add_argument("--token", help="feed token (default FEED_TOKEN; sent in a header)")
    watch.add_argument("--depth", action="store_true",
                       help="print every queue.depth tick (default: only when a depth changes)")
    watch.set_defaults(func=cmd_watch)

    dlq = sub.add_parser(
        "dlq", help="dead letters: list, inspect, replay, discard, purge, history",
        description="Dead letters of a queue. Every action (replay, discard, purge) is "
                    "recorded in reactor.dead_letter_actions, as the dashboard's are.")
    dlq.add_argument("action", choices=["list", "inspect", "replay", "discard", "purge",
                                        "history"])
    dlq.add_argument("queue", help="one of the app's queues (e.g. email_queue)")
    dlq.add_argument("--id", type=int, metavar="DLQ_ID",
                     help="only the dead letter with this id (the 'dlq id' column)")
    dlq.add_argument("--msg-id", type=int, metavar="MSG_ID",
                     help="only the dead letter of this original message id (the 'msg id' "
                          "column, as in events and logs)")
    dlq.add_argument("--reason", metavar="TEXT",
                     help="only dead letters whose reason contains TEXT (case-insensitive)")
    dlq.add_argument("--note", help="why (recorded with the action; discard needs one)")
    dlq.add_argument("--all", action="store_true",
                     help="discard every dead letter of the queue (with --note)")
    dlq.add_argument("--limit", type=int, default=100, help="list at most this many")
    dlq.add_argument("--json", action="store_true", help="list (or history) as JSON lines")
    dlq.add_argument("--yes", action="store_true", help="confirm purge")
    dlq.set_defaults(func=cmd_dlq)

    without_app = {"watch"}  # it reads the feed of whatever runs
    for command in app.commands:
        if command.name in sub.choices:
            raise CliError(f"app {app.name}: its command {command.name!r} is one of the "
                           "engine's: name it otherwise", 2)
        own = sub.add_parser(command.name, help=command.help)
        try:
            command.arguments(own)
        except argparse.ArgumentError as exc:
            raise CliError(f"app {app.name}: its command {command.name!r} cannot be added: "
                           f"{exc}", 2) from None
        own.set_defaults(func=command.run)
        if not command.takes_app:
            without_app.add(command.name)
    # `reactor run --app module:factory`, and so on: every command about an app's queues
    # and database.
    for name, parser_of in sub.choices.items():
        if name not in without_app:
            try:
                parser_of.add_argument("--app", default=DEFAULT_APP, metavar="MODULE:FACTORY",
                                       help=f"the app (default {DEFAULT_APP})")
            except argparse.ArgumentError:
                raise CliError(f"app {app.name}: its command {name!r} defines --app, which "
                               "the engine adds itself (Command(takes_app=False) if it must "
                               "not take one)", 2) from None
    return parser


def _app_path(argv: Sequence[str]) -> str:
    """--app's value, read before the parser is built (the app adds commands to it)."""
    early = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    early.add_argument("--app", default=DEFAULT_APP)
    try:
        return str(early.parse_known_args(list(argv))[0].app)
    except argparse.ArgumentError:
        return DEFAULT_APP  # `--app` with no value: the real parser says so, in its words


def main(argv: Sequence[str] | None = None) -> NoReturn:
    argv = sys.argv[1:] if argv is None else argv
    try:
        app = _load(_app_path(argv))
        args = build_parser(app).parse_args(argv)
        code = args.func(args, app)
    except ConfigError as exc:  # the app's settings, loaded by the first command that needs them
        print(f"reactor: {exc}", file=sys.stderr)
        code = 2
    except CliError as exc:
        print(f"reactor: {exc}", file=sys.stderr)
        code = exc.code
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
