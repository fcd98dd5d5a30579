"""Email delivery against a real SMTP server (aiosmtpd, in a subprocess)."""

from __future__ import annotations

import email.policy
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.headerregistry import HeaderRegistry
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from psycopg.types.json import Jsonb

from reactor.clinic.devstack import DevStack, dev_settings
from reactor.clinic.email import EmailProcessor, unkeyed_ledger_key
from reactor.clinic.resources import TEMPLATES_DIR
from reactor.clinic.services.mailer import (
    Attachment,
    OutgoingMail,
    SmtpMailer,
    ascii_filename,
    build_message,
    check_mail_settings,
    helo_name,
    mime,
)
from reactor.clinic.services.templates import (
    LOCALES,
    REQUIRED_VARIABLES,
    EmailRenderer,
    RenderedEmail,
)
from reactor.clinic.settings import ConfigError, load_settings
from reactor.engine.db import Database
from reactor.engine.errors import RetryableError, RetryLater
from reactor.engine.pgcluster import free_port
from reactor.engine.processor import PermanentError
from reactor.engine.queues import Message
from tests import factories as f
from tests.clinic.email import test_idn as idn
from tests.conftest import SmtpServer, TlsFiles
from tests.harness import (
    eventually,
    in_db,
    log_lines,
    of_type,
    processor_context,
    reactor_command,
    reactor_process,
    running_reactor,
    scalar,
    send,
    settings_for,
    sql,
    wait_for,
    wait_until,
)

PASSWORD = "s3cret-for-tests-only"


def smtp_env(server: SmtpServer, security: str, tls: TlsFiles | None = None,
             user: str | None = None, password: str | None = None) -> dict[str, Any]:
    env: dict[str, Any] = {"EMAIL_PROVIDER": "smtp", "SMTP_HOST": "127.0.0.1",
                           "SMTP_PORT": server.port, "SMTP_SECURITY": security,
                           "SMTP_FROM": "noreply@family.example",
                           "SMTP_FROM_NAME": "Семейный центр", "SMTP_TIMEOUT_S": 5}
    if tls:
        env["SMTP_CA_FILE"] = str(tls.ca)
    if user:
        env |= {"SMTP_USER": user, "SMTP_PASS": password}
    return env


async def wait_for_mails(server: SmtpServer, count: int = 1,
                         within_s: float = 30) -> list[EmailMessage]:
    await eventually(lambda: len(server.mails()) >= count, within_s=within_s)
    return server.mails()


def parts(mail: EmailMessage) -> dict[str, str]:
    return {p.get_content_type(): p.get_content() for p in mail.walk()
            if p.get_content_maintype() == "text"}


async def test_booking_mails_through_starttls_and_auth(
        database_url: str, smtp_server: Callable[..., SmtpServer], tls_files: TlsFiles) -> None:
    server = smtp_server(tls="starttls", user="mailer", password=PASSWORD)
    env = smtp_env(server, "starttls", tls_files, "mailer", PASSWORD)
    async with running_reactor(database_url, **env) as reactor:
        with reactor.bus.subscribe() as sub:
            await in_db(database_url, lambda c: f.appointment(
                c, f.profile(c, email="anna@example.com", full_name="Анна Петрова", locale="ru"),
                at=datetime(2026, 12, 1, 9, tzinfo=UTC), specialist_name="Д-р Иванова"))
            [mail] = await wait_for_mails(server)
            # The mail's job: the booking queues an analytics event too, often done first.
            await wait_for(sub, lambda e: e["type"] == "job.succeeded"
                           and e["queue"] == "email_queue")
    assert "tls=True" in server.meta()[0]
    assert "auth=True" in server.meta()[0]
    assert mail["To"] == "anna@example.com"
    assert mail["Subject"] == "Консультация записана: 1 декабря 2026, 12:00 (Москва)"
    assert "=?utf-8?" in str(mail.as_bytes()).lower()  # the Russian subject is RFC 2047-encoded
    assert mail["From"].addresses[0].display_name == "Семейный центр"
    assert mail["From"].addresses[0].addr_spec == "noreply@family.example"
    assert mail["Message-ID"].endswith("@family.example>")
    assert mail["Date"]
    assert mail.get_content_type() == "multipart/alternative"
    body = parts(mail)
    assert "Д-р Иванова" in body["text/plain"]
    assert "Д-р Иванова" in body["text/html"]
    rows = await sql(database_url, "SELECT status, message_id FROM public.email_ledger")
    assert rows == [("sent", mail["Message-ID"])]


async def test_implicit_tls_and_english_from_the_profile(
        database_url: str, smtp_server: Callable[..., SmtpServer], tls_files: TlsFiles) -> None:
    server = smtp_server(tls="ssl")
    async with running_reactor(database_url, **smtp_env(server, "ssl", tls_files)):
        await in_db(database_url, lambda c: f.profile(c, email="john@example.com",
                                                      full_name="John Smith", locale="en"))
        # No locale in the message: the recipient's profile decides.
        await send(database_url, "email_queue", {
            "to": "john@example.com", "template": "checkup_completed",
            "variables": {"full_name": "John Smith", "assessment_id": "a1"}})
        [mail] = await wait_for_mails(server)
    assert mail["Subject"] == "Thank you! Your checkup is complete"
    assert "tls=True" in server.meta()[0]


async def test_plain_smtp_without_tls(database_url: str,
                                      smtp_server: Callable[..., SmtpServer]) -> None:
    server = smtp_server()
    async with running_reactor(database_url, **smtp_env(server, "none")):
        await send(database_url, "email_queue", {
            "to": "a@example.com", "subject": "Custom subject", "template": "checkup_completed",
            "variables": {"full_name": "A", "assessment_id": "1"}, "locale": "en"})
        [mail] = await wait_for_mails(server)
    assert mail["Subject"] == "Custom subject"
    assert "tls=False" in server.meta()[0]


async def test_an_smtp_outage_is_waited_out_and_nothing_dead_letters(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    server = smtp_server(start=False)  # nothing listens on its port yet
    async with running_reactor(database_url, **smtp_env(server, "none"),
                               MAX_ATTEMPTS=2) as reactor:
        with reactor.bus.subscribe() as sub:
            await send(database_url, "email_queue", {
                "to": "a@example.com", "template": "checkup_completed", "locale": "ru",
                "variables": {"full_name": "A", "assessment_id": "1"}})
            # More failed deliveries than MAX_ATTEMPTS: an outage has its own budget.
            retries = await wait_for(sub, of_type("job.retrying"), count=3, within_s=20)
            assert all("SMTP connection failed" in e["error"] for e in retries)
            server.start()
            await wait_for(sub, of_type("job.succeeded"), within_s=20)
    assert len(server.mails()) == 1
    assert await sql(database_url, "SELECT count(*) FROM pgmq.q_email_queue_dlq") == [(0,)]


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])
async def test_rejected_recipient_is_dead_lettered_with_the_reply(
        database_url: str, smtp_server: Callable[..., SmtpServer], pipelining: bool) -> None:
    server = smtp_server(reject=["nobody@example.com"], pipelining=pipelining)
    async with running_reactor(database_url, **smtp_env(server, "none")) as reactor:
        with reactor.bus.subscribe() as sub:
            await send(database_url, "email_queue", {
                "to": "nobody@example.com", "template": "checkup_completed", "locale": "ru",
                "variables": {"full_name": "A", "assessment_id": "1"}})
            [event] = await wait_for(sub, of_type("job.dead_lettered"))
    assert "550 5.1.1" in event["error"]
    assert "n***@example.com" in event["error"]  # the address in the reply is masked
    [(letter,)] = await sql(database_url, "SELECT message FROM pgmq.q_email_queue_dlq")
    assert "550 5.1.1" in letter["error"]
    assert server.mails() == []
    assert await sql(database_url, "SELECT status FROM public.email_ledger") == [("failed",)]


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])
async def test_greylisting_4xx_is_deferred_and_the_mail_then_goes_out_once(
        database_url: str, smtp_server: Callable[..., SmtpServer], pipelining: bool) -> None:
    """A 4xx is a deferral (issue 33): the mail goes back on the queue as a new message
    (`requeued_as`), announced as job.deferred, never job.retrying."""
    server = smtp_server(defer_once=["grey@example.com"], pipelining=pipelining)
    async with running_reactor(database_url, **smtp_env(server, "none"),
                               SMTP_DEFER_BACKOFF_S=1) as reactor:
        with reactor.bus.subscribe() as sub:
            msg_id = await send(database_url, "email_queue", {
                "to": "grey@example.com", "template": "checkup_completed", "locale": "ru",
                "variables": {"full_name": "A", "assessment_id": "1"}})
            [event] = await wait_for(sub, of_type("job.deferred", msg_id))
            [done] = await wait_for(sub, of_type("job.succeeded", event["requeued_as"]),
                                    within_s=30)
    assert "451 4.7.1" in event["error"]
    assert event["retry_in_s"] == 1
    assert done["attempt"] == 1
    [mail] = server.mails()
    assert mail["To"] == "grey@example.com"
    assert await sql(database_url, "SELECT status, message_id FROM public.email_ledger") == [
        ("sent", mail["Message-ID"])]


