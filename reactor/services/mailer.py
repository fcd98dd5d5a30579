"""Sending mail: SMTP (aiosmtplib through trio-asyncio, pooled) or a file outbox.

aiosmtplib is asyncio; trio-asyncio runs it inside the reactor's trio loop.
That is confined to this module: everything else sees `Mailer.send`.
Every SMTP failure is classified here into the failure policy's two kinds:
connection trouble, timeouts and 4xx replies are retried; a 5xx rejection is
permanent and carries the server's reply.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import Header
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, formataddr, make_msgid
from pathlib import Path
from typing import Protocol

import aiosmtplib
import structlog
import trio
import trio_asyncio

from reactor.config import ConfigError, Settings
from reactor.errors import PermanentError, RetryableError
from reactor.services.templates import RenderedEmail

__all__ = ["Attachment", "FileMailer", "Mailer", "OutgoingMail", "SmtpMailer", "build_message",
           "check_mail_settings", "classify", "open_mailer"]

log = structlog.get_logger("reactor.mailer")


@dataclass(frozen=True)
class Attachment:
    filename: str
    content: bytes
    content_type: str = "application/pdf"


@dataclass(frozen=True)
class OutgoingMail:
    """A mail ready for the wire: envelope and the bytes, flattened once."""

    sender: str
    recipient: str
    message_id: str
    raw: bytes


class Mailer(Protocol):
    async def send(self, mail: OutgoingMail) -> str:
        """Deliver one mail; return its Message-ID.

        Raises:
            PermanentError: the server refused it for good (5xx).
            RetryableError: anything that may work later.
        """
        ...


def build_message(*, sender: str, sender_name: str | None, to: str, email: RenderedEmail,
                  attachments: Sequence[Attachment] = ()) -> OutgoingMail:
    """multipart/alternative (text + HTML), in multipart/mixed when there are attachments;
    Message-ID, Date, and a From whose display name is RFC 2047-encoded.

    Built with the email package's compat32 MIME classes: the modern
    EmailMessage API costs milliseconds per header, which caps a mailer at
    tens of mails a second. A CR or LF in a header value is refused here, so
    it never reaches the wire.
    """
    for name, value in (("To", to), ("Subject", email.subject), ("From", sender),
                        ("SMTP_FROM_NAME", sender_name or "")):
        if "\r" in value or "\n" in value:
            raise PermanentError(f"{name} contains CR or LF: refused")
    domain = sender.rpartition("@")[2] or "localhost"
    message_id = make_msgid(domain=domain)
    alternative = MIMEMultipart("alternative")
    alternative.attach(MIMEText(email.text, "plain", "utf-8"))
    alternative.attach(MIMEText(email.html, "html", "utf-8"))
    root: MIMEMultipart = alternative
    if attachments:
        root = MIMEMultipart("mixed")
        root.attach(alternative)
        for item in attachments:
            maintype, _, subtype = item.content_type.partition("/")
            part = MIMEApplication(item.content, _subtype=subtype or "octet-stream") \
                if maintype == "application" else MIMEText(item.content.decode(), subtype)
            part.add_header("Content-Disposition", "attachment",
                            filename=("utf-8", "", item.filename))
            root.attach(part)
    root["From"] = formataddr((sender_name, sender), charset="utf-8") if sender_name else sender
    root["To"] = to
    # compat32 accepts a Header object and folds its encoded words properly.
    root["Subject"] = email.subject if email.subject.isascii() \
        else Header(email.subject, "utf-8")  # type: ignore[assignment]
    root["Date"] = format_datetime(datetime.now(UTC))
    root["Message-ID"] = message_id
    return OutgoingMail(sender, to, message_id, root.as_bytes())


def classify(exc: BaseException) -> PermanentError | RetryableError:
    """Map an aiosmtplib (or socket) failure onto the failure policy."""
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return RetryableError(f"SMTP authentication failed ({exc.code} {exc.message}): "
                              "check SMTP_USER and SMTP_PASS", outage=True)
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        reply = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
        if codes and all(code >= 500 for code in codes):
            return PermanentError(f"recipient refused: {reply}")
        return RetryableError(f"recipient deferred: {reply}")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        reply = f"{exc.code} {exc.message}"
        if exc.code >= 500:
            return PermanentError(f"SMTP server rejected the mail: {reply}")
        return RetryableError(f"SMTP server deferred the mail: {reply}")
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return RetryableError(f"SMTP server does not support what SMTP_SECURITY asks: {exc}",
                              outage=True)
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return RetryableError(f"TLS failed: {exc} (check SMTP_SECURITY and SMTP_CA_FILE)",
                              outage=True)
    if isinstance(exc, TimeoutError | aiosmtplib.SMTPTimeoutError):
        return RetryableError(f"SMTP timed out: {exc}", outage=True)
    return RetryableError(f"SMTP connection failed: {type(exc).__name__}: {exc}", outage=True)


def check_mail_settings(settings: Settings) -> None:
    """Refuse at start-up what would fail every mail later.

    Raises:
        ConfigError: naming the variable and the fix.
    """
    if settings.email_provider == "file":
        return
    if not settings.smtp_host:
        raise ConfigError("EMAIL_PROVIDER=smtp needs SMTP_HOST: set it, or set "
                          "EMAIL_PROVIDER=file to write .eml files instead")
    if not settings.smtp_from:
        raise ConfigError("SMTP_FROM is not set: set it to the sender address, "
                          "e.g. noreply@example.com")
    if settings.smtp_user and settings.smtp_pass is None:
        raise ConfigError("SMTP_USER is set but SMTP_PASS is not: set both, or neither")
    if settings.smtp_ca_file and not settings.smtp_ca_file.is_file():
        raise ConfigError(f"SMTP_CA_FILE={settings.smtp_ca_file} does not exist")


class SmtpMailer:
    """A small pool of persistent SMTP connections, reconnected on failure."""

    def __init__(self, settings: Settings) -> None:
        check_mail_settings(settings)
        self.settings = settings
        self.security = settings.smtp_security_effective
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots = trio.Semaphore(settings.smtp_pool_size)

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()  # certificates are always verified
        if self.settings.smtp_ca_file:
            context.load_verify_locations(cafile=str(self.settings.smtp_ca_file))
        return context

    def _client(self) -> aiosmtplib.SMTP:
        s = self.settings
        return aiosmtplib.SMTP(
            hostname=s.smtp_host, port=s.smtp_port, timeout=s.smtp_timeout_s,
            use_tls=self.security == "ssl", start_tls=self.security == "starttls",
            tls_context=self._tls_context() if self.security != "none" else None,
            username=s.smtp_user,
            password=s.smtp_pass.get_secret_value() if s.smtp_pass else None,
        )

    async def _connect(self) -> aiosmtplib.SMTP:
        client = self._client()
        try:
            await trio_asyncio.aio_as_trio(client.connect)()
        except aiosmtplib.SMTPAuthenticationError as exc:
            log.error("SMTP authentication failed: check SMTP_USER and SMTP_PASS",
                      host=self.settings.smtp_host, code=exc.code)
            raise classify(exc) from None
        except Exception as exc:
            raise classify(exc) from None
        return client

    async def send(self, mail: OutgoingMail) -> str:
        async with self._slots:
            client = self._idle.pop() if self._idle else None
            if client is None or not client.is_connected:
                client = await self._connect()
            try:
                await trio_asyncio.aio_as_trio(client.sendmail)(
                    mail.sender, [mail.recipient], mail.raw)
            except Exception as exc:
                await self._discard(client)
                raise classify(exc) from None
            self._idle.append(client)
        return mail.message_id

    async def _discard(self, client: aiosmtplib.SMTP) -> None:
        with contextlib.suppress(Exception):
            client.close()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            with contextlib.suppress(Exception), trio.move_on_after(2):
                await trio_asyncio.aio_as_trio(client.quit)()


class FileMailer:
    """Writes each mail as an .eml file, atomically (temp file, then rename)."""

    def __init__(self, outbox: Path) -> None:
        self.outbox = outbox

    async def send(self, mail: OutgoingMail) -> str:
        message_id = mail.message_id
        name = message_id.strip("<>").replace("/", "_").replace("@", "_at_")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        final = trio.Path(self.outbox / f"{stamp}-{name}.eml")
        temp = trio.Path(self.outbox / f".{name}.tmp")
        try:
            await trio.Path(self.outbox).mkdir(parents=True, exist_ok=True)
            await temp.write_bytes(mail.raw)
            await temp.rename(final)
        except OSError as exc:
            raise RetryableError(f"cannot write to EMAIL_OUTBOX_DIR: {exc}") from None
        return message_id

    async def aclose(self) -> None:
        return None


@contextlib.asynccontextmanager
async def open_mailer(settings: Settings) -> AsyncIterator[Mailer]:
    """The mailer EMAIL_PROVIDER asks for, for the duration of the block."""
    if settings.email_provider == "file":
        yield FileMailer(settings.email_outbox_dir)
        return
    mailer = SmtpMailer(settings)
    async with trio_asyncio.open_loop():
        try:
            yield mailer
        finally:
            with trio.CancelScope(shield=True):
                await mailer.aclose()
