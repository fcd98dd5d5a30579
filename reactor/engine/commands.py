"""What an app needs to add its own `reactor` subcommands (the clinic's `email` and
`dev`), and the one-line-error rules every command follows.

An app lists `Command`s in its `App(commands=...)`; `reactor` adds them beside the
engine's (migrate, run, enqueue, status, dlq, watch). A command's errors end in one
line on stderr that names the fix: raise `CliError` (exit 1, or `code=2` for
configuration); a `ConfigError` from the app's settings exits 2 the same way.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg

from reactor.engine.db import connect_sync, describe_db_error
from reactor.engine.settings import EngineSettings

if TYPE_CHECKING:
    from reactor.engine.app import App

__all__ = ["CliError", "Command", "with_db"]


class CliError(Exception):
    """A user-facing failure: `str()` is the one line shown, `code` the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Command:
    """One `reactor NAME …` subcommand an app adds.

    Args:
        name: the subcommand's name (must not be one of the engine's).
        help: one line for `reactor --help`.
        arguments: adds the command's arguments to its argparse parser.
        run: does the work; returns the exit status.
        takes_app: the command is about the app's database, so it takes `--app` like
            the engine's commands (False for one that brings its own stack).
    """

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, App], int]
    takes_app: bool = True


def with_db(settings: EngineSettings, fn: Callable[[psycopg.Connection], Any]) -> Any:
    """`fn(conn)` on a short-lived connection; a database error becomes one CliError line."""
    try:
        with connect_sync(settings.database_url, "reactor cli") as conn:
            return fn(conn)
    except psycopg.OperationalError as exc:
        raise CliError(f"cannot reach the database: {describe_db_error(exc)} "
                       "(check DATABASE_URL and that Postgres is running)") from None
    except psycopg.Error as exc:
        raise CliError(f"the database refused it: {describe_db_error(exc)} (is it migrated? "
                       "run `reactor migrate`)") from None
