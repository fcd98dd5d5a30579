"""Email delivery against a real SMTP server (aiosmtpd, in a subprocess)."""

from __future__ import annotations

import email.policy
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from reactor.db import Database
from reactor.processors.base import PermanentError
from reactor.processors.email import EmailProcessor
from reactor.queues import Message
from tests import factories as f
from tests.conftest import SmtpServer, TlsFiles
from tests.harness import of_type, running_reactor, send, settings_for, sql, wait_for

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
                         within_s: float = 10) -> list[EmailMessage]:
    with trio.fail_after(within_s):
        while len(server.mails()) < count:  # noqa: ASYNC110 - files of another process
            await trio.sleep(0.02)
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
            await sql(database_url, "INSERT INTO public.profiles (email, full_name, locale) "
                                    "VALUES ('anna@example.com', 'Анна Петрова', 'ru')")
            await sql(database_url, "INSERT INTO public.appointments (user_id, specialist_name, "
                                    "scheduled_at) SELECT id, 'Д-р Иванова', "
                                    "'2026-12-01 09:00+00' FROM public.profiles")
            [mail] = await wait_for_mails(server)
            await wait_for(sub, of_type("job.succeeded"))
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
        await sql(database_url, "INSERT INTO public.profiles (email, full_name, locale) "
                                "VALUES ('john@example.com', 'John Smith', 'en')")
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


async def test_rejected_recipient_is_dead_lettered_with_the_reply(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    server = smtp_server(reject=["nobody@example.com"])
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


async def test_greylisting_4xx_is_retried(database_url: str,
                                          smtp_server: Callable[..., SmtpServer]) -> None:
    server = smtp_server(defer=["grey@example.com"])
    async with running_reactor(database_url, **smtp_env(server, "none")) as reactor:
        with reactor.bus.subscribe() as sub:
            await send(database_url, "email_queue", {
                "to": "grey@example.com", "template": "checkup_completed", "locale": "ru",
                "variables": {"full_name": "A", "assessment_id": "1"}})
            [event] = await wait_for(sub, of_type("job.retrying"))
    assert "451 4.7.1" in event["error"]


@pytest.mark.parametrize("body", [
    {"to": "a@example.com\r\nBcc: victim@example.com", "template": "checkup_completed"},
    {"to": "not an address", "template": "checkup_completed"},
    {"to": "a@example.com", "subject": "Hi\r\nBcc: victim@example.com",
     "template": "checkup_completed"},
    {"to": "a@example.com", "template": "../../etc/passwd"},
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
    assert server.mails() == []


async def test_redelivery_after_a_crash_between_send_and_archive_sends_once(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    server = smtp_server()
    settings = settings_for(database_url, **smtp_env(server, "none"))
    body = {"to": "a@example.com", "template": "checkup_completed", "locale": "en",
            "variables": {"full_name": "A", "assessment_id": "1"}}
    delivery = Message("email_queue", 41, 1, datetime.now(UTC), body)
    async with Database(database_url).opened() as db:
        processor = EmailProcessor(settings, db)
        async with processor.running():
            await processor.handle(processor.parse(delivery))
            # The process died before the archive: the message comes back.
            await processor.handle(processor.parse(Message("email_queue", 41, 2,
                                                           datetime.now(UTC), body)))
    assert len(server.mails()) == 1


async def test_a_send_of_unknown_outcome_is_dead_lettered_not_repeated(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    server = smtp_server()
    settings = settings_for(database_url, **smtp_env(server, "none"))
    await sql(database_url, "INSERT INTO public.email_ledger (idempotency_key, queue, msg_id, "
                            "recipient, template, status) VALUES ('email_queue:7', "
                            "'email_queue', 7, 'a@example.com', 'checkup_completed', 'sending')")
    body = {"to": "a@example.com", "template": "checkup_completed", "locale": "en",
            "variables": {"full_name": "A", "assessment_id": "1"}}
    async with Database(database_url).opened() as db:
        processor = EmailProcessor(settings, db)
        async with processor.running():
            with pytest.raises(PermanentError, match="delivery state unknown"):
                await processor.handle(processor.parse(
                    Message("email_queue", 7, 2, datetime.now(UTC), body)))
    assert server.mails() == []


async def test_file_outbox_writes_whole_eml_files(database_url: str, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    async with running_reactor(database_url, EMAIL_PROVIDER="file",
                               EMAIL_OUTBOX_DIR=str(outbox)) as reactor:
        with reactor.bus.subscribe() as sub:
            user = await sql(database_url, "INSERT INTO public.profiles (email, full_name, locale)"
                                           " VALUES ('b@example.com', 'Борис', 'ru') RETURNING id")
            await sql(database_url, "INSERT INTO public.appointments (user_id, specialist_name, "
                                    "scheduled_at) VALUES (%s, 'Dr. X', now() + interval '2 days')",
                      (user[0][0],))
            await wait_for(sub, lambda e: e["type"] == "job.succeeded"
                           and e["queue"] == "email_queue")
    [path] = list(outbox.iterdir())  # no temporary file left behind
    assert path.suffix == ".eml"
    mail = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert mail["To"] == "b@example.com"
    assert mail["Subject"].startswith("Консультация записана")


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
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "reactor", "run"], stdout=out, stderr=out, cwd=tmp_path,
            env={"PATH": os.environ["PATH"], "DATABASE_URL": database_url, "LOG_FORMAT": "json",
                 "RETRY_BASE_S": "1", "WORKER_INTERVAL_MS": "60000", **env})
    try:
        deadline = time.monotonic() + 30
        while log.read_text().count("job.retrying") < 2:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "SMTP authentication failed: check SMTP_USER and SMTP_PASS" in text
    assert "wrong-password-123" not in text
    assert "maria.ivanova@example.com" not in text
    assert "Traceback" not in text
    assert server.mails() == []
