"""The clinic's own `reactor` subcommands: `email` (mails a killed worker left
'sending') and `dev` (the embedded local stack with demo data)."""

from __future__ import annotations

import argparse
from pathlib import Path

from reactor.clinic import queries
from reactor.clinic.settings import MailSettings
from reactor.engine.app import App
from reactor.engine.commands import CliError, Command, with_db
from reactor.engine.logs import mask_emails_in

__all__ = ["COMMANDS"]


def _email_arguments(mail: argparse.ArgumentParser) -> None:
    mail.add_argument("action", choices=["stuck", "resolve"])
    mail.add_argument("key", nargs="?", help="the ledger key (resolve)")
    verdict = mail.add_mutually_exclusive_group()
    verdict.add_argument("--sent", dest="verdict", action="store_const", const="sent",
                         help="it did arrive: never send it again")
    verdict.add_argument("--resend", dest="verdict", action="store_const", const="resend",
                         help="it did not arrive: the next delivery (a replay) sends it")
    mail.add_argument("--older-than", type=int, default=None, metavar="SECONDS",
                      help="stuck: only rows 'sending' for longer than this (default: the "
                           "longest a live worker takes to write a verdict, 10 + 4 × "
                           "SMTP_TIMEOUT_S + 30)")


def email(args: argparse.Namespace, app: App) -> int:
    """Resolve mails a killed worker left 'sending' (see docs/operations.md)."""
    settings = app.settings
    if args.action == "stuck":
        from reactor.clinic.email import verdict_bound_s

        older_than = args.older_than
        if older_than is None:  # what a live worker may still resolve is not stuck
            assert isinstance(settings, MailSettings), "the clinic's settings hold its mail's"
            older_than = verdict_bound_s(settings)
        rows = with_db(settings, lambda c: c.execute(
            queries.STUCK_EMAILS, {"older_than_s": older_than}).fetchall())
        if not rows:
            print("no mail is stuck in 'sending'")
            return 0
        print(f"{'KEY':<48} {'RECIPIENT':<28} {'TEMPLATE':<26} SINCE")
        for key, recipient, template, since in rows:
            print(f"{key:<48} {mask_emails_in(recipient):<28} {template:<26} "
                  f"{since:%Y-%m-%d %H:%M:%S}")
        return 0
    if not args.key or args.verdict is None:
        raise CliError("reactor email resolve KEY --sent|--resend: name the ledger key "
                       "(from the dead letter's error or `reactor email stuck`) and a verdict")
    status = "sent" if args.verdict == "sent" else "failed"
    row = with_db(settings, lambda c: c.execute(
        queries.RESOLVE_EMAIL, {"key": args.key, "status": status}).fetchone())
    if row is None:
        raise CliError(f"no mail with ledger key {args.key!r} is in 'sending': nothing to "
                       "resolve (`reactor email stuck` lists them)")
    what = ("recorded as sent: a replay archives it without sending" if status == "sent"
            else "marked for resending: replay its dead letter (`reactor dlq replay "
            "email_queue`) to send it")
    print(f"{args.key}: {row[1]} to {mask_emails_in(row[0])} {what}")
    return 0


def _dev_arguments(dev: argparse.ArgumentParser) -> None:
    dev.add_argument("--reset", action="store_true", help="delete the stack's data first")
    dev.add_argument("--dir", default=".reactor", help="where the stack keeps its state")


def dev(args: argparse.Namespace, app: App) -> int:
    """The embedded stack: its own Postgres, relay and reactor (no DATABASE_URL needed)."""
    from reactor.clinic.devstack import run_dev

    return run_dev(Path(args.dir), args.reset)


COMMANDS = (
    Command("dev", "embedded local stack with demo data (Ctrl-C stops it)", _dev_arguments,
            dev, takes_app=False),
    Command("email", "mails left 'sending' by a killed worker: stuck, resolve",
            _email_arguments, email),
)
