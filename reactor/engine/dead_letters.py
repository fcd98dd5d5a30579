"""Dead letters handled by people: list, inspect, replay, discard, purge.

One implementation, used by `reactor dlq` (reactor/cli.py) and by the dashboard's
actions (reactor/engine/web.py), so the two can never disagree about what a
replay or a discard does.

- Each action is one transaction: the dead letters it takes, the messages it
  sends back, and its row in `reactor.dead_letter_actions` (what, which ids,
  when, from which client, the note) commit together or not at all.
- A dead letter is taken with `pgmq.archive`, which locks its row: a replay from
  the dashboard and one from the CLI at the same moment cannot both send it
  again (the second finds it gone and skips it).
- A replay sends the original body through `public.enqueue` (fresh attempt
  count, the reactor woken at commit). The body keeps what the processor
  stamped on it when it was dead-lettered (the email ledger key), so a replay
  of a message whose effect already happened changes nothing.
- A discard archives the dead letter (it stays in `pgmq.a_<queue>_dlq` until
  the housekeeping prunes it) and needs a note; a purge deletes them all.
- What is shown is masked as the feed masks it (email addresses, `u***@x.org`).
- A bulk action (all, or all whose reason matches) can carry the count its caller saw
  (`expected_total`): when the selection holds another number by then, nothing is done
  (TotalChanged). A blank reason is refused: only no reason at all means "everything".
- A note is one line of text: control characters are refused (`check_note`).
- A connection lost while the action commits leaves its outcome unknown: CommitUnknown
  says so (the history says what happened), never "nothing was done".
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, LiteralString

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from reactor.engine import queries
from reactor.engine.events import EventBus
from reactor.engine.logs import mask_emails_in, masked
from reactor.engine.queues import dlq_name, validate_queue

__all__ = ["ACTION_EVENTS", "MAX_ID", "MAX_PER_ACTION", "ActionResult", "CommitUnknown",
           "DeadLetter", "Selection", "TotalChanged", "check_id", "check_note", "count",
           "discard", "find", "history", "publish", "purge", "replay", "select"]

# One action takes at most this many dead letters (the rest stay; the result says so).
MAX_PER_ACTION: Final = 10_000
# A note longer than this is cut: it is a line for the audit trail, not a document.
MAX_NOTE_CHARS: Final = 2_000
# Ids are Postgres bigints: 1 .. 2**63-1 (a bigger number is no id, not a database error).
MAX_ID: Final = 2**63 - 1
# The event each action publishes on the bus (registered in reactor.engine.events).
ACTION_EVENTS: Final = {"replay": "dlq.replayed", "discard": "dlq.discarded",
                        "purge": "dlq.purged"}


class TotalChanged(Exception):
    """A bulk action's selection no longer holds the number of dead letters its caller saw
    (`expected_total`): nothing was done (the transaction rolled back)."""

    def __init__(self, expected: int, found: int) -> None:
        super().__init__(f"expected {expected} dead letters, found {found}")
        self.expected = expected
        self.found = found


class CommitUnknown(Exception):
    """The connection was lost while the action committed: it may or may not have
    happened. The history (`reactor dlq history`, the dashboard's actions) says which."""


def check_id(value: Any, what: str = "an id") -> int:
    """`value` as an id of Postgres (1 .. 2**63-1).

    Raises:
        ValueError: not an integer, or out of that range.
    """
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_ID:
        raise ValueError(f"{what} is a whole number from 1 to {MAX_ID}")
    return value


def _control(text: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def check_note(note: str | None) -> str | None:
    """A note as it is recorded: trimmed, at most MAX_NOTE_CHARS; None when blank.

    Raises:
        ValueError: it holds control characters (a line break, a tab, a terminal escape):
            it is one line for the audit trail, printed in terminals as it is.
    """
    text = (note or "").strip()
    if _control(text):
        raise ValueError("a note is one line of plain text: no control characters "
                         "(line breaks, tabs, terminal escapes)")
    return text[:MAX_NOTE_CHARS] or None


@dataclass(frozen=True)
class Selection:
    """Which dead letters of one queue a listing or an action is about.

    `dlq_ids`: the dead letters' own ids in `<queue>_dlq`; `msg_id`: the original
    message's id (what events and logs show); `reason`: a piece of the reason text
    (case-insensitive, plain text). Unset fields select everything; a reason that is
    given but blank is refused (it would select everything while looking like a filter).

    Raises:
        ValueError: a blank reason, or an id out of range.
    """

    queue: str
    dlq_ids: tuple[int, ...] | None = None
    msg_id: int | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        validate_queue(self.queue)
        if self.reason is not None and not self.reason.strip():
            raise ValueError("the reason filter is blank: give some text of the reason, or "
                             "leave the filter out to select every dead letter")
        for dlq_id in self.dlq_ids or ():
            check_id(dlq_id, "a dead letter's id")
        if self.msg_id is not None:
            check_id(self.msg_id, "a message id")

    @property
    def everything(self) -> bool:
        return self.dlq_ids is None and self.msg_id is None and self.reason is None

    def describe(self) -> str | None:
        """The filter, as the audit row records it (None: chosen by id)."""
        if self.dlq_ids is not None or self.msg_id is not None:
            return None
        return "all" if self.reason is None else f"reason contains {self.reason!r}"

    def params(self, limit: int) -> dict[str, Any]:
        return {"dlq_ids": None if self.dlq_ids is None else list(self.dlq_ids),
                "msg_id": self.msg_id, "reason": self.reason, "limit": limit}


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter as it waits in `<queue>_dlq` (unmasked: mask on the way out)."""

    queue: str
    dlq_id: int
    msg_id: int | None       # the original message's id
    at: datetime             # when it was dead-lettered
    attempts: int | None
    error: str | None
    original: Any            # the original body; None when it could not be decoded
    original_text: str | None  # an undecodable body's first 2,000 characters
    failed_at: str | None

    @property
    def replayable(self) -> bool:
        """Only a JSON object can be sent again: anything else could only fail again."""
        return isinstance(self.original, dict)

    def summary(self) -> dict[str, Any]:
        """The panel's row: ids, when, attempts, the reason (masked)."""
        return {"queue": self.queue, "dlq_id": self.dlq_id, "msg_id": self.msg_id,
                "at": self.at.isoformat(), "attempts": self.attempts,
                "error": None if self.error is None else mask_emails_in(self.error),
                "replayable": self.replayable}

    def detail(self) -> dict[str, Any]:
        """The inspect view: the summary, the original message and the error, masked."""
        return {**self.summary(), "failed_at": self.failed_at, "original": masked(self.original),
                "original_text": None if self.original_text is None
                else mask_emails_in(self.original_text)}


@dataclass(frozen=True)
class ActionResult:
    """What one action did, as recorded in reactor.dead_letter_actions."""

    action: str
    queue: str
    audit_id: int | None      # None when nothing was selected (nothing recorded)
    at: datetime | None
    dlq_ids: list[int]
    msg_ids: list[int | None]
    new_msg_ids: list[int] | None
    client: str
    note: str | None
    filter: str | None
    # Dead letters selected but left where they are, with why (not a JSON object).
    skipped: list[tuple[int, str]] = field(default_factory=list)
    # The selection had more than one action takes (MAX_PER_ACTION): run it again.
    more: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"action": self.action, "queue": self.queue, "audit_id": self.audit_id,
                "at": None if self.at is None else self.at.isoformat(),
                "dlq_ids": self.dlq_ids, "msg_ids": self.msg_ids,
                "new_msg_ids": self.new_msg_ids, "client": self.client,
                "note": None if self.note is None else mask_emails_in(self.note),
                "filter": self.filter,
                "skipped": [{"dlq_id": i, "why": why} for i, why in self.skipped],
                "more": self.more}


def _letter(queue: str, row: tuple[Any, ...]) -> DeadLetter:
    dlq_id, enqueued_at, body, text = row
    if not isinstance(body, dict):  # not written by the reactor: show it as it is
        return DeadLetter(queue, int(dlq_id), None, enqueued_at, None, None, None,
                          str(text)[:2000], None)
    source = body.get("source_msg_id")
    attempts = body.get("attempts")
    error = body.get("error")
    original_text = body.get("original_text")
    return DeadLetter(
        queue, int(dlq_id), source if isinstance(source, int) else None, enqueued_at,
        attempts if isinstance(attempts, int) else None,
        None if error is None else str(error), body.get("original"),
        None if original_text is None else str(original_text),
        None if body.get("failed_at") is None else str(body.get("failed_at")))


def _dlq_table(queue: str) -> sql.Identifier:
    return sql.Identifier(f"q_{dlq_name(queue)}")


def select(conn: psycopg.Connection, selection: Selection,
           limit: int = 100) -> list[DeadLetter]:
    """The dead letters a selection names, oldest first, at most `limit`."""
    rows = conn.execute(queries.SELECT_DEAD_LETTERS.format(table=_dlq_table(selection.queue)),
                        selection.params(limit)).fetchall()
    return [_letter(selection.queue, row) for row in rows]


def count(conn: psycopg.Connection, selection: Selection | str,
          reason: str | None = None) -> int:
    """How many dead letters a selection by reason (or of a whole queue) holds: the same
    filter `select` applies (`count(conn, queue, reason)` builds that selection).

    Raises:
        ValueError: a selection by id (count those with `select`), or a blank reason.
    """
    if isinstance(selection, str):
        selection = Selection(selection, reason=reason)
    if selection.dlq_ids is not None or selection.msg_id is not None:
        raise ValueError("count() counts a selection by reason (or all): not one by id")
    row = conn.execute(queries.COUNT_DEAD_LETTERS.format(table=_dlq_table(selection.queue)),
                       {"reason": selection.reason}).fetchone()
    return int(row[0]) if row else 0


def find(conn: psycopg.Connection, queue: str, dlq_id: int) -> DeadLetter | None:
    """One dead letter by its id in `<queue>_dlq`, or None."""
    letters = select(conn, Selection(queue, dlq_ids=(dlq_id,)), limit=1)
    return letters[0] if letters else None


@contextmanager
def _atomic(conn: psycopg.Connection) -> Iterator[None]:
    """`conn.transaction()`, except that a connection lost while it commits raises
    CommitUnknown: the commit may have reached the server or not."""
    tx = conn.transaction()
    tx.__enter__()
    try:
        yield
    except BaseException as exc:
        if not tx.__exit__(type(exc), exc, exc.__traceback__):
            raise
        return
    try:
        tx.__exit__(None, None, None)
    except psycopg.Error as exc:
        if conn.broken or conn.closed or exc.sqlstate is None:
            raise CommitUnknown(f"the connection was lost while the action committed "
                                f"({type(exc).__name__}): it may or may not have "
                                "happened") from exc
        raise  # the server refused the commit: rolled back


def _check_total(conn: psycopg.Connection, selection: Selection,
                 expected_total: int | None) -> None:
    if expected_total is None:
        return
    if selection.dlq_ids is not None or selection.msg_id is not None:
        raise ValueError("expected_total is for an action on all (or all matching a "
                         "reason), not on one chosen by id")
    found = count(conn, selection)
    if found != expected_total:
        raise TotalChanged(expected_total, found)


def _record(conn: psycopg.Connection, action: str, selection: Selection,
            taken: list[DeadLetter], new_ids: list[int] | None, client: str,
            note: str | None) -> tuple[int, datetime]:
    row = conn.execute(queries.RECORD_DEAD_LETTER_ACTION, {
        "action": action, "queue": selection.queue, "dlq_ids": [d.dlq_id for d in taken],
        "msg_ids": [d.msg_id for d in taken], "new_msg_ids": new_ids,
        "filter": selection.describe(), "client": client, "note": note}).fetchone()
    assert row is not None
    return int(row[0]), row[1]


def replay(conn: psycopg.Connection, selection: Selection, *, client: str,
           note: str | None = None, limit: int = MAX_PER_ACTION,
           expected_total: int | None = None) -> ActionResult:
    """Send the selected dead letters back onto their queue as fresh messages.

    One transaction: each dead letter is archived (skipped if another action took it
    first), its original sent through public.enqueue, and the action recorded. A dead
    letter whose original is not a JSON object stays where it is (listed in `skipped`).

    Raises:
        ValueError: a note with control characters.
        TotalChanged: `expected_total` given and the selection holds another number.
        CommitUnknown: the connection was lost while committing.
    """
    note = check_note(note)
    queue = selection.queue
    taken: list[DeadLetter] = []
    new_ids: list[int] = []
    skipped: list[tuple[int, str]] = []
    with _atomic(conn):
        _check_total(conn, selection, expected_total)
        letters = select(conn, selection, limit + 1)
        more = len(letters) > limit
        for letter in letters[:limit]:
            if not letter.replayable:
                skipped.append((letter.dlq_id, "its original is not a JSON object (it could "
                                "only fail again): discard it"))
                continue
            row = conn.execute(queries.ARCHIVE_ONE, {"queue": dlq_name(queue),
                                                     "msg_id": letter.dlq_id}).fetchone()
            if not (row and row[0]):
                continue  # replayed or discarded by someone else meanwhile
            sent = conn.execute(queries.ENQUEUE, {"queue": queue, "message": Jsonb(
                letter.original), "delay": 0}).fetchone()
            assert sent is not None
            taken.append(letter)
            new_ids.append(int(sent[0]))
        audit_id, at = (_record(conn, "replay", selection, taken, new_ids, client, note)
                        if taken else (None, None))
    return ActionResult("replay", queue, audit_id, at, [d.dlq_id for d in taken],
                        [d.msg_id for d in taken], new_ids, client, note,
                        selection.describe(), skipped, more)


def discard(conn: psycopg.Connection, selection: Selection, *, client: str, note: str,
            limit: int = MAX_PER_ACTION, expected_total: int | None = None) -> ActionResult:
    """Take the selected dead letters out of `<queue>_dlq` for good (into its archive),
    with a note saying why. One transaction with its audit row.

    Raises:
        ValueError: no note, or one with control characters.
        TotalChanged: `expected_total` given and the selection holds another number.
        CommitUnknown: the connection was lost while committing.
    """
    note_text = check_note(note)
    if note_text is None:
        raise ValueError("a discard needs a note: say why these messages will never be sent")
    queue = selection.queue
    with _atomic(conn):
        _check_total(conn, selection, expected_total)
        letters = select(conn, selection, limit + 1)
        more = len(letters) > limit
        taken = _take_each(conn, queries.ARCHIVE_ONE, queue, letters[:limit])
        audit_id, at = (_record(conn, "discard", selection, taken, None, client, note_text)
                        if taken else (None, None))
    return ActionResult("discard", queue, audit_id, at, [d.dlq_id for d in taken],
                        [d.msg_id for d in taken], None, client, note_text,
                        selection.describe(), [], more)


def _take_each(conn: psycopg.Connection, statement: LiteralString, queue: str,
               letters: list[DeadLetter]) -> list[DeadLetter]:
    """Run `statement` (archive or delete one) on each letter of `queue`'s DLQ; the
    letters it took (one another action took first is left out)."""
    taken = []
    for letter in letters:
        row = conn.execute(statement, {"queue": dlq_name(queue),
                                       "msg_id": letter.dlq_id}).fetchone()
        if row and row[0]:
            taken.append(letter)
    return taken


def purge(conn: psycopg.Connection, queue: str, *, client: str,
          note: str | None = None) -> ActionResult:
    """Delete every dead letter of `queue` (no archive copy), recorded like the others."""
    note = check_note(note)
    selection = Selection(queue)
    with _atomic(conn):
        letters = select(conn, selection, 1_000_000)
        taken = _take_each(conn, queries.DELETE_ONE, queue, letters)
        audit_id, at = (_record(conn, "purge", selection, taken, None, client, note)
                        if taken else (None, None))
    return ActionResult("purge", queue, audit_id, at, [d.dlq_id for d in taken],
                        [d.msg_id for d in taken], None, client, note, selection.describe())


def publish(bus: EventBus, result: ActionResult) -> None:
    """The action on the feed (and in the log): `dlq.replayed`, `dlq.discarded`,
    `dlq.purged`, with the ids, the client, the note and the audit row's id. An action
    that took nothing publishes nothing (and recorded nothing)."""
    if result.audit_id is None:
        return
    fields = result.as_dict()
    bus.publish(ACTION_EVENTS[result.action], queue=result.queue,
                msg_id=result.msg_ids[0] if len(result.msg_ids) == 1 else None,
                **{k: fields[k] for k in ("audit_id", "dlq_ids", "msg_ids", "new_msg_ids",
                                          "client", "note", "filter")})


def history(conn: psycopg.Connection, queue: str | None = None,
            limit: int = 50) -> list[dict[str, Any]]:
    """The latest actions on dead letters, newest first (notes masked)."""
    rows = conn.execute(queries.DEAD_LETTER_ACTIONS, {"queue": queue, "limit": limit}).fetchall()
    return [{"id": r[0], "at": r[1].isoformat(), "action": r[2], "queue": r[3],
             "dlq_ids": list(r[4]), "msg_ids": list(r[5]),
             "new_msg_ids": None if r[6] is None else list(r[6]), "filter": r[7],
             "client": r[8], "note": None if r[9] is None else mask_emails_in(r[9])}
            for r in rows]
