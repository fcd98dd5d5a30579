"""Internationalized addresses end to end (issue 29): `user@пример.рф` and `мама@example.org`.

Through a real relay (aiosmtpd, in a subprocess) with and without SMTPUTF8, what
arrives is checked byte for byte: the envelope (aiosmtpd reads commands as strict ASCII
without SMTPUTF8 and as strict UTF-8 with it, so the text it records is the bytes that
came) and the header block. The SQL side (044) and the reactor's validator agree on
samples; a trigger-queued mail to such a profile goes out; the file outbox writes what
SMTP sends. (Through Postfix with smtputf8_enable: test_email.py.)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from pydantic import ValidationError

from reactor.clinic.email import EmailMessage
from reactor.clinic.services.mailer import WireAddress, build_message, wire_address
from reactor.clinic.services.templates import RenderedEmail
from reactor.engine.logs import mask_email, mask_emails_in
from tests import factories as f
from tests.conftest import SmtpServer
from tests.harness import (
    eventually,
    in_db,
    of_type,
    reactor_command,
    running_reactor,
    send,
    sql,
    wait_for,
)

IDN_DOMAIN = "user@пример.рф"
IDN_DOMAIN_ASCII = "user@xn--e1afmkfd.xn--p1ai"
UTF8_LOCAL = "мама@example.org"

# Addresses the reactor accepts, of every kind it knows (the SQL side must accept them).
ACCEPTED = [IDN_DOMAIN, UTF8_LOCAL, "мама@пример.рф", IDN_DOMAIN_ASCII, "USER@ПРИМЕР.РФ",
            "Иван.Петров@почта.рф", "user@пример。рф", "ß@straße.de", "o'brien+kids@example.com",
            "a@example.com", "ёжик@xn--e1afmkfd.xn--p1ai"]
# Not addresses, for both ends (SQL refuses them at enqueue too).
REFUSED_BOTH = ["not an address", "", "user@@example.com", "anna@example.com, b@example.com",
                "a@example.com\r\nBcc: victim@example.com", "a b@example.com", "<a@example.com>",
                '"a b"@example.com', "a@[192.0.2.1]", "a" * 243 + "@example.com",
                "user@localhost"]
# Shaped like an address (SQL lets them through) but not one: the reactor dead-letters them.
REFUSED_BY_THE_REACTOR = ["a..b@example.com", "a@x.test", "a@-x.org", "user@пример.рф-"]


def smtp_env(server: SmtpServer, **extra: Any) -> dict[str, Any]:
    return {"EMAIL_PROVIDER": "smtp", "SMTP_HOST": "127.0.0.1", "SMTP_PORT": server.port,
            "SMTP_SECURITY": "none", "SMTP_FROM": "noreply@family.example",
            "SMTP_TIMEOUT_S": 5, **extra}


def mail_to(address: str, key: str) -> dict[str, Any]:
    return {"to": address, "subject": "Check", "template": "checkup_completed", "locale": "en",
            "idempotency_key": key, "variables": {"full_name": "Мария", "assessment_id": "1"}}


def header_block(raw: bytes) -> bytes:
    return raw.partition(b"\r\n\r\n")[0] + b"\r\n"


def expected_headers(raw: bytes, to: str) -> bytes:
    """The header block the reactor writes for mail_to() (Date, Message-ID and the
    boundary taken from the mail itself), CRLF as on the wire."""
    date = re.search(rb"^Date: (.*)\r$", raw, re.M)
    message_id = re.search(rb"^Message-ID: (.*)\r$", raw, re.M)
    boundary = re.search(rb'boundary="(=_[0-9a-f]{24})"', raw)
    assert date, raw[:600]
    assert message_id, raw[:600]
    assert boundary, raw[:600]
    return (b"From: noreply@family.example\r\n"
            b"To: " + to.encode() + b"\r\n"
            b"Subject: Check\r\n"
            b"Date: " + date[1] + b"\r\n"
            b"Message-ID: " + message_id[1] + b"\r\n"
            b"Auto-Submitted: auto-generated\r\n"
            b"X-Auto-Response-Suppress: OOF, AutoReply\r\n"
            b"MIME-Version: 1.0\r\n"
            b'Content-Type: multipart/alternative; boundary="' + boundary[1] + b'"\r\n')


def envelope(meta: str) -> dict[str, str]:
    """What tests/smtp_server.py recorded of the envelope."""
    lines = meta.splitlines()
    fields = dict(line.split("=", 1) for line in lines[2:])
    return {"mail_from": lines[0], "rcpt_to": lines[1], **fields}


# -- the address and its wire form -------------------------------------------------------------

@pytest.mark.parametrize(("address", "wire", "smtputf8"), [
    (IDN_DOMAIN, IDN_DOMAIN_ASCII, False),
    (IDN_DOMAIN_ASCII, IDN_DOMAIN_ASCII, False),
    ("USER@ПРИМЕР.РФ", "USER@xn--e1afmkfd.xn--p1ai", False),  # the local part keeps its case
    ("user@пример。рф", IDN_DOMAIN_ASCII, False),  # an ideographic full stop is a dot (IDNA)
    (UTF8_LOCAL, UTF8_LOCAL, True),
    ("мама@xn--e1afmkfd.xn--p1ai", "мама@пример.рф", True),
    ("e\u0301@example.org", "\u00e9@example.org", True),  # NFC (RFC 6532 §3.1)
    ("a@example.com", "a@example.com", False),
])
def test_the_wire_form_is_ascii_wherever_the_address_has_one(
        address: str, wire: str, smtputf8: bool) -> None:
    assert wire_address(address) == WireAddress(wire, smtputf8)
    assert EmailMessage.model_validate(mail_to(address, "k")).to == address  # kept as given


@pytest.mark.parametrize("address", REFUSED_BOTH + REFUSED_BY_THE_REACTOR)
def test_what_is_not_an_address_is_refused_with_the_validators_reason(address: str) -> None:
    with pytest.raises(ValidationError) as raised:
        EmailMessage.model_validate(mail_to(address, "k"))
    [error] = raised.value.errors()
    assert error["loc"] == ("to",)
    assert error["msg"].startswith("Value error, not a valid email address: ")
    assert len(error["msg"]) > len("Value error, not a valid email address: ") + 10


def test_the_to_header_is_the_wire_form() -> None:
    rendered = RenderedEmail(subject="Check", text="t", html="<p>t</p>")
    ascii_mail = build_message(sender="noreply@family.example", sender_name=None,
                               to=IDN_DOMAIN, email=rendered)
    assert (ascii_mail.recipient, ascii_mail.smtputf8) == (IDN_DOMAIN_ASCII, False)
    assert ascii_mail.raw.isascii()
    assert b"\nTo: user@xn--e1afmkfd.xn--p1ai\n" in ascii_mail.raw
    utf8_mail = build_message(sender="noreply@family.example", sender_name=None,
                              to=UTF8_LOCAL, email=rendered)
    assert (utf8_mail.recipient, utf8_mail.smtputf8) == (UTF8_LOCAL, True)
    assert "\nTo: мама@example.org\n".encode() in utf8_mail.raw  # RFC 6532: UTF-8 as it is
    # Nothing else of the mail changes: only the To header is 8-bit.
    assert [line for line in utf8_mail.raw.split(b"\n") if not line.isascii()] == [
        "To: мама@example.org".encode()]


@pytest.mark.parametrize(("text", "masked"), [
    (UTF8_LOCAL, "м***@example.org"),
    (f"550 5.1.1 <{IDN_DOMAIN}>: no such user", "550 5.1.1 <u***@пример.рф>: no such user"),
    ("to Иван.Петров@почта.рф and ёжик@xn--e1afmkfd.xn--p1ai.",
     "to И***@почта.рф and ё***@xn--e1afmkfd.xn--p1ai."),
    ("«мама@пример.рф»", "«***@пример.рф»"),  # never the tail of the local part alone
    ("e\u0301\u0301x@example.org", "e***@example.org"),  # combining marks: masked whole
])
def test_internationalized_addresses_are_masked(text: str, masked: str) -> None:
    assert mask_emails_in(text) == masked
    assert mask_email(UTF8_LOCAL) == "м***@example.org"


# -- the SQL side (044) agrees ------------------------------------------------------------------

def sql_problem(db: psycopg.Connection, address: str) -> str | None:
    row = db.execute("SELECT (reactor.email_task(%s, NULL, 'checkup_completed', NULL, 0, NULL))"
                     ".problem", (address,)).fetchone()
    assert row is not None
    return None if row[0] is None else str(row[0])


def test_the_sql_side_accepts_every_address_the_reactor_accepts(db: psycopg.Connection) -> None:
    assert {a: sql_problem(db, a) for a in ACCEPTED} == dict.fromkeys(ACCEPTED)
    assert {a: sql_problem(db, a) for a in REFUSED_BOTH} == dict.fromkeys(
        REFUSED_BOTH, '"to" is not a valid email address')
    # Only the shape is checked in SQL: the rest the reactor dead-letters with its reason.
    assert {a: sql_problem(db, a) for a in REFUSED_BY_THE_REACTOR} == dict.fromkeys(
        REFUSED_BY_THE_REACTOR)
    # The direct call too (public.queue_email_task).
    db.execute("SELECT public.queue_email_task(%s, NULL, 'checkup_completed')", (UTF8_LOCAL,))
    assert [m["to"] for m in f.queued(db, "email_queue")] == [UTF8_LOCAL]


# -- through a relay without SMTPUTF8 ------------------------------------------------------------

async def test_without_smtputf8_an_idn_domain_goes_out_as_its_a_label(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    server = smtp_server()
    async with running_reactor(database_url, **smtp_env(server)) as reactor:
        with reactor.bus.subscribe() as sub:
            await send(database_url, "email_queue", mail_to(IDN_DOMAIN, "idn-1"))
            [event] = await wait_for(sub, lambda e: e["type"].startswith("job.")
                                     and e["type"] != "job.started")
    assert event["type"] == "job.succeeded", event
    [meta] = server.meta()
    sent = envelope(meta)
    assert sent["rcpt_to"] == IDN_DOMAIN_ASCII
    assert sent["mail_from"] == "noreply@family.example"
    assert sent["smtputf8"] == "False"
    assert "SMTPUTF8" not in sent["mail_options"]
    [raw] = server.raw()
    assert header_block(raw) == expected_headers(raw, IDN_DOMAIN_ASCII)
    assert raw.isascii()
    # The ledger keeps the address as the app gave it (reactor email stuck, resolve).
    assert await sql(database_url, "SELECT recipient, status FROM public.email_ledger") == [
        (IDN_DOMAIN, "sent")]


async def test_without_smtputf8_a_utf8_local_part_is_dead_lettered_at_once_with_the_fix(
        database_url: str, smtp_server: Callable[..., SmtpServer], tmp_path: Path) -> None:
    server = smtp_server()
    async with running_reactor(database_url, **smtp_env(server), MAX_ATTEMPTS=5) as reactor:
        with reactor.bus.subscribe() as sub:
            msg_id = await send(database_url, "email_queue", mail_to(UTF8_LOCAL, "utf8-1"))
            [event] = await wait_for(sub, lambda e: e["msg_id"] == msg_id and e["type"] in (
                "job.succeeded", "job.retrying", "job.deferred", "job.dead_lettered"))
            # The relay still carries the next mail (ASCII form).
            await send(database_url, "email_queue", mail_to(IDN_DOMAIN, "idn-2"))
            await wait_for(sub, of_type("job.succeeded"))
    assert event["type"] == "job.dead_lettered", event
    assert event["attempt"] == 1
    assert "м***@example.org has a non-ASCII local part" in event["error"]  # masked
    assert "SMTPUTF8" in event["error"]
    assert "smtputf8_enable = yes" in event["error"]
    assert UTF8_LOCAL not in event["error"]
    [(letter,)] = await sql(database_url, "SELECT message FROM pgmq.q_email_queue_dlq")
    assert "does not offer SMTPUTF8" in letter["error"]
    assert letter["original"]["to"] == UTF8_LOCAL
    assert await sql(database_url, "SELECT count(*) FROM pgmq.q_email_queue") == [(0,)]
    # Nothing of it reached the relay; the ledger lets a replay through a better relay send it.
    assert [envelope(m)["rcpt_to"] for m in server.meta()] == [IDN_DOMAIN_ASCII]
    assert await sql(database_url, "SELECT recipient, status FROM public.email_ledger "
                                   "ORDER BY recipient") == [
        (IDN_DOMAIN, "sent"), (UTF8_LOCAL, "failed")]

    # The fix the reason names: a relay with SMTPUTF8, then the replay sends it, once.
    better = smtp_server(smtputf8=True)
    async with running_reactor(database_url, **smtp_env(better)) as reactor:
        with reactor.bus.subscribe() as sub:
            replay = await trio.to_thread.run_sync(lambda: reactor_command(
                "dlq", "replay", "email_queue", cwd=tmp_path, DATABASE_URL=database_url))
            assert replay.returncode == 0, replay.stderr
            await wait_for(sub, of_type("job.succeeded"))
    assert [envelope(m)["rcpt_to"] for m in better.meta()] == [UTF8_LOCAL]
    assert await sql(database_url, "SELECT count(*) FROM pgmq.q_email_queue_dlq") == [(0,)]
    assert (UTF8_LOCAL, "sent") in await sql(
        database_url, "SELECT recipient, status FROM public.email_ledger")


# -- through a relay with SMTPUTF8 ---------------------------------------------------------------

async def test_with_smtputf8_both_kinds_arrive_byte_for_byte(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    server = smtp_server(smtputf8=True)
    async with running_reactor(database_url, **smtp_env(server)) as reactor:
        with reactor.bus.subscribe() as sub:
            await send(database_url, "email_queue", mail_to(UTF8_LOCAL, "utf8-2"))
            await wait_for(sub, of_type("job.succeeded"))
            await send(database_url, "email_queue", mail_to(IDN_DOMAIN, "idn-3"))
            await wait_for(sub, of_type("job.succeeded"))
    utf8_meta, ascii_meta = (envelope(m) for m in server.meta())
    utf8_raw, ascii_raw = server.raw()
    # The Cyrillic local part: SMTPUTF8, UTF-8 in RCPT TO and in To (RFC 6531, 6532).
    assert utf8_meta["rcpt_to"] == UTF8_LOCAL
    assert utf8_meta["smtputf8"] == "True"
    assert utf8_meta["mail_options"].split()[1:] == ["BODY=8BITMIME", "SMTPUTF8"]
    assert utf8_meta["mail_options"].split()[0] == f"SIZE={len(utf8_raw)}"
    assert header_block(utf8_raw) == expected_headers(utf8_raw, UTF8_LOCAL)
    # The IDN domain with an ASCII local part needs no SMTPUTF8: the A-label form, which
    # every later hop can carry.
    assert ascii_meta["rcpt_to"] == IDN_DOMAIN_ASCII
    assert ascii_meta["smtputf8"] == "False"
    assert header_block(ascii_raw) == expected_headers(ascii_raw, IDN_DOMAIN_ASCII)


def book(address: str, name: str, locale: str, conn: psycopg.Connection) -> None:
    """A family on that address books a consultation (the trigger queues its mail)."""
    f.appointment(conn, f.profile(conn, email=address, full_name=name, locale=locale),
                  starts_in=timedelta(days=2), specialist_name="Д-р Иванова")


async def test_a_trigger_queued_mail_to_an_idn_profile_renders_and_goes_out(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    server = smtp_server(smtputf8=True)
    async with running_reactor(database_url, **smtp_env(server)) as reactor:
        with reactor.bus.subscribe() as sub:
            for address, name, locale in (("мама@пример.рф", "Мария Иванова", "ru"),
                                          (IDN_DOMAIN, "Mary Smith", "en")):
                await in_db(database_url, partial(book, address, name, locale))
            await wait_for(sub, lambda e: e["type"] == "job.succeeded"
                           and e["queue"] == "email_queue", count=2)
    assert await sql(database_url, "SELECT count(*) FROM pgmq.q_email_queue_dlq") == [(0,)]
    mails = {m["To"]: m for m in server.mails()}
    assert sorted(mails) == ["user@xn--e1afmkfd.xn--p1ai", "мама@пример.рф"]
    ru, en = mails["мама@пример.рф"], mails[IDN_DOMAIN_ASCII]
    assert ru["Subject"].startswith("Консультация записана")
    assert "Мария Иванова" in ru.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert en["Subject"].startswith("Your consultation is booked")
    assert "Mary Smith" in en.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert sorted(envelope(m)["rcpt_to"] for m in server.meta()) == [
        IDN_DOMAIN_ASCII, "мама@пример.рф"]


# -- the file outbox writes what SMTP sends --------------------------------------------------------

def comparable(raw: bytes) -> bytes:
    """A mail without what differs from one build to the next, LF line ends."""
    raw = raw.replace(b"\r\n", b"\n")
    raw = re.sub(rb"^(Date|Message-ID): .*$", rb"\1: -", raw, flags=re.M)
    return re.sub(rb"=_[0-9a-f]{24}", b"=_boundary", raw)


@pytest.mark.parametrize("address", [IDN_DOMAIN, UTF8_LOCAL])
async def test_the_file_outbox_writes_what_smtp_sends(
        database_url: str, smtp_server: Callable[..., SmtpServer], tmp_path: Path,
        address: str) -> None:
    server = smtp_server(smtputf8=True)
    async with running_reactor(database_url, **smtp_env(server)) as reactor:
        with reactor.bus.subscribe() as sub:
            await send(database_url, "email_queue", mail_to(address, "by-smtp"))
            await wait_for(sub, of_type("job.succeeded"))
    outbox = tmp_path / "outbox"
    async with running_reactor(database_url, EMAIL_PROVIDER="file",
                               EMAIL_OUTBOX_DIR=str(outbox),
                               SMTP_FROM="noreply@family.example") as reactor:
        with reactor.bus.subscribe() as sub:
            await send(database_url, "email_queue", mail_to(address, "by-file"))
            await wait_for(sub, of_type("job.succeeded"))
    await eventually(lambda: len(list(outbox.glob("*.eml"))) == 1)
    [path] = outbox.glob("*.eml")
    [raw] = server.raw()
    assert comparable(path.read_bytes()) == comparable(raw)
