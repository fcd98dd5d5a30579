"""Issue 33: deferrals (a relay's 4xx) are waited out on a time budget, and no message
field can add a header line or a MIME part. Against a real relay (aiosmtpd, in a
subprocess): what it received is checked as bytes."""

from __future__ import annotations

import email.policy
import re
from collections.abc import Callable
from datetime import UTC, datetime
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest

from reactor.clinic.email import EmailProcessor
from reactor.clinic.services.mailer.smtp import (
    SmtpDeferred,
    SmtpRecipientRefused,
    SmtpReplyError,
    SmtpSessionRefused,
    classify,
)
from reactor.clinic.settings import ConfigError
from reactor.engine.db import Database
from reactor.engine.errors import PermanentError, RetryableError
from reactor.engine.queues import Message
from tests.clinic.email.test_email import smtp_env
from tests.conftest import SmtpServer
from tests.harness import (
    eventually,
    of_type,
    processor_context,
    running_reactor,
    send,
    settings_for,
    sql,
    wait_for,
)

# The count budget the old code had for a 4xx: 3 deliveries, 1 s and 2 s apart.
COUNT_BUDGET: dict[str, Any] = {"MAX_ATTEMPTS": 3, "RETRY_BASE_S": 1, "RETRY_MAX_S": 2}
# Deferrals in the tests: 1 s, then 2 s apart.
QUICK_DEFERRALS: dict[str, Any] = {"SMTP_DEFER_BACKOFF_S": 1, "SMTP_DEFER_BACKOFF_MAX_S": 2}


def checkup(to: str, **extra: Any) -> dict[str, Any]:
    return {"to": to, "template": "checkup_completed", "locale": "en",
            "variables": {"full_name": "A", "assessment_id": "1"}, **extra}


def finished(event: dict[str, Any]) -> bool:
    return event["type"] in ("job.succeeded", "job.dead_lettered")


# -- deferrals ------------------------------------------------------------------------------