async def test_mails_sent_together_each_record_their_own_message_id(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    """Verdicts that wait at the same moment are written in one statement: each ledger
    row still gets the Message-ID of its own mail."""
    server = smtp_server(pipelining=True)
    count = 12
    async with running_reactor(database_url, **smtp_env(server, "none"),
                               SMTP_POOL_SIZE=3) as reactor:
        with reactor.bus.subscribe() as sub:
            for n in range(count):
                await send(database_url, "email_queue", {
                    "to": f"parent{n}@example.com", "template": "checkup_completed",
                    "locale": "en", "variables": {"full_name": "A", "assessment_id": str(n)}})
            done = await wait_for(sub, lambda e: e["type"] in (
                "job.succeeded", "job.retrying", "job.dead_lettered"), count=count,
                within_s=60)
    assert {e["type"] for e in done} == {"job.succeeded"}, done
    sent = {str(m["To"]): str(m["Message-ID"]) for m in server.mails()}
    assert len(sent) == count
    rows = await sql(database_url, "SELECT recipient, status, message_id "
                                   "FROM public.email_ledger")
    assert sorted(rows) == sorted((to, "sent", message_id) for to, message_id in sent.items())


@pytest.mark.parametrize("body", [
    {"to": "a@example.com\r\nBcc: victim@example.com", "template": "checkup_completed"},
    {"to": "a@example.com", "subject": "Hi\r\nBcc: victim@example.com",
     "template": "checkup_completed"},
    {"to": "a@example.com", "subject": "Hi\nX-Injected: yes", "template": "checkup_completed"},
])
async def test_header_injection_never_reaches_the_wire(
        database_url: str, smtp_server: Callable[..., SmtpServer], body: dict[str, Any]) -> None:
    server = smtp_server()
    body = {**body, "locale": "en", "variables": {"full_name": "A", "assessment_id": "1"}}
    async with running_reactor(database_url, **smtp_env(server, "none")) as reactor:
        with reactor.bus.subscribe() as sub:
            # Straight into pgmq: the SQL helper would have refused it already.
            await send(database_url, "email_queue", body, notify=True)
            [event] = await wait_for(sub, of_type("job.dead_lettered"))
    assert event["attempt"] == 1
    field = "to" if "\n" in body["to"] else "subject"
    assert f"{field}:" in event["error"]  # the reason names the field with the line break
    assert "victim@example.com" not in event["error"]  # addresses in reasons are masked
    assert server.mails() == []
    assert server.sessions() == []  # refused before any SMTP conversation


@pytest.mark.parametrize(("body", "reason"), [
    ({"to": "not an address", "template": "checkup_completed"}, "to:"),
    ({"to": "a@example.com", "template": "../../etc/passwd"}, "template:"),
    ({"to": "a@example.com", "template": "checkup_completed",
      "attachments": [{"path": "../../../etc/passwd"}]}, "is outside REPORTS_DIR"),
    ({"to": "a@example.com", "template": "checkup_completed",
      "attachments": [{"path": "/etc/passwd"}]}, "is outside REPORTS_DIR"),
    ({"to": "a@example.com", "template": "checkup_completed",
      "attachments": [{"path": "u1/missing.pdf"}]}, "'u1/missing.pdf' does not exist"),
    # The email package refolds a subject in time that grows with the square of its
    # words: 250,000 characters of "a a a" took 7 s of the reactor's CPU to build.
    ({"to": "a@example.com", "template": "checkup_completed", "subject": "a " * 125_000},
     "subject: Value error, over 998 characters"),
])
async def test_bad_addresses_templates_and_attachments_are_dead_lettered_with_the_reason(
        database_url: str, smtp_server: Callable[..., SmtpServer], tmp_path: Path,
        body: dict[str, Any], reason: str) -> None:
    server = smtp_server()
    reports = tmp_path / "reports"
    reports.mkdir()
    body = {**body, "locale": "en", "variables": {"full_name": "A", "assessment_id": "1"}}
    async with running_reactor(database_url, REPORTS_DIR=str(reports),
                               **smtp_env(server, "none")) as reactor:
        with reactor.bus.subscribe() as sub:
            await send(database_url, "email_queue", body)
            [event] = await wait_for(sub, of_type("job.dead_lettered"))
    assert event["attempt"] == 1
    assert reason in event["error"]
    assert "root:" not in event["error"]  # nothing of the file is read into the reason
    assert server.mails() == []


async def test_a_certificate_the_client_does_not_trust_is_refused(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    """The relay's certificate is signed by the tests' own CA, which is not in the system
    store and not in SMTP_CA_FILE: nothing is sent, the reason names the certificate."""
    server = smtp_server(tls="starttls", user="mailer", password=PASSWORD)
    env = smtp_env(server, "starttls", None, "mailer", PASSWORD)  # no SMTP_CA_FILE
    async with running_reactor(database_url, **env) as reactor:
        with reactor.bus.subscribe() as sub:
            msg_id = await send(database_url, "email_queue", {
                "to": "a@example.com", "template": "checkup_completed", "locale": "en",
                "variables": {"full_name": "A", "assessment_id": "1"}})
            [event] = await wait_for(sub, of_type("job.retrying", msg_id), within_s=30)
    assert "certificate" in event["error"].lower()
    assert PASSWORD not in event["error"]
    assert server.mails() == []
    assert not any("auth=True" in m for m in server.meta())


async def test_redelivery_after_a_crash_between_send_and_archive_sends_once(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    server = smtp_server()
    settings = settings_for(database_url, **smtp_env(server, "none"))
    body = {"to": "a@example.com", "template": "checkup_completed", "locale": "en",
            "variables": {"full_name": "A", "assessment_id": "1"}}
    enqueued_at = datetime.now(UTC)
    delivery = Message("email_queue", 41, 1, enqueued_at, body)
    async with Database(database_url).opened() as db:
        processor = EmailProcessor(processor_context("email_queue", db, settings))
        async with processor.running():
            await processor.handle(processor.parse(delivery))
            # The process died before the archive: the same message comes back.
            await processor.handle(processor.parse(Message("email_queue", 41, 2,
                                                           enqueued_at, body)))
    assert len(server.mails()) == 1


async def test_a_send_of_unknown_outcome_is_dead_lettered_not_repeated(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    """Another delivery claimed the key an hour ago and never wrote a verdict: past any
    live worker's bound, so delivery-unknown, naming who claimed it and when."""
    server = smtp_server()
    settings = settings_for(database_url, **smtp_env(server, "none"))
    body = {"to": "a@example.com", "template": "checkup_completed", "locale": "en",
            "variables": {"full_name": "A", "assessment_id": "1"}}
    redelivery = Message("email_queue", 7, 2, datetime.now(UTC), body)
    key = unkeyed_ledger_key(redelivery)

    await in_db(database_url, lambda c: f.ledger_entry(c, key, msg_id=7, claimed_s_ago=3600))
    async with Database(database_url).opened() as db:
        processor = EmailProcessor(processor_context("email_queue", db, settings))
        async with processor.running():
            with pytest.raises(PermanentError, match="delivery state unknown") as unknown:
                await processor.handle(processor.parse(redelivery))
    assert f"message 7 claimed ledger key {key} at " in str(unknown.value)
    assert f"wrote no verdict within {processor.verdict_bound_s:g}s" in str(unknown.value)
    assert server.mails() == []


async def test_a_sending_row_of_a_live_worker_is_waited_for_then_archived_quietly(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    """A replica took a message whose first worker is paused mid-send (its lease ran out,
    its 'sent' verdict not yet written): no dead letter, no second mail. The mail is put
    back, no attempt counted, its ledger key kept; when the verdict is there, it is done."""
    server = smtp_server()
    settings = settings_for(database_url, **smtp_env(server, "none"))
    body = {"to": "a@example.com", "template": "checkup_completed", "locale": "en",
            "variables": {"full_name": "A", "assessment_id": "1"}}
    redelivery = Message("email_queue", 8, 2, datetime.now(UTC), body)
    key = unkeyed_ledger_key(redelivery)
    await in_db(database_url, lambda c: f.ledger_entry(c, key, msg_id=8))
    async with Database(database_url).opened() as db:
        processor = EmailProcessor(processor_context("email_queue", db, settings))
        async with processor.running():
            with pytest.raises(RetryLater, match=f"ledger key {key} is being sent by "
                                                 "message 8") as later:
                await processor.handle(processor.parse(redelivery))
            assert later.value.stamp == {"idempotency_key": key}
            assert later.value.delay_s == 15
            # The paused worker wakes and writes its verdict; the put-back mail comes.
            await in_db(database_url, lambda c: c.execute(
                "UPDATE public.email_ledger SET status = 'sent'"))
            again = Message("email_queue", 9, 1, datetime.now(UTC),
                            {**body, **later.value.stamp})
            await processor.handle(processor.parse(again))
    assert server.mails() == []


async def test_a_delivery_unknown_letter_resolves_itself_once_the_ledger_says_sent(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    """Housekeeping: a frozen worker that woke after the bound wrote 'sent'; its mail's
    delivery-unknown dead letter leaves the DLQ by itself (archived), with an event, and
    an unrelated dead letter stays."""
    server = smtp_server()
    settings = settings_for(database_url, **smtp_env(server, "none"))

    def letters(c: psycopg.Connection) -> None:
        f.ledger_entry(c, "k-sent", msg_id=3, status="sent")
        f.ledger_entry(c, "k-still", msg_id=4)
        for key, error in (("k-sent", "delivery state unknown: message 3 claimed …"),
                           ("k-still", "delivery state unknown: message 4 claimed …"),
                           ("k-sent", "bad message: to: not an address")):
            c.execute("SELECT pgmq.send('email_queue_dlq', %s)", (Jsonb({
                "original": {"to": "a@example.com", "template": "checkup_completed",
                             "idempotency_key": key},
                "error": error, "attempts": 1, "source_msg_id": 3}),))

    await in_db(database_url, letters)
    async with Database(database_url).opened() as db:
        processor = EmailProcessor(processor_context("email_queue", db, settings))
        with processor.bus.subscribe() as sub:
            assert await processor.reconcile() == 1
            assert await processor.reconcile() == 0
            [event] = await wait_for(sub, of_type("email.reconciled"))
    assert (event["queue"], event["dlq_msg_id"], event["ledger_key"]) == (
        "email_queue", 1, "k-sent")
    assert await sql(database_url, "SELECT msg_id FROM pgmq.q_email_queue_dlq "
                                   "ORDER BY msg_id") == [(2,), (3,)]
    assert await sql(database_url, "SELECT msg_id FROM pgmq.a_email_queue_dlq") == [(1,)]


def _reactor_cli(url: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return reactor_command(*args, cwd=cwd, DATABASE_URL=url)


async def test_no_answer_to_the_end_of_a_message_is_dead_lettered_never_resent(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    """The relay has the whole message but answers after SMTP_TIMEOUT_S: it may have
    accepted it, so the ledger keeps 'sending', nothing is sent again, a person decides."""
    server = smtp_server(delay_ms=2500)  # the answer to the end of the message comes late
    async with running_reactor(database_url,
                               **{**smtp_env(server, "none"), "SMTP_TIMEOUT_S": 1}) as reactor:
        with reactor.bus.subscribe() as sub:
            await send(database_url, "email_queue", {
                "to": "late@example.com", "template": "checkup_completed", "locale": "en",
                "variables": {"full_name": "A", "assessment_id": "1"}})
            [event] = await wait_for(sub, lambda e: e["type"] in (
                "job.succeeded", "job.retrying", "job.dead_lettered"), within_s=30)
    assert event["type"] == "job.dead_lettered", event
    assert "delivery state unknown: no answer to the message" in event["error"]
    assert "reactor email resolve" in event["error"]
    assert await sql(database_url, "SELECT status FROM public.email_ledger") == [("sending",)]
    assert await sql(database_url, "SELECT count(*) FROM pgmq.q_email_queue_dlq") == [(1,)]
    # One conversation only: the mail was not tried again.
    assert [e for e in server.sessions() if e.startswith("ehlo")] == ["ehlo family.example"]


@pytest.mark.process
@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "unkeyed"])
@pytest.mark.parametrize(("verdict", "mails_after_replay"), [("--sent", 0), ("--resend", 1)])
async def test_a_mail_stuck_in_sending_is_resolved_by_the_operator_then_replayed(
        database_url: str, smtp_server: Callable[..., SmtpServer], tmp_path: Path,
        verdict: str, mails_after_replay: int, keyed: bool) -> None:
    """A worker was killed mid-send: the dead letter names the command, the operator says
    whether the mail arrived, and the replay then sends it once or not at all — also for
    a mail queued without a key (public.queue_email_task, the triggers), whose replay is
    a new message: the dead letter keeps the key it was tried under."""
    server = smtp_server()
    body: dict[str, Any] = {"to": "anna@example.com", "template": "checkup_completed",
                            "locale": "en", "variables": {"full_name": "A", "assessment_id": "1"}}
    if keyed:
        body["idempotency_key"] = "report_ready:stuck-1"
    msg_id = await send(database_url, "email_queue", body, notify=False)
    [(enqueued_at,)] = await sql(database_url, "SELECT enqueued_at FROM pgmq.q_email_queue")
    key = body.get("idempotency_key") or unkeyed_ledger_key(
        Message("email_queue", msg_id, 1, enqueued_at, body))
    await in_db(database_url, lambda c: f.ledger_entry(c, key, msg_id=msg_id,
                                                       recipient="anna@example.com",
                                                       claimed_s_ago=3600))
    async with running_reactor(database_url, **smtp_env(server, "none")) as reactor:
        with reactor.bus.subscribe() as sub:
            [letter] = await wait_for(sub, of_type("job.dead_lettered", msg_id))
        assert f"reactor email resolve {key} --sent" in letter["error"]
        stuck = await trio.to_thread.run_sync(
            lambda: _reactor_cli(database_url, "email", "stuck", "--older-than", "0",
                                 cwd=tmp_path))
        assert stuck.returncode == 0, stuck.stderr
        assert key in stuck.stdout
        assert "anna@example.com" not in stuck.stdout  # masked: a***@example.com
        resolved = await trio.to_thread.run_sync(
            lambda: _reactor_cli(database_url, "email", "resolve", key, verdict, cwd=tmp_path))
        assert resolved.returncode == 0, resolved.stderr
        again = await trio.to_thread.run_sync(
            lambda: _reactor_cli(database_url, "email", "resolve", key, verdict, cwd=tmp_path))
        assert again.returncode == 1
        assert "nothing to resolve" in again.stderr
        with reactor.bus.subscribe() as sub:
            replay = await trio.to_thread.run_sync(
                lambda: _reactor_cli(database_url, "dlq", "replay", "email_queue",
                                     cwd=tmp_path))
            assert replay.returncode == 0, replay.stderr
            await wait_for(sub, of_type("job.succeeded"))
    assert len(server.mails()) == mails_after_replay
    assert await sql(database_url, "SELECT idempotency_key, status FROM public.email_ledger") \
        == [(key, "sent")]


async def test_unkeyed_mails_are_sent_after_their_queue_is_recreated(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    """msg ids start again at 1 in a recreated queue: old ledger rows must not match."""
    server = smtp_server()
    body = {"template": "checkup_completed", "locale": "en",
            "variables": {"full_name": "A", "assessment_id": "1"}}
    async with running_reactor(database_url, **smtp_env(server, "none")):
        for n in range(3):
            await send(database_url, "email_queue", {**body, "to": f"before{n}@example.com"})
        await wait_for_mails(server, 3)
        await eventually(lambda: server.mails() and not _queued_mails(database_url))
    await sql(database_url, "SELECT pgmq.drop_queue('email_queue')")
    await sql(database_url, "SELECT pgmq.create('email_queue')")
    async with running_reactor(database_url, **smtp_env(server, "none")):
        ids = [await send(database_url, "email_queue", {**body, "to": f"after{n}@example.com"})
               for n in range(3)]
        assert ids == [1, 2, 3]  # the same msg ids as the first three
        await wait_for_mails(server, 6)
    assert sorted(str(m["To"]) for m in server.mails())[:3] == [
        f"after{n}@example.com" for n in range(3)]


def _queued_mails(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pgmq.q_email_queue").fetchone()
    return int(row[0]) if row else 0


async def test_file_outbox_writes_whole_eml_files(database_url: str, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    async with running_reactor(database_url, EMAIL_PROVIDER="file",
                               EMAIL_OUTBOX_DIR=str(outbox)) as reactor:
        with reactor.bus.subscribe() as sub:
            await in_db(database_url, lambda c: f.appointment(
                c, f.profile(c, email="b@example.com", full_name="Борис", locale="ru"),
                starts_in=timedelta(days=2), specialist_name="Dr. X"))
            await wait_for(sub, lambda e: e["type"] == "job.succeeded"
                           and e["queue"] == "email_queue")
    [path] = list(outbox.iterdir())  # no temporary file left behind
    assert path.suffix == ".eml"
    mail = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert mail["To"] == "b@example.com"
    assert mail["Subject"].startswith("Консультация записана")


async def test_a_mail_with_a_file_is_built_off_the_reactors_thread(
        database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file's base64 lines, or an outsized subject, take milliseconds to write: that
    build runs in a worker thread, so the reactor's own thread (every other job, the
    feed) goes on. A mail's text and HTML alone build on the reactor's thread, where a
    hop would cost more than the build."""
    import reactor.clinic.email as clinic_email

    built_on_trio_thread: dict[str, bool] = {}

    def recording_build(**kwargs: Any) -> Any:
        try:
            trio.lowlevel.current_task()
            on_trio = True
        except RuntimeError:
            on_trio = False
        built_on_trio_thread[kwargs["to"]] = on_trio
        return build_message(**kwargs)

    monkeypatch.setattr(clinic_email, "build_message", recording_build)
    reports = tmp_path / "reports"
    (reports / "u").mkdir(parents=True)
    (reports / "u" / "a.pdf").write_bytes(PDF)
    async with running_reactor(database_url, EMAIL_PROVIDER="file", REPORTS_DIR=str(reports),
                               EMAIL_OUTBOX_DIR=str(tmp_path / "outbox")) as reactor:
        with reactor.bus.subscribe() as sub:
            for to, attachments, subject in (
                    ("file@example.com", [{"path": "u/a.pdf"}], None),
                    ("text@example.com", [], None),
                    ("long@example.com", [], "Отчёт " * 60)):  # 360 characters
                await send(database_url, "email_queue", {
                    "to": to, "template": "report_ready", "locale": "ru",
                    "variables": {"full_name": "Анна", "assessment_id": "7a2b"},
                    "attachments": attachments, "subject": subject})
            done = await wait_for(sub, lambda e: e.get("queue") == "email_queue" and e["type"] in (
                "job.succeeded", "job.dead_lettered"), count=3)
    assert {e["type"] for e in done} == {"job.succeeded"}
    assert built_on_trio_thread == {"file@example.com": False, "text@example.com": True,
                                    "long@example.com": False}


@pytest.mark.process
def test_wrong_password_is_retried_with_a_clear_log_and_no_secret(
        database_url: str, smtp_server: Callable[..., SmtpServer], tls_files: TlsFiles,
        tmp_path: Path) -> None:
    server = smtp_server(tls="starttls", user="mailer", password=PASSWORD)
    env = {k: str(v) for k, v in smtp_env(server, "starttls", tls_files, "mailer",
                                          "wrong-password-123").items()}
    with psycopg.connect(database_url, autocommit=True) as conn:
        user = f.profile(conn, email="maria.ivanova@example.com", locale="ru")
        f.appointment(conn, user, starts_in=timedelta(days=3))
    log = tmp_path / "reactor.log"
    with reactor_process(database_url, log, **env) as proc:
        wait_until(lambda: log.read_text().count("job.retrying") >= 2, what="two retries")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    text = log.read_text()
    assert "SMTP authentication failed: check SMTP_USER and SMTP_PASS" in text
    assert "wrong-password-123" not in text
    assert "maria.ivanova@example.com" not in text
    assert "Traceback" not in text
    assert server.mails() == []


# -- what a relay and a spam filter see ------------------------------------------------------

VALUES: dict[str, Any] = {
    "full_name": "Анна Петрова", "specialist_name": "Д-р Иванова-Константинопольская",
    "scheduled_at": "2026-11-27T12:00:00+00:00", "duration_minutes": 50,
    "appointment_id": "9f1c", "assessment_id": "7a2b", "amount": "4200.00", "currency": "RUB",
}
ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40


def header_section(raw: bytes) -> list[str]:
    return raw.split(b"\n\n", 1)[0].decode("ascii").split("\n")


def mime_headers(raw: bytes) -> list[str]:
    """Every header line of every MIME part (the blocks that follow a boundary)."""
    text = raw.decode("ascii")
    blocks = [text.split("\n\n", 1)[0]]
    blocks += [chunk.split("\n\n", 1)[0] for chunk in re.split(r"\n--=_[0-9a-f]+\n", text)[1:]]
    return [line for block in blocks for line in block.split("\n")]


def sessions_closed(server: SmtpServer, count: int) -> Callable[[], bool]:
    return lambda: server.sessions().count("closed") == count


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("template", sorted(REQUIRED_VARIABLES))
def test_every_template_and_locale_is_a_mail_that_filters_accept(template: str,
                                                                 locale: str) -> None:
    renderer = EmailRenderer(TEMPLATES_DIR, app_base_url="https://app.example.com",
                             reply_to="support@family.example")
    rendered = renderer.render(template, locale,
                               {name: VALUES[name] for name in REQUIRED_VARIABLES[template]})
    filename = "Отчёт — Анна Петрова, чекап 7a2b.pdf" if locale == "ru" else "report-7a2b.pdf"
    attachments = [Attachment(filename, PDF)] if template == "report_ready" else []
    out = build_message(sender="noreply@family.example", sender_name="Семейный центр «Разум»",
                        to="anna@example.com", email=rendered, attachments=attachments,
                        reply_to="support@family.example")
    raw = out.raw
    # Headers: RFC 5322 line length, RFC 2047 encoded-word length, every line ASCII.
    for line in mime_headers(raw):
        assert len(line) <= 78, line
        for word in ENCODED_WORD.findall(line):
            assert len(word) <= 75, word
    top = header_section(raw)
    assert "Auto-Submitted: auto-generated" in top
    assert "MIME-Version: 1.0" in top
    mail = email.message_from_bytes(raw, policy=email.policy.default)
    assert mail["Subject"] == rendered.subject
    assert mail["Reply-To"] == "support@family.example"
    assert mail["From"].addresses[0].display_name == "Семейный центр «Разум»"
    assert mail["From"].addresses[0].addr_spec == "noreply@family.example"
    assert mail["To"] == "anna@example.com"
    assert mail["Message-ID"] == out.message_id
    assert mail["Date"].datetime is not None
    # Both parts, never base64 (spam filters score base64 text), decoding to what was rendered.
    [text] = [p for p in mail.walk() if p.get_content_type() == "text/plain"]
    [html] = [p for p in mail.walk() if p.get_content_type() == "text/html"]
    for part, expected in ((text, rendered.text), (html, rendered.html)):
        assert part["Content-Transfer-Encoding"] in ("7bit", "quoted-printable")
        assert part.get_content_charset() == "utf-8"
        assert part.get_content().rstrip("\n") == expected.rstrip("\n")
    # The footer is in both parts and invites replies only because Reply-To is set.
    footer = rendered.text.rstrip("\n").rsplit("\n\n", 1)[1]
    assert "support@family.example" in footer
    assert footer.split(". ")[0] in html.get_content()
    if not attachments:
        assert mail.get_content_type() == "multipart/alternative"
        return
    assert mail.get_content_type() == "multipart/mixed"
    [pdf] = [p for p in mail.walk() if p.get_content_type() == "application/pdf"]
    assert pdf["Content-Transfer-Encoding"] == "base64"
    assert pdf.get_content() == PDF
    assert pdf.get_filename() == filename  # an RFC 2231-aware reader shows the real name
    fallback = ascii_filename(filename)
    # munpack and other readers that ignore RFC 2231 get a plain filename= and name=.
    assert f'\n filename="{fallback}"' in raw.decode()
    assert f'\n name="{fallback}"' in raw.decode()
    assert fallback.isascii()
    assert fallback.endswith(".pdf")
    if locale == "en":
        assert f'filename="{filename}"' in raw.decode()  # ASCII: the plain form only
        assert "filename*" not in raw.decode()


def test_ascii_fallbacks_for_attachment_names() -> None:
    assert ascii_filename("report-7a2b.pdf") == "report-7a2b.pdf"
    assert ascii_filename("Отчёт Маши — ноябрь.pdf") == "Otchet Mashi - noyabr.pdf"
    assert ascii_filename('Crème "brûlée".pdf') == "Creme _brulee.pdf"
    assert ascii_filename("日本語.pdf") == "attachment.pdf"
    long = ascii_filename("Отчёт " * 40 + ".pdf")
    assert len(long) <= 60
    assert long.endswith(".pdf")


def test_long_subjects_and_names_stay_within_the_rfc_limits() -> None:
    subject = "Консультация записана: " + "очень длинная тема письма " * 8
    rendered = EmailRenderer(TEMPLATES_DIR).render(
        "checkup_completed", "en", {"full_name": "A", "assessment_id": "1"}, subject=subject)
    out = build_message(sender="noreply@family.example", sender_name="Ж" * 90,
                        to="a@example.com", email=rendered)
    for line in header_section(out.raw):
        assert len(line) <= 78, line
        assert all(len(word) <= 75 for word in ENCODED_WORD.findall(line))
    mail = email.message_from_bytes(out.raw, policy=email.policy.default)
    assert mail["Subject"] == " ".join(subject.split())
    ascii_subject = "A plain English subject that is long enough to be folded " * 3
    out = build_message(sender="noreply@family.example", sender_name="Family Mind",
                        to="a@example.com", email=RenderedEmail(
                            ascii_subject.strip(), "text\n", "<p>html</p>\n"))
    lines = header_section(out.raw)
    assert all(len(line) <= 78 for line in lines)
    assert not any("=?" in line for line in lines)  # ASCII stays readable, only folded
    assert email.message_from_bytes(out.raw, policy=email.policy.default)["Subject"] == \
        ascii_subject.strip()
    # English text and HTML in ASCII go as 7bit: nothing to encode.
    assert "Content-Transfer-Encoding: 7bit" in out.raw.decode()


def _fresh_parts_masked(raw: bytes) -> str:
    """A mail's text but for what is new in each build (Date, Message-ID, boundaries)."""
    text = re.sub(r"=_[0-9a-f]{24}", "=_BOUNDARY", raw.decode("utf-8"))
    return re.sub(r"(?m)^(Date|Message-ID): .*$", r"\1: NEW", text)


@pytest.mark.parametrize("sender_name", ["Семейный центр «Разум»", "Family Mind"])
def test_a_mail_is_written_the_same_whatever_was_built_before_it(sender_name: str) -> None:
    """The builder shares header objects, their folded lines and the From header between
    mails (mime.py). A mail built cold (nothing shared yet) and built again after others
    that differ in what the sharing must keep apart (another sender under the same name,
    an SMTPUTF8 recipient, other files) is the same bytes but for what is new each
    time."""
    def build(sender: str, to: str, filename: str) -> bytes:
        rendered = RenderedEmail("Отчёт готов\tк загрузке " + "x" * 90, "текст\n",
                                 "<p>текст</p>\n")
        return build_message(sender=sender, sender_name=sender_name, to=to,
                             email=rendered, attachments=[Attachment(filename, PDF)]).raw

    mime._sender.cache_clear()
    mime._POLICY.header_factory._made.cache_clear()  # type: ignore[attr-defined]
    cold = build("noreply@family.example", "anna@example.com", "Отчёт — Анна.pdf")
    other_sender = build("other@clinic.example", "мама@пример.рф", "Отчёт — Анна.pdf")
    assert "other@clinic.example" in other_sender.decode("utf-8")
    build("noreply@family.example", "b@example.com", "x.pdf")
    again = build("noreply@family.example", "anna@example.com", "Отчёт — Анна.pdf")
    assert _fresh_parts_masked(again) == _fresh_parts_masked(cold)
    assert again != cold  # a new Message-ID and new boundaries all the same


TEXTS = ["", "plain ascii\n", "trailing space \nand tab\t\n", "a=b, =3D and = at the end=\n",
         "x" * 200 + "\n", "строка\r\nвторая\rтретья\n", ".\n.a leading dot\nFrom the start\n",
         "emoji 😀, NUL \x00, form feed \x0c and a line separator \u2028 here",
         "--=_0123456789abcdef01234567 a boundary-like line\n", "no final newline",
         "Здравствуйте, Анна! " * 30, "é" * 25 + " \n" + "é" * 25 + "\t\n"]


@pytest.mark.parametrize("subtype", ["plain", "html"])
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_a_text_part_reads_back_as_the_packages_own_part_does(text: str, subtype: str) -> None:
    """Text parts are set by the builder's content manager (quoted-printable from
    binascii): a reader gets from each the same text and headers as from the part the
    package's raw_data_manager makes; no body line is over 78 (76 but for an encoded
    space at a line's end), and line ends stay line ends (never an encoded =0A)."""
    ours = mime._text_part(text, subtype)
    theirs = EmailMessage(policy=mime._POLICY)
    theirs.set_content(text, subtype, cte=mime._cte(text))
    del theirs["MIME-Version"]
    read = [email.message_from_bytes(part.as_bytes(policy=mime._OUTPUT),
                                     policy=email.policy.default) for part in (ours, theirs)]
    assert read[0].get_content() == read[1].get_content()
    assert list(read[0].items()) == list(read[1].items())
    body = ours.as_bytes(policy=mime._OUTPUT).partition(b"\n\n")[2]
    assert all(len(line) <= 76 or line.endswith((b"=20", b"=09"))
               for line in body.split(b"\n"))
    assert all(len(line) <= 78 for line in body.split(b"\n"))
    assert b"=0A" not in body
    assert b"=0D" not in body


@pytest.mark.parametrize("value", ['text/plain; charset="utf-8"',
                                   "attachment; filename*=utf-8''%D0%90%D0%BD%D0%BD%D0%B0.pdf"])
@pytest.mark.parametrize("policy", [mime._OUTPUT, mime._OUTPUT_UTF8, mime._POLICY,
                                    mime._OUTPUT.clone(max_line_length=40)],
                         ids=["lf", "utf8", "crlf", "narrow"])
def test_a_header_folds_as_the_package_folds_it_whatever_it_folded_before(
        value: str, policy: Any) -> None:
    name = "Content-Type" if value.startswith("text/") else "Content-Disposition"
    header = mime._POLICY.header_factory(name, value)
    for other in (mime._OUTPUT, mime._OUTPUT_UTF8, mime._POLICY):
        header.fold(policy=other)
    assert header.fold(policy=policy) == HeaderRegistry()[name](name, value).fold(policy=policy)


def test_every_mail_has_its_own_date_and_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Date is made once a second (mime._date) but is the second the mail was
    built in; boundaries are new random ones in every mail, the inner and the outer
    different."""
    def build() -> EmailMessage:
        raw = build_message(sender="noreply@family.example", sender_name=None,
                            to="a@example.com", email=RenderedEmail("s", "t\n", "<p>h</p>\n"),
                            attachments=[Attachment("r.pdf", PDF)]).raw
        return email.message_from_bytes(raw, policy=email.policy.default)

    boundaries = []
    for second in (1_800_000_000, 1_800_000_000, 1_800_000_001, 1_800_003_600):
        monkeypatch.setattr(time, "time", lambda second=second: second + 0.5)
        mail = build()
        assert mail["Date"].datetime == datetime.fromtimestamp(second, UTC)
        inner = next(mail.iter_parts())
        boundaries += [mail.get_boundary(), inner.get_boundary()]
    monkeypatch.undo()
    assert abs(build()["Date"].datetime - datetime.now(UTC)) < timedelta(seconds=2)
    assert all(re.fullmatch(r"=_[0-9a-f]{24}", b or "") for b in boundaries)
    assert len(set(boundaries)) == len(boundaries)


def test_what_is_shared_between_mails_holds_nothing_of_a_family() -> None:
    factory = mime._POLICY.header_factory
    for name, value in (("Content-Type", 'text/html; charset="utf-8"'),
                        ("Content-Transfer-Encoding", "quoted-printable"),
                        ("MIME-Version", "1.0"), ("Content-Disposition", "attachment")):
        assert factory._structural(name, value), (name, value)  # type: ignore[attr-defined]
    for name, value in (("Content-Type", 'multipart/mixed; boundary="=_0123"'),
                        ("Content-Disposition", 'attachment; filename="Anna.pdf"'),
                        ("Subject", "Report"), ("Content-Type", "x/" + "y" * 80)):
        assert not factory._structural(name, value), (name, value)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("subject", "content_type"), [
    ("a lone surrogate \ud800", "application/pdf"),
    ("vertical\x0btab", "application/pdf"),
    ("a report", "application/пдф"),
])
def test_what_the_email_package_cannot_write_is_refused_at_once(subject: str,
                                                                content_type: str) -> None:
    """A build fails the same way on every try: a dead letter now, not five retries."""
    with pytest.raises(PermanentError, match="the mail cannot be written"):
        build_message(sender="noreply@family.example", sender_name=None, to="a@example.com",
                      email=RenderedEmail(subject, "text\n", "<p>html</p>\n"),
                      attachments=[Attachment("r.pdf", PDF, content_type)])


def smtp_settings(**env: Any) -> Any:
    return load_settings(DATABASE_URL="postgresql://x@127.0.0.1/db", EMAIL_PROVIDER="smtp",
                         SMTP_HOST="127.0.0.1", **env)


@pytest.mark.parametrize(("env", "expected"), [
    ({"SMTP_FROM": "noreply@family.example"}, "family.example"),
    ({"SMTP_FROM": "noreply@family.example", "SMTP_HELO_NAME": "Mail.Family.Example."},
     "mail.family.example"),
    ({"SMTP_FROM": "noreply@localhost", "SMTP_HELO_NAME": "[192.0.2.1]"}, "[192.0.2.1]"),
    ({"SMTP_FROM": "noreply@localhost", "SMTP_HELO_NAME": "[IPv6:2001:db8::1]"},
     "[ipv6:2001:db8::1]"),
])
def test_the_helo_name_defaults_to_the_senders_domain(env: dict[str, str],
                                                      expected: str) -> None:
    settings = smtp_settings(**env)
    check_mail_settings(settings)
    assert helo_name(settings) == expected


@pytest.mark.parametrize(("env", "expected"), [
    ({"SMTP_FROM": "noreply@localhost"}, "SMTP_HELO_NAME (default: the domain of SMTP_FROM) "
                                         "'localhost' is not a fully qualified host name"),
    ({"SMTP_FROM": "a@example.com", "SMTP_HELO_NAME": "3f9c2a7d1b4e"},  # a container ID
     "SMTP_HELO_NAME '3f9c2a7d1b4e' is not a fully qualified host name (it has no domain"),
    ({"SMTP_FROM": "a@example.com", "SMTP_HELO_NAME": "localhost.localdomain"},
     "(it is a local name)"),
    ({"SMTP_FROM": "a@example.com", "SMTP_HELO_NAME": "192.0.2.1"}, "needs brackets"),
    ({"SMTP_FROM": "a@example.com", "SMTP_HELO_NAME": "mail_host.example.com"},
     "not a valid host name"),
    ({"SMTP_FROM": "Family <a@example.com>"}, "SMTP_FROM is not an email address"),
    ({"SMTP_FROM": "a@example.com", "SMTP_REPLY_TO": "support"},
     "SMTP_REPLY_TO is not an email address"),
    # The From line is written as given: a character that breaks a header line (\x1c is
    # a line boundary to str.splitlines, as \x0b and \x0c are) is refused at start.
    ({"SMTP_FROM": "a@example.com", "SMTP_FROM_NAME": "Clinic\x1cBot"},
     "SMTP_FROM_NAME must not contain control characters (found '\\x1c')"),
    ({"SMTP_FROM": "a@example.com", "SMTP_FROM_NAME": "Clinic\x00"},
     "SMTP_FROM_NAME must not contain control characters"),
])
def test_a_helo_name_that_is_not_fully_qualified_is_refused(env: dict[str, str],
                                                            expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_mail_settings(smtp_settings(**env))
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    if "HELO" in expected:
        assert "set SMTP_HELO_NAME to this host's public DNS name" in message


@pytest.mark.process
def test_reactor_run_refuses_a_local_helo_name_with_one_line(tmp_path: Path) -> None:
    result = reactor_command("run", cwd=tmp_path, DATABASE_URL="postgresql://x@127.0.0.1/db",
                             EMAIL_PROVIDER="smtp", SMTP_HOST="mail.example.com",
                             SMTP_FROM="noreply@localhost")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "'localhost' is not a fully qualified host name" in line
    assert "SMTP_HELO_NAME" in line


async def test_the_relay_sees_a_fully_qualified_ehlo_name(
        database_url: str, smtp_server: Callable[..., SmtpServer], tls_files: TlsFiles) -> None:
    server = smtp_server(tls="starttls")
    env = {**smtp_env(server, "starttls", tls_files), "SMTP_HELO_NAME": "mail.family.example"}
    async with running_reactor(database_url, **env):
        await send(database_url, "email_queue", {
            "to": "a@example.com", "template": "checkup_completed", "locale": "ru",
            "variables": {"full_name": "A", "assessment_id": "1"}})
        [mail] = await wait_for_mails(server)
    assert "helo=mail.family.example" in server.meta()[0]
    # EHLO before and after STARTTLS, both with the configured name.
    assert [e for e in server.sessions() if e.startswith("ehlo")] == \
        ["ehlo mail.family.example"] * 2
    assert mail["Auto-Submitted"] == "auto-generated"


async def test_without_a_helo_setting_the_senders_domain_is_the_greeting(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    server = smtp_server()
    async with running_reactor(database_url, **smtp_env(server, "none")):
        await send(database_url, "email_queue", {
            "to": "a@example.com", "template": "checkup_completed", "locale": "en",
            "variables": {"full_name": "A", "assessment_id": "1"}})
        await wait_for_mails(server)
    [greeting] = [e for e in server.sessions() if e.startswith("ehlo")]
    assert greeting == "ehlo family.example"  # never localhost or a container ID


async def test_an_idle_pooled_connection_is_closed_with_quit(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    server = smtp_server()
    async with running_reactor(database_url, **smtp_env(server, "none"),
                               SMTP_POOL_IDLE_S=0.3) as reactor:
        with reactor.bus.subscribe() as sub:
            for n in (1, 2):
                await send(database_url, "email_queue", {
                    "to": "a@example.com", "template": "checkup_completed", "locale": "en",
                    "variables": {"full_name": "A", "assessment_id": str(n)}})
                await wait_for(sub, of_type("job.succeeded"))
                # Idle past SMTP_POOL_IDLE_S: the reactor says QUIT, the server closes.
                await eventually(sessions_closed(server, n))
    sessions = server.sessions()
    assert sessions == ["ehlo family.example", "quit", "closed"] * 2
    assert len(server.mails()) == 2


async def test_a_connection_the_server_closed_is_replaced_without_a_failed_send(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    server = smtp_server(idle_timeout_s=0.3)  # the relay drops idle clients first
    async with running_reactor(database_url, **smtp_env(server, "none"),
                               SMTP_POOL_IDLE_S=60) as reactor:
        with reactor.bus.subscribe() as sub:
            for n in (1, 2, 3):
                await send(database_url, "email_queue", {
                    "to": "a@example.com", "template": "checkup_completed", "locale": "en",
                    "variables": {"full_name": "A", "assessment_id": str(n)}})
                [done] = await wait_for(sub, lambda e: e["type"] in (
                    "job.succeeded", "job.retrying", "job.dead_lettered"))
                assert done["type"] == "job.succeeded", done
                assert done["attempt"] == 1, done
                await eventually(sessions_closed(server, n))
    assert server.sessions().count("ehlo family.example") == 3
    assert "quit" not in server.sessions()
    assert len(server.mails()) == 3


# -- the SMTP client on its own, against the same real server -------------------------------

def client_settings(server: SmtpServer, security: str = "none", **env: Any) -> Any:
    return load_settings(_env_file=None, DATABASE_URL="postgresql://x@127.0.0.1/db",
                         **smtp_env(server, security), **env)


def outgoing(raw: bytes, n: int = 1) -> OutgoingMail:
    return OutgoingMail("noreply@family.example", "a@example.com", f"<{n}@family.example>", raw)


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])
async def test_lines_that_start_with_a_dot_arrive_intact(
        smtp_server: Callable[..., SmtpServer], pipelining: bool) -> None:
    """A line of a lone dot would end the message early; the client doubles leading dots
    and the server strips them again (RFC 5321 §4.5.2)."""
    server = smtp_server(pipelining=pipelining)
    raw = b"Subject: dots\n\n.\n.hidden line\n..two dots\nlast line without a newline"
    mailer = SmtpMailer(client_settings(server))
    try:
        assert await mailer.send(outgoing(raw)) == "<1@family.example>"
    finally:
        await mailer.aclose()
    [mail] = server.mails()
    body = str(mail.get_payload()).replace("\r\n", "\n")
    assert body == ".\n.hidden line\n..two dots\nlast line without a newline\n"
    assert "quit" in server.sessions()


async def test_the_slot_is_free_once_the_server_accepted_the_mail(
        smtp_server: Callable[..., SmtpServer]) -> None:
    """With a pool of one, the next mail takes the connection while the first mail's caller
    still holds its session (writing the ledger's verdict): same connection, no wait."""
    server = smtp_server(pipelining=True)
    mailer = SmtpMailer(client_settings(server, SMTP_POOL_SIZE=1))
    try:
        async with mailer.session() as first:
            await first.send(outgoing(b"Subject: 1\n\none\n", 1))
            with trio.fail_after(30):  # a bound for a broken pool, not a timing
                async with mailer.session() as second:
                    await second.send(outgoing(b"Subject: 2\n\ntwo\n", 2))
    finally:
        await mailer.aclose()
    assert [m["Subject"] for m in server.mails()] == ["1", "2"]
    await eventually(sessions_closed(server, 1))
    assert server.sessions() == ["ehlo family.example", "quit", "closed"]


@pytest.mark.parametrize(("security", "user", "expected"), [
    ("starttls", None, "does not offer STARTTLS, which SMTP_SECURITY=starttls asks for"),
    ("none", "mailer", "offers no AUTH, yet SMTP_USER is set"),
])
async def test_what_the_server_does_not_offer_is_an_outage_naming_the_setting(
        smtp_server: Callable[..., SmtpServer], tls_files: TlsFiles, security: str,
        user: str | None, expected: str) -> None:
    server = smtp_server()  # plain: no STARTTLS, no AUTH
    env: dict[str, Any] = {"SMTP_CA_FILE": str(tls_files.ca)}
    if user:
        env |= {"SMTP_USER": user, "SMTP_PASS": PASSWORD}
    mailer = SmtpMailer(client_settings(server, security, **env))
    try:
        with pytest.raises(RetryableError) as info:
            await mailer.send(outgoing(b"Subject: x\n\nx\n"))
    finally:
        await mailer.aclose()
    assert expected in str(info.value)
    assert "\n" not in str(info.value)
    assert PASSWORD not in str(info.value)
    assert info.value.outage
    assert server.mails() == []


def test_reactor_dev_honours_smtp_from_and_its_name(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in ("SMTP_FROM", "SMTP_FROM_NAME", "SMTP_REPLY_TO"):
        monkeypatch.delenv(name, raising=False)
    stack = DevStack(tmp_path / ".reactor")
    url = "postgresql://x@127.0.0.1/db"
    assert dev_settings(stack, url).smtp_from == "noreply@localhost"
    monkeypatch.setenv("SMTP_FROM", "hello@family.example")
    monkeypatch.setenv("SMTP_FROM_NAME", "Семейный центр")
    monkeypatch.setenv("SMTP_REPLY_TO", "support@family.example")
    settings = dev_settings(stack, url)
    assert settings.smtp_from == "hello@family.example"
    assert settings.smtp_from_name == "Семейный центр"
    assert settings.smtp_reply_to == "support@family.example"
    assert settings.email_provider == "file"


# -- through a real Postfix relay -------------------------------------------------------------

POSTFIX_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""

POSTFIX_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {base}/spool
data_directory = {base}/data
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
mail_owner = postfix
setgid_group = postdrop
myhostname = relay.test.example
mydomain = test.example
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{sink_port}
smtpd_helo_required = yes
smtpd_helo_restrictions = reject_non_fqdn_helo_hostname
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_peername_lookup = no
smtp_host_lookup = native
smtp_tls_security_level = none
smtputf8_enable = yes
smtpd_tls_security_level = none
alias_maps =
alias_database =
local_recipient_maps =
biff = no
"""


@dataclass
class PostfixRelay:
    port: int
    sink: SmtpServer
    base: Path

    def log(self) -> str:
        path = self.base / "maillog"
        return path.read_text() if path.exists() else ""


@pytest.fixture
def postfix_relay(smtp_server: Callable[..., SmtpServer]) -> Iterator[PostfixRelay]:
    """Debian's Postfix as a private instance on a loopback port (its own config,
    queue and log in a temporary directory; the system's Postfix, if any, is not
    touched), with `reject_non_fqdn_helo_hostname` and `smtputf8_enable`, relaying to
    the test server (which offers SMTPUTF8)."""
    if shutil.which("postfix") is None:
        pytest.skip("postfix is not installed: apt-get install -y postfix "
                    "(with 'No configuration'; no system service is needed)")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix instance needs root (its master runs as root)")
    sink = smtp_server(smtputf8=True)
    # Postfix's daemons run as the postfix user: the directory must be traversable.
    base = Path(tempfile.mkdtemp(prefix="reactor-postfix-"))
    base.chmod(0o755)
    (base / "etc").mkdir()
    (base / "data").mkdir()
    (base / "spool").mkdir()
    shutil.chown(base / "data", "postfix")
    relay = PostfixRelay(free_port(), sink, base)
    (base / "etc" / "main.cf").write_text(POSTFIX_MAIN_CF.format(base=base,
                                                                 sink_port=sink.port))
    (base / "etc" / "master.cf").write_text(POSTFIX_MASTER_CF.format(port=relay.port))
    command = ["postfix", "-c", str(base / "etc")]
    started = subprocess.run([*command, "start"], capture_output=True, text=True,
                             check=False, timeout=60)
    try:
        assert started.returncode == 0, f"postfix did not start:\n{relay.log()}"
        yield relay
    finally:
        subprocess.run([*command, "stop"], capture_output=True, check=False, timeout=60)
        # `postfix status` fails once the master has let go of its lock, i.e. exited.
        wait_until(lambda: subprocess.run([*command, "status"], capture_output=True,
                                          check=False, timeout=30).returncode != 0,
                   what="the Postfix master to exit")
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.process
def test_postfix_refuses_a_local_greeting(postfix_relay: PostfixRelay) -> None:
    """The relay of the next test really enforces what the issue saw in production."""
    import smtplib

    with smtplib.SMTP("127.0.0.1", postfix_relay.port, local_hostname="localhost",
                      timeout=30) as client, pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        client.sendmail("noreply@family.example", ["a@example.com"], b"Subject: x\n\nx\n")
    [(code, reply)] = info.value.recipients.values()
    assert code == 504
    assert b"need fully-qualified hostname" in reply


@pytest.mark.process
async def test_every_template_goes_through_postfix_with_reject_non_fqdn_helo(
        database_url: str, postfix_relay: PostfixRelay, tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    (reports / "u").mkdir(parents=True)
    (reports / "u" / "a.pdf").write_bytes(PDF)
    env: dict[str, Any] = {
        "EMAIL_PROVIDER": "smtp", "SMTP_HOST": "127.0.0.1", "SMTP_PORT": postfix_relay.port,
        "SMTP_SECURITY": "none", "SMTP_FROM": "noreply@family.example",
        "SMTP_FROM_NAME": "Семейный центр", "SMTP_POOL_SIZE": 1, "SMTP_POOL_IDLE_S": 0.5,
        "REPORTS_DIR": str(reports)}
    expected: dict[str, str] = {}
    async with running_reactor(database_url, **env) as reactor:
        with reactor.bus.subscribe() as sub:
            for template in sorted(REQUIRED_VARIABLES):
                for locale in LOCALES:
                    key = f"{template}-{locale}"
                    body: dict[str, Any] = {
                        "to": f"{key.replace('_', '.')}@example.com", "template": template,
                        "locale": locale, "idempotency_key": key,
                        "variables": {n: VALUES[n] for n in REQUIRED_VARIABLES[template]}}
                    if template == "report_ready":
                        body["attachments"] = [{"path": "u/a.pdf",
                                                "filename": "Отчёт Анны.pdf"}]
                    expected[body["to"]] = key
                    await send(database_url, "email_queue", body)
            done = await wait_for(sub, lambda e: e["type"] in (
                "job.succeeded", "job.retrying", "job.dead_lettered"), count=len(expected),
                within_s=60)
            assert {e["type"] for e in done} == {"job.succeeded"}, done
            mails = await wait_for_mails(postfix_relay.sink, len(expected), within_s=60)
            # Idle past SMTP_POOL_IDLE_S: the reactor ends the session with QUIT.
            await eventually(lambda: "quit=1" in postfix_relay.log(), within_s=30)
    log = postfix_relay.log()
    assert "Helo command rejected" not in log
    assert "timeout after" not in log
    # Postfix offers PIPELINING and checks that clients keep its rules (RFC 2920).
    assert "improper command pipelining" not in log
    assert sorted(m["To"] for m in mails) == sorted(expected)
    for mail in mails:
        # Postfix records the greeting it accepted in its Received header.
        assert mail["Received"].startswith("from family.example (")
        assert mail["Auto-Submitted"] == "auto-generated"
        assert mail["From"].addresses[0].display_name == "Семейный центр"
        for part in mail.walk():
            if part.get_content_maintype() == "text":
                assert part["Content-Transfer-Encoding"] in ("7bit", "quoted-printable")
    [report] = [m for m in mails if m["To"].startswith("report.ready-ru")]
    [pdf] = [p for p in report.walk() if p.get_content_type() == "application/pdf"]
    assert pdf.get_filename() == "Отчёт Анны.pdf"
    assert pdf.get_content() == PDF


@pytest.mark.process
async def test_internationalized_addresses_go_through_postfix_with_smtputf8(
        database_url: str, postfix_relay: PostfixRelay) -> None:
    """Issue 29: a Cyrillic local part goes through Postfix (smtputf8_enable) with
    SMTPUTF8 end to end; an IDN domain in its A-label form, which needs no SMTPUTF8.
    What reaches the sink past Postfix is checked byte for byte (Postfix adds only its
    Received header)."""
    env: dict[str, Any] = {
        "EMAIL_PROVIDER": "smtp", "SMTP_HOST": "127.0.0.1", "SMTP_PORT": postfix_relay.port,
        "SMTP_SECURITY": "none", "SMTP_FROM": "noreply@family.example", "SMTP_TIMEOUT_S": 10}
    async with running_reactor(database_url, **env) as reactor:
        with reactor.bus.subscribe() as sub:
            await send(database_url, "email_queue", idn.mail_to(idn.UTF8_LOCAL, "pf-utf8"))
            await send(database_url, "email_queue", idn.mail_to(idn.IDN_DOMAIN, "pf-idn"))
            done = await wait_for(sub, lambda e: e["type"] in (
                "job.succeeded", "job.retrying", "job.dead_lettered"), count=2, within_s=60)
            assert {e["type"] for e in done} == {"job.succeeded"}, done
            await eventually(lambda: len(postfix_relay.sink.raw()) == 2, within_s=60)
    sink = postfix_relay.sink
    by_rcpt = {idn.envelope(meta)["rcpt_to"]: (idn.envelope(meta), raw)
               for meta, raw in zip(sink.meta(), sink.raw(), strict=True)}
    assert sorted(by_rcpt) == sorted([idn.IDN_DOMAIN_ASCII, idn.UTF8_LOCAL])
    for address, smtputf8 in ((idn.UTF8_LOCAL, "True"), (idn.IDN_DOMAIN_ASCII, "False")):
        meta, raw = by_rcpt[address]
        assert meta["smtputf8"] == smtputf8, meta
        assert meta["mail_from"] == "noreply@family.example"
        assert raw.startswith(b"Received: from family.example (")
        received_end = raw.index(b"\r\nFrom: ") + 2
        assert idn.header_block(raw[received_end:]) == idn.expected_headers(raw, address)
    assert "status=sent" in postfix_relay.log()


def test_any_subject_and_display_name_round_trip_within_the_limits() -> None:
    import random

    rng = random.Random(17)
    alphabet = "абвгдеЖЗИЙ ёЁ—«»😀 abc XYZ 0123 ,.:!?=_\"'"
    for _ in range(200):
        subject = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 160)))
        subject = " ".join(subject.split())
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 90))).strip() or "x"
        out = build_message(sender="noreply@family.example", sender_name=name,
                            to="a@example.com", email=RenderedEmail(subject, "t\n", "h\n"))
        for line in header_section(out.raw):
            assert len(line) <= 78, line
            assert all(len(word) <= 75 for word in ENCODED_WORD.findall(line)), line
        mail = email.message_from_bytes(out.raw, policy=email.policy.default)
        assert mail["Subject"] == subject
        assert mail["From"].addresses[0].addr_spec == "noreply@family.example"


@pytest.mark.process
def test_a_replica_frozen_past_its_leases_causes_no_dead_letter_and_no_second_mail(
        database_url: str, tmp_path: Path) -> None:
    """Two `reactor run`s on one database; one is frozen (SIGSTOP: a long GC pause, a VM
    migration) past the visibility timeout while the other goes on, then thawed. The
    other found mails 'sending' under the frozen one's claim: it waited instead of
    dead-lettering them, and the frozen one's 'sent' verdicts, written when it woke,
    settled them. 0 dead letters, every mail exactly once."""
    total = 1000  # enough that the first replica is mid-burst when it is frozen
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT public.enqueue('email_queue', jsonb_build_object("
                     "'to', 'u' || i || '@example.com', 'template', 'checkup_completed', "
                     "'locale', 'en', 'idempotency_key', 'freeze-' || i, 'variables', "
                     "jsonb_build_object('full_name', 'A', 'assessment_id', i::text))) "
                     "FROM generate_series(1, %s) AS i", (total,))
    # The freeze must stay within the verdict bound (10 + 4 × SMTP_TIMEOUT_S + 30 s after a
    # claim: 100 s here), past which a claim is truly unknown and dead-lettered (to resolve
    # itself later). It lasts until the other replica meets a frozen claim, which took over
    # 48 s (the bound with SMTP_TIMEOUT_S=2) on a machine running two suites at once.
    env = {"VISIBILITY_TIMEOUT_S": "2", "WORKER_INTERVAL_MS": "300", "SMTP_TIMEOUT_S": "15",
           "EMAIL_OUTBOX_DIR": str(tmp_path / "outbox")}
    frozen_log, other_log = tmp_path / "frozen.log", tmp_path / "other.log"

    def sent() -> int:
        return int(scalar(database_url, "SELECT count(*) FROM public.email_ledger "
                                        "WHERE status = 'sent'"))

    with reactor_process(database_url, frozen_log, **env) as frozen:
        wait_until(lambda: sent() >= 20, what="the first replica to be sending")
        frozen.send_signal(signal.SIGSTOP)
        with reactor_process(database_url, other_log, **env) as other:
            try:
                # The other replica takes over what the frozen one had leased: it finds
                # their ledger rows 'sending' and puts them back to look again.
                wait_until(lambda: any(("is being sent by message" in str(e.get("error"))
                                        or "delivery state unknown" in str(e.get("error")))
                                       for e in log_lines(other_log)),
                           within_s=60, what="the other replica to meet a frozen claim")
            finally:
                frozen.send_signal(signal.SIGCONT)
            wait_until(lambda: scalar(database_url, "SELECT count(*) FROM pgmq.q_email_queue")
                       == 0, within_s=120, what="both replicas to drain the queue")
            other.send_signal(signal.SIGTERM)
            assert other.wait(timeout=30) == 0
        frozen.send_signal(signal.SIGTERM)
        assert frozen.wait(timeout=30) == 0
    assert scalar(database_url, "SELECT count(*) FROM pgmq.q_email_queue_dlq") == 0
    assert sent() == total
    recipients = [email.message_from_bytes(p.read_bytes(), policy=email.policy.default)["To"]
                  for p in (tmp_path / "outbox").glob("*.eml")]
    assert len(recipients) == total
    assert len(set(recipients)) == total  # none twice
