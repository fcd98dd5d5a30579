"""`reactor dlq` does what the dashboard does, through the same code
(reactor.engine.dead_letters): list and filter, inspect (masked), replay by id or by
reason, discard with a note, and every action in reactor.dead_letter_actions."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests import factories as f
from tests.harness import reactor_command

pytestmark = pytest.mark.process


def cli(url: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return reactor_command(*args, cwd=cwd, DATABASE_URL=url)


def letter(conn: psycopg.Connection, original: Any, error: str, source: int) -> int:
    row = conn.execute("SELECT pgmq.send('email_queue_dlq', %s)", (Jsonb({
        "original": original, "error": error, "attempts": 2, "failed_at": "2026-12-04T10:00:00Z",
        "source_msg_id": source, "queue": "email_queue"}),)).fetchone()
    assert row is not None
    return int(row[0])


MAIL = {"to": "anna.petrova@gmail.com", "subject": None, "template": "checkup_completed",
        "variables": {"full_name": "Anna", "assessment_id": "a1"}, "locale": "en"}


def test_list_filters_by_reason_and_inspect_masks_personal_data(
        database_url: str, db: psycopg.Connection, tmp_path: Path) -> None:
    relay = letter(db, MAIL, "SMTP relay refused the connection", 8)
    template = letter(db, {**MAIL, "template": "nope"}, "unknown template 'nope'", 9)

    listed = cli(database_url, "dlq", "list", "email_queue", "--reason", "smtp", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:-1]]
    assert [(int(r[0]), int(r[1])) for r in rows] == [(relay, 8)]
    as_json = cli(database_url, "dlq", "list", "email_queue", "--json", cwd=tmp_path)
    assert "anna.petrova" not in as_json.stdout
    assert [json.loads(line)["dlq_msg_id"] for line in as_json.stdout.splitlines()] == [
        relay, template]
    none = cli(database_url, "dlq", "list", "email_queue", "--reason", "nothing like it",
               cwd=tmp_path)
    assert "no dead letters in email_queue whose reason contains 'nothing like it'" in none.stdout

    shown = cli(database_url, "dlq", "inspect", "email_queue", "--msg-id", "9", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert "anna.petrova" not in shown.stdout
    assert detail["original"]["to"] == "a***@gmail.com"
    assert (detail["dlq_id"], detail["msg_id"], detail["error"]) == (
        template, 9, "unknown template 'nope'")
    missing = cli(database_url, "dlq", "inspect", "email_queue", "--id", "999", cwd=tmp_path)
    assert missing.returncode == 1
    assert "no dead letter with dlq id 999 in email_queue_dlq" in missing.stderr


def test_discard_needs_a_note_and_every_action_is_audited(
        database_url: str, db: psycopg.Connection, tmp_path: Path) -> None:
    relay = [letter(db, {**MAIL, "n": i}, "SMTP relay down", 10 + i) for i in range(2)]
    bad = letter(db, {**MAIL, "template": "nope"}, "unknown template 'nope'", 20)

    unsure = cli(database_url, "dlq", "discard", "email_queue", "--note", "x", cwd=tmp_path)
    assert unsure.returncode == 1
    assert "give --id, --msg-id or --reason, or --all" in unsure.stderr
    no_note = cli(database_url, "dlq", "discard", "email_queue", "--id", str(bad), cwd=tmp_path)
    assert no_note.returncode == 1
    assert "needs --note" in no_note.stderr

    gone = cli(database_url, "dlq", "discard", "email_queue", "--id", str(bad), "--note",
               "template removed; the parent was called", cwd=tmp_path)
    assert gone.returncode == 0, gone.stderr
    assert f"discarded dlq #{bad} (msg #20)" in gone.stdout
    replayed = cli(database_url, "dlq", "replay", "email_queue", "--reason", "relay down",
                   "--note", "relay is back", cwd=tmp_path)
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 2 message(s) onto email_queue" in replayed.stdout
    assert [m["n"] for m in f.queued(db, "email_queue")] == [0, 1]
    assert f.queued(db, "email_queue_dlq") == []

    rows = db.execute("SELECT action, dlq_ids, msg_ids, filter, client, note "
                      "FROM reactor.dead_letter_actions ORDER BY id").fetchall()
    assert [(r[0], r[1], r[2], r[3], r[5]) for r in rows] == [
        ("discard", [bad], [20], None, "template removed; the parent was called"),
        ("replay", relay, [10, 11], "reason contains 'relay down'", "relay is back")]
    assert all(r[4].startswith("cli ") for r in rows)

    history = cli(database_url, "dlq", "history", "email_queue", "--json", cwd=tmp_path)
    assert [json.loads(line)["action"] for line in history.stdout.splitlines()] == [
        "replay", "discard"]
    nothing = cli(database_url, "dlq", "replay", "email_queue", "--reason", "relay down",
                  cwd=tmp_path)
    assert nothing.returncode == 1
    assert "no replayable dead letter whose reason contains 'relay down'" in nothing.stderr


def test_a_blank_reason_a_huge_id_and_a_note_with_control_characters_are_refused(
        database_url: str, db: psycopg.Connection, tmp_path: Path) -> None:
    """B2, B4, R3: `--reason "  "` is no filter (it would replay everything): one line of
    error; an id Postgres cannot hold is one line too; a note is one line of text."""
    kept = [letter(db, {**MAIL, "n": i}, "SMTP relay down", 10 + i) for i in range(2)]
    for args in (["replay", "email_queue", "--reason", "  "],
                 ["discard", "email_queue", "--reason", "", "--note", "x"],
                 ["list", "email_queue", "--reason", " "]):
        blank = cli(database_url, "dlq", *args, cwd=tmp_path)
        assert blank.returncode == 1, args
        [line] = blank.stderr.splitlines()
        assert line.startswith("reactor: the reason filter is blank"), line
    huge = cli(database_url, "dlq", "replay", "email_queue", "--id", "9" * 30, cwd=tmp_path)
    assert huge.returncode == 1
    [line] = huge.stderr.splitlines()
    assert "a whole number from 1 to 9223372036854775807" in line
    for note in ("ok\x1b[2J", "two\nlines"):
        bad = cli(database_url, "dlq", "replay", "email_queue", "--id", str(kept[0]),
                  "--note", note, cwd=tmp_path)
        assert bad.returncode == 1
        assert "--note: a note is one line of plain text" in bad.stderr
    assert [m["original"]["n"] for m in f.queued(db, "email_queue_dlq")] == [0, 1]
    assert db.execute("SELECT count(*) FROM reactor.dead_letter_actions").fetchone() == (0,)


def test_history_and_list_print_control_characters_escaped(
        database_url: str, db: psycopg.Connection, tmp_path: Path) -> None:
    """R3: what a client wrote (a reason, an audit row's client or note written before the
    note was checked) is printed with its control characters escaped."""
    letter(db, MAIL, "relay said \x1b[2Jno\x9b", 8)
    db.execute("INSERT INTO reactor.dead_letter_actions (action, queue, dlq_ids, msg_ids, "
               "client, note) VALUES ('discard', 'email_queue', '{1}', '{8}', %s, %s)",
               ("1.2.3.4\x1b]0;owned\x07 via 127.0.0.1", "ok\x1b[1;1Hforged\nline"))
    history = cli(database_url, "dlq", "history", "email_queue", cwd=tmp_path)
    assert history.returncode == 0, history.stderr
    [line] = history.stdout.splitlines()
    assert line.endswith("by 1.2.3.4\\x1b]0;owned\\x07 via 127.0.0.1  "
                         "note: ok\\x1b[1;1Hforged\\x0aline")
    listed = cli(database_url, "dlq", "list", "email_queue", cwd=tmp_path)
    assert "relay said \\x1b[2Jno\\x9b" in listed.stdout
    as_json = cli(database_url, "dlq", "list", "email_queue", "--json", cwd=tmp_path)
    assert json.loads(as_json.stdout)["error"] == "relay said \x1b[2Jno\x9b"
    for out in (history.stdout, listed.stdout, as_json.stdout):
        assert not any(ch in out for ch in "\x1b\x9b\x07")