async def test_a_greylist_longer_than_the_retry_budget_ends_with_the_mail_delivered_once(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    """The relay greylists one recipient for 20 s: ten times the longest backoff, so
    far more deliveries than MAX_ATTEMPTS allows (the old count budget gave up after
    ~3 s, on the third). The mail goes out once after the greylist lifts; other mails
    flow meanwhile."""
    greylist_s = 20
    server = smtp_server(greylist={"grey@example.com": greylist_s})
    async with running_reactor(database_url, **smtp_env(server, "none"), **COUNT_BUDGET,
                               **QUICK_DEFERRALS, SMTP_DEFER_MAX_S=300) as reactor:
        with reactor.bus.subscribe() as sub:
            grey_id = await send(database_url, "email_queue", checkup("grey@example.com"))
            await eventually(lambda: len(server.deferrals()) >= 1)
            others = [await send(database_url, "email_queue", checkup(f"p{n}@example.com"))
                      for n in range(3)]
            # The others arrive while the grey mail is still being deferred.
            await eventually(lambda: len(server.mails()) >= 3)
            assert {str(m["To"]) for m in server.mails()} == {
                f"p{n}@example.com" for n in range(3)}
            events = await wait_for(sub, finished, count=4, within_s=greylist_s + 60)
            deferred = [e for e in reactor.bus.recent if e["type"] == "job.deferred"]
    assert [e["type"] for e in events] == ["job.succeeded"] * 4, events
    received = [str(m["To"]) for m in server.mails()]
    assert sorted(received) == sorted(["grey@example.com", *(f"p{n}@example.com"
                                                            for n in range(3))])
    assert received.count("grey@example.com") == 1
    tries = len(server.deferrals())
    assert tries > COUNT_BUDGET["MAX_ATTEMPTS"]
    # Each deferral is a job.deferred event (never job.retrying), chained by requeued_as.
    assert len(deferred) == tries
    assert all("451 4.7.1" in e["error"] for e in deferred)
    assert deferred[0]["msg_id"] == grey_id
    assert [e["msg_id"] for e in deferred[1:]] == [e["requeued_as"] for e in deferred[:-1]]
    assert not [e for e in reactor.bus.recent if e["type"] == "job.retrying"]
    assert {e["msg_id"] for e in events} == {deferred[-1]["requeued_as"], *others}
    metrics = reactor.metrics.render().decode()
    assert f'reactor_jobs_deferred_total{{queue="email_queue"}} {float(tries)}' in metrics
    retried = [line for line in metrics.splitlines()
               if line.startswith("reactor_jobs_total{") and 'outcome="retried"' in line]
    assert retried
    assert all(line.endswith(" 0.0") for line in retried), retried
    # One ledger row for the mail (the key was kept across requeues), sent; the archive
    # holds it once (deferred deliveries are not done); nothing dead-lettered.
    rows = await sql(database_url, "SELECT recipient, status, attempts FROM "
                                   "public.email_ledger WHERE recipient = 'grey@example.com'")
    assert rows == [("grey@example.com", "sent", tries + 1)]
    assert await sql(database_url, "SELECT count(*) FROM pgmq.a_email_queue") == [(4,)]
    assert await sql(database_url, "SELECT count(*) FROM pgmq.q_email_queue") == [(0,)]
    assert await sql(database_url, "SELECT count(*) FROM pgmq.q_email_queue_dlq") == [(0,)]


async def test_a_spent_deferral_budget_dead_letters_with_the_last_reply_and_how_long(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    server = smtp_server(greylist={"grey@example.com": 100_000})
    async with running_reactor(database_url, **smtp_env(server, "none"), **QUICK_DEFERRALS,
                               SMTP_DEFER_MAX_S=3) as reactor:
        with reactor.bus.subscribe() as sub:
            await send(database_url, "email_queue", checkup("grey@example.com"))
            [event] = await wait_for(sub, of_type("job.dead_lettered"), within_s=60)
    assert "451 4.7.1" in event["error"]
    assert re.search(r"deferred for \d+s, \d+ tries", event["error"]), event["error"]
    assert "gave up after SMTP_DEFER_MAX_S=3" in event["error"]
    assert event["attempt"] == 1  # the count budget was never touched
    [(letter,)] = await sql(database_url, "SELECT message FROM pgmq.q_email_queue_dlq")
    assert "451 4.7.1" in letter["error"]
    # A replay is a fresh try (a new budget), of the same mail for the ledger.
    assert letter["original"]["deferred_since"] is None
    assert letter["original"]["deferrals"] == 0
    assert letter["original"]["idempotency_key"].startswith("email_queue:")
    assert server.mails() == []


async def test_a_4xx_at_the_end_of_data_is_a_deferral_too(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    server = smtp_server(greylist_data={"full@example.com": 3})
    async with running_reactor(database_url, **smtp_env(server, "none"), **QUICK_DEFERRALS,
                               **COUNT_BUDGET) as reactor:
        with reactor.bus.subscribe() as sub:
            await send(database_url, "email_queue", checkup("full@example.com",
                                                            idempotency_key="k-full"))
            [deferral] = await wait_for(sub, of_type("job.deferred"))
            await wait_for(sub, finished, within_s=60)
    assert "at DATA: 452 4.3.1" in deferral["error"]
    assert [str(m["To"]) for m in server.mails()] == ["full@example.com"]
    assert await sql(database_url, "SELECT status FROM public.email_ledger") == [("sent",)]


async def test_a_deferral_stamp_from_the_future_is_not_trusted(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    """The stamp is in the body, which a producer writes: one in the future counts from
    now, so it can never keep a mail deferred beyond the budget."""
    from reactor.engine.errors import Deferred  # here: the code before issue 33 lacks it

    server = smtp_server(greylist={"grey@example.com": 100_000})
    settings = settings_for(database_url, **smtp_env(server, "none"), **QUICK_DEFERRALS)
    body = checkup("grey@example.com", deferred_since="2999-01-01T00:00:00+00:00",
                   deferrals=2)
    async with Database(database_url).opened() as db:
        processor = EmailProcessor(processor_context("email_queue", db, settings))
        async with processor.running():
            with pytest.raises(Deferred) as caught:
                await processor.handle(processor.parse(
                    Message("email_queue", 5, 1, datetime.now(UTC), body)))
    assert caught.value.stamp is not None
    since = datetime.fromisoformat(caught.value.stamp["deferred_since"])
    assert since <= datetime.now(UTC)
    assert caught.value.stamp["deferrals"] == 3
    assert caught.value.stamp["idempotency_key"].startswith("email_queue:5:")
    assert server.mails() == []


# -- header fields ----------------------------------------------------------------------------

SPY = "spy@attacker.example"
# (the message's fields, what the reason must name): CR/LF, NUL and `;` parameters in
# every field that reaches a header.


def attach(**ref: str) -> dict[str, Any]:
    """An `attachments` field with one file (u1/r.pdf unless `path` says otherwise)."""
    return {"attachments": [{"path": "u1/r.pdf", **ref}]}


BAD_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("to-crlf", {"to": f"a@example.com\r\nBcc: {SPY}"}, "to:"),
    ("to-nul", {"to": "a@example.com\x00"}, "to:"),
    ("to-param", {"to": f"a@example.com; bcc={SPY}"}, "to:"),
    ("subject-crlf", {"subject": f"Hi\r\nBcc: {SPY}"}, "subject:"),
    ("subject-nul", {"subject": "Hi\x00there"}, "subject:"),
    ("content-type-crlf",
     attach(content_type=f"application/pdf\r\nBcc: {SPY}\r\nX-Injected: 1"),
     "attachments.0.content_type:"),
    ("content-type-part",
     attach(content_type="text/html\r\n\r\n<h1>pay again at https://evil.example</h1>"),
     "attachments.0.content_type:"),
    ("content-type-nul", attach(content_type="application/pdf\x00"),
     "attachments.0.content_type:"),
    ("content-type-param", attach(content_type="application/pdf; name=evil.exe"),
     "attachments.0.content_type:"),
    ("content-type-not-allowed", attach(content_type="text/html"),
     "attachments.0.content_type:"),
    ("filename-crlf", attach(filename=f"r.pdf\r\nBcc: {SPY}"), "attachments.0.filename:"),
    ("filename-nul", attach(filename="r\x00.pdf"), "attachments.0.filename:"),
    ("filename-param", attach(filename='r.pdf"; name="evil.exe'), "attachments.0.filename:"),
    ("path-crlf", attach(path="u1/r\r\nBcc: x.pdf"), "attachments.0.path:"),
    ("path-nul", attach(path="u1/r\x00.pdf"), "attachments.0.path:"),
    ("path-param", attach(path="u1/r.pdf;name=evil.exe"), "attachments.0: Value error, path:"),
]
# Template variables that reach the Subject header (payment_confirmation's subject
# shows the amount and currency).
PAYMENT = {"full_name": "A", "amount": "10", "currency": "RUB", "appointment_id": "x",
           "scheduled_at": "2026-12-01T09:00:00+00:00"}
BAD_VARIABLES: list[tuple[str, dict[str, Any], str]] = [
    ("currency-crlf", {"currency": f"RUB\r\nBcc: {SPY}"}, "variables.currency:"),
    ("currency-nul", {"currency": "RUB\x00"}, "variables.currency:"),
    ("currency-param", {"currency": "RUB; x=y"}, "variables.currency:"),
    ("amount-crlf", {"amount": f"10\r\nBcc: {SPY}"}, "variables.amount:"),
    ("amount-nul", {"amount": "10\x00"}, "variables.amount:"),
]


async def test_no_bad_header_field_reaches_the_relay(
        database_url: str, smtp_server: Callable[..., SmtpServer], tmp_path: Path) -> None:
    """Every bad value is refused before the SMTP conversation, naming the field (driven
    through the processor: NUL cannot even be queued, Postgres' jsonb refuses it); then a
    good mail with the same attachment shows the relay works, and what it received."""
    server = smtp_server()
    reports = tmp_path / "reports"
    (reports / "u1").mkdir(parents=True)
    (reports / "u1" / "r.pdf").write_bytes(b"%PDF-1.4 test\n")
    settings = settings_for(database_url, REPORTS_DIR=str(reports), **smtp_env(server, "none"))
    cases = [({**checkup("a@example.com"), **fields}, reason, case)
             for case, fields, reason in BAD_FIELDS]
    cases += [({"to": "a@example.com", "template": "payment_confirmation", "locale": "en",
                "variables": {**PAYMENT, **variables}}, reason, case)
              for case, variables, reason in BAD_VARIABLES]
    async with Database(database_url).opened() as db:
        processor = EmailProcessor(processor_context("email_queue", db, settings))
        async with processor.running():
            for n, (body, field, case) in enumerate(cases, start=1):
                delivery = Message("email_queue", n, 1, datetime.now(UTC), body)
                with pytest.raises(PermanentError) as refused:
                    await processor.handle(processor.parse(delivery))
                assert field in str(refused.value), (case, str(refused.value))
            assert server.mails() == []
            assert server.sessions() == []  # refused before any SMTP conversation
            good = checkup("a@example.com", subject="Report; name=x (1 of 2)", attachments=[
                {"path": "u1/r.pdf", "filename": "Отчёт по чекапу.pdf",
                 "content_type": "application/pdf"}])
            good["variables"]["full_name"] = "A\r\n\r\n--boundary\r\nContent-Type: text/html"
            await processor.handle(processor.parse(
                Message("email_queue", 999, 1, datetime.now(UTC), good)))
    [path] = sorted(server.maildir.glob("*.eml"))
    raw = path.read_bytes()
    assert b"\x00" not in raw
    assert SPY.encode() not in raw
    assert b"X-Injected" not in raw
    assert b"evil" not in raw
    mail = message_from_bytes(raw, policy=email.policy.default)
    assert sorted(mail.keys()) == sorted(["From", "To", "Subject", "Date", "Message-ID",
                                          "MIME-Version", "Auto-Submitted",
                                          "X-Auto-Response-Suppress", "Content-Type"])
    assert mail["Subject"] == "Report; name=x (1 of 2)"  # text of the subject, no parameter
    assert [p.get_content_type() for p in mail.walk()] == [
        "multipart/mixed", "multipart/alternative", "text/plain", "text/html",
        "application/pdf"]
    [pdf] = [p for p in mail.walk() if p.get_content_type() == "application/pdf"]
    assert pdf.get_filename() == "Отчёт по чекапу.pdf"
    assert sorted(pdf.keys()) == ["Content-Disposition", "Content-Transfer-Encoding",
                                  "Content-Type"]
    assert set(pdf["Content-Type"].params) == {"name"}


@pytest.mark.parametrize("content_type", [
    f"application/pdf\r\nBcc: {SPY}\r\nX-Injected: 1",
    "text/html\r\n\r\n<h1>Payment failed: pay again at https://evil.example</h1>",
])
async def test_the_issues_content_type_injections_are_dead_lettered_through_the_queue(
        database_url: str, smtp_server: Callable[..., SmtpServer], tmp_path: Path,
        content_type: str) -> None:
    server = smtp_server()
    reports = tmp_path / "reports"
    (reports / "u1").mkdir(parents=True)
    (reports / "u1" / "r.pdf").write_bytes(b"%PDF-1.4 test\n")
    body = checkup("a@example.com", attachments=[{"path": "u1/r.pdf",
                                                  "content_type": content_type}])
    async with running_reactor(database_url, REPORTS_DIR=str(reports),
                               **smtp_env(server, "none")) as reactor:
        with reactor.bus.subscribe() as sub:
            await send(database_url, "email_queue", body, notify=True)
            [event] = await wait_for(sub, of_type("job.dead_lettered"))
    assert event["attempt"] == 1
    assert "attachments.0.content_type:" in event["error"]
    assert SPY not in event["error"]  # masked
    assert server.mails() == []
    assert list(server.maildir.glob("*.eml")) == []
    assert server.sessions() == []


@pytest.mark.parametrize(("exc", "kind"), [
    (SmtpRecipientRefused("RCPT TO", 451, "4.7.1 Greylisted"), SmtpDeferred),
    (SmtpReplyError("MAIL FROM", 450, "4.7.1 rate limited"), SmtpDeferred),
    (SmtpReplyError("DATA", 452, "4.3.1 Insufficient system storage"), SmtpDeferred),
    (SmtpRecipientRefused("RCPT TO", 550, "5.1.1 User unknown"), PermanentError),
    (SmtpReplyError("DATA", 554, "5.7.1 rejected"), PermanentError),
])
def test_a_4xx_to_mail_rcpt_or_data_is_a_deferral_and_a_5xx_stays_permanent(
        exc: Exception, kind: type[Exception]) -> None:
    assert type(classify(exc)) is kind


def test_a_4xx_to_the_session_is_an_outage_not_a_deferral() -> None:
    verdict = classify(SmtpSessionRefused("the greeting", 421, "4.7.0 too many connections"))
    assert not isinstance(verdict, SmtpDeferred)
    assert isinstance(verdict, RetryableError)
    assert verdict.outage


def test_the_deferral_settings_are_checked_with_one_line(database_url: str) -> None:
    with pytest.raises(ConfigError, match="SMTP_DEFER_BACKOFF_MAX_S=10 is below "
                                          "SMTP_DEFER_BACKOFF_S=60"):
        settings_for(database_url, SMTP_DEFER_BACKOFF_MAX_S=10)
    with pytest.raises(ConfigError, match="SMTP_DEFER_MAX_S"):
        settings_for(database_url, SMTP_DEFER_MAX_S=0)
    defaults = settings_for(database_url)
    assert (defaults.smtp_defer_max_s, defaults.smtp_defer_backoff_s,
            defaults.smtp_defer_backoff_max_s) == (86_400, 60, 900)
