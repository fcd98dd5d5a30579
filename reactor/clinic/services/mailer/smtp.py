"""One SMTP session, and what its failures mean.

aiosmtplib is asyncio; it runs on an asyncio loop in a thread of its own
(reactor.clinic.services.asyncio_thread), confined to this module and the pool
(reactor.clinic.services.mailer.pool): `SmtpConnection` hands every call to that
thread, and aiosmtplib's exceptions come back as this module's.
Every SMTP failure is classified here (`classify`) into the failure policy's
kinds: connection trouble and timeouts are retried as outages; a 4xx verdict on a
mail is a deferral (`SmtpDeferred`, waited out on a time budget); a 5xx rejection
of a mail is permanent and carries the server's reply. The EHLO name and the
other mail settings are checked at start-up (`helo_name`, `check_mail_settings`),
so a setting that every session would fail on stops the start instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Final

import aiosmtplib
import trio

from reactor.clinic.services.asyncio_thread import AsyncioThread
from reactor.clinic.services.mailer.mime import header_safe
from reactor.clinic.settings import ConfigError, MailSettings
from reactor.engine.errors import PermanentError, RetryableError

__all__ = ["ConnectionGone", "DeliveryUnknown", "SmtpAuthFailed", "SmtpConnection", "SmtpDeferred",
           "SmtpRecipientRefused", "SmtpReplyError", "SmtpSessionRefused", "SmtpUnsupported",
           "check_mail_settings", "classify", "helo_name"]


class ConnectionGone(Exception):
    """The server closed the connection (or said 421, closing) in answer to a mail's
    first command: nothing of the mail was sent, another connection may carry it."""


class DeliveryUnknown(Exception):
    """The whole message went out but the server's answer did not come back (timeout,
    connection lost): it may have accepted the mail, so sending it again is not safe."""


# -- the SMTP client -------------------------------------------------------------------------

class SmtpReplyError(Exception):
    """The server answered a command with a reply the conversation cannot go on from."""

    def __init__(self, command: str, code: int, text: str) -> None:
        text = " ".join(text.split())  # one line, whatever the server sent
        super().__init__(f"{code} {text}" if text else str(code))
        self.command = command
        self.code = code
        self.reply = str(self)


class SmtpSessionRefused(SmtpReplyError):
    """The greeting, EHLO or STARTTLS was refused: the session, not a mail."""


class SmtpAuthFailed(SmtpReplyError):
    """AUTH was refused."""


class SmtpRecipientRefused(SmtpReplyError):
    """RCPT TO was refused."""


class SmtpUnsupported(Exception):
    """The server lacks what the settings ask for (STARTTLS, AUTH); the text names the fix."""


class SmtpDeferred(RetryableError):
    """A 4xx verdict on the mail itself (to MAIL, RCPT or DATA): greylisting, a rate
    limit, a full mailbox. Nothing was accepted; the email processor waits it out on
    its time budget (SMTP_DEFER_MAX_S), as an MTA would, not on MAX_ATTEMPTS."""

    def __init__(self, message: str, reply: str) -> None:
        super().__init__(message)
        self.reply = reply


def classify(exc: BaseException) -> PermanentError | RetryableError:
    """Map an SMTP (or socket, TLS) failure onto the failure policy.

    Only the server's verdict on a mail (MAIL, RCPT, DATA, the message) can be
    permanent (5xx) or a deferral (4xx: SmtpDeferred); trouble with the session
    itself is an outage, waited out.
    """
    if isinstance(exc, SmtpReplyError) and exc.code < 0:
        # aiosmtplib's code for a reply it could not read (not SMTP, or endless): a
        # broken relay or something between us, not a verdict on the mail.
        return RetryableError(f"SMTP server sent an unreadable reply to {exc.command}: "
                              f"{exc.reply[:200]}", outage=True)
    if isinstance(exc, SmtpAuthFailed):
        return RetryableError(f"SMTP authentication failed ({exc.reply}): "
                              "check SMTP_USER and SMTP_PASS", outage=True)
    if isinstance(exc, SmtpRecipientRefused):
        if exc.code >= 500:
            return PermanentError(f"recipient refused: {exc.reply}")
        return SmtpDeferred(f"recipient deferred: {exc.reply}", exc.reply)
    if isinstance(exc, SmtpSessionRefused):
        return RetryableError(f"SMTP server refused the session at {exc.command}: {exc.reply}",
                              outage=True)
    if isinstance(exc, SmtpReplyError):
        if exc.code >= 500:
            return PermanentError(f"SMTP server rejected the mail: {exc.reply}")
        return SmtpDeferred(f"SMTP server deferred the mail at {exc.command}: {exc.reply}",
                            exc.reply)
    if isinstance(exc, SmtpUnsupported):
        return RetryableError(f"SMTP server {exc}", outage=True)
    tls = exc if isinstance(exc, ssl.SSLError | ssl.CertificateError) else exc.__cause__
    if isinstance(tls, ssl.SSLError | ssl.CertificateError):
        return RetryableError(f"TLS failed: {tls} (check SMTP_SECURITY and SMTP_CA_FILE)",
                              outage=True)
    if isinstance(exc, TimeoutError):  # aiosmtplib's SMTPTimeoutError is one
        return RetryableError(f"SMTP timed out: {exc}", outage=True)
    cause = exc.__cause__
    detail = str(exc) or (f"{type(cause).__name__}: {cause}" if cause else "it broke off")
    return RetryableError(f"SMTP connection failed: {type(exc).__name__}: {detail}",
                          outage=True)


_ENVELOPE_ADDRESS: Final = re.compile(r"^[!-;=?-~]+$")  # printable ASCII, no space, < or >
# With SMTPUTF8 (RFC 6531): UTF-8 too, beyond ASCII's control characters (no surrogates).
_ENVELOPE_ADDRESS_UTF8: Final = re.compile(r"^[!-;=?-~\u00a0-\ud7ff\ue000-\U0010ffff]+$")


class SmtpConnection:
    """One SMTP session: an aiosmtplib client that lives on the mailer's asyncio thread.

    Every call goes to that thread (`AsyncioThread.call`); aiosmtplib's replies that
    stop the conversation come back as this module's exceptions (SmtpReplyError and
    its kinds, SmtpUnsupported, DeliveryUnknown), so `classify` sees the same
    failures whatever the transport.
    """

    def __init__(self, client: aiosmtplib.SMTP, loop: AsyncioThread) -> None:
        self.client = client
        self.loop = loop
        self.carried = 0  # mails the server accepted on it

    @classmethod
    async def open(cls, loop: AsyncioThread, *, host: str, port: int, reply_timeout_s: float,
                   security: str, tls: ssl.SSLContext | None, helo: str,
                   user: str | None, password: str) -> SmtpConnection:
        """Connect, greet, EHLO, STARTTLS and AUTH as the settings ask (cancellable).
        aiosmtplib waits at most `reply_timeout_s` (SMTP_TIMEOUT_S) for each reply."""
        client = aiosmtplib.SMTP(hostname=host, port=port, timeout=reply_timeout_s,
                                 use_tls=security == "ssl", start_tls=False,
                                 tls_context=tls, local_hostname=helo)
        connection = cls(client, loop)
        try:
            await loop.call(_open_session, client, security == "starttls", tls, user, password)
        except BaseException:
            await connection.abort()
            raise
        return connection

    def idle_and_quiet(self) -> bool:
        """Still connected: aiosmtplib's loop runs all the time, so a server that closed
        an idle connection has been noticed already."""
        return self.client.is_connected

    async def sendmail(self, sender: str, recipient: str, raw: bytes, *,
                       smtputf8: bool = False) -> None:
        """MAIL, RCPT, DATA and the message; with SMTPUTF8 when `smtputf8` (an address
        without an ASCII form: mailer.address).

        Raises:
            PermanentError: an address that cannot go in the envelope, or a mail that
                needs SMTPUTF8 and a server that does not offer it (nothing was sent).
            SmtpReplyError: a reply that refuses the mail (discard the connection).
            DeliveryUnknown: the conversation broke off after DATA was sent.
        """
        envelope = _ENVELOPE_ADDRESS_UTF8 if smtputf8 else _ENVELOPE_ADDRESS
        for address in (sender, recipient):
            if not envelope.match(address):
                raise PermanentError(f"{address!r} cannot be an envelope address")
        if smtputf8 and not self.client.supports_extension("smtputf8"):
            # Never retried: the same server will not learn SMTPUTF8 by the next attempt.
            raise PermanentError(
                f"{recipient} has a non-ASCII local part, which only SMTPUTF8 (RFC 6531) "
                "can carry, and the SMTP server (SMTP_HOST) does not offer SMTPUTF8: send "
                "through a relay that offers it (Postfix: smtputf8_enable = yes), then "
                "replay the dead letter; or ask the family for an address with an ASCII "
                "part before the @")
        if not raw.endswith(b"\n"):
            raw += b"\n"  # the end mark must start a line of its own
        await self.loop.call(_send_mail, self.client, sender, recipient, raw, smtputf8)

    async def noop(self) -> None:
        await self.loop.call(_command, self.client.noop, "NOOP")

    async def quit(self) -> None:
        await self.loop.call(_command, self.client.quit, "QUIT")

    async def abort(self) -> None:
        """Close now, socket included, whatever state the session is in (shielded: it
        is what a cancelled conversation's cleanup does)."""
        with trio.CancelScope(shield=True), contextlib.suppress(RuntimeError):
            await self.loop.call(_abort, self.client)  # RuntimeError: the loop is closed


# -- on the asyncio thread: aiosmtplib's exceptions become this module's -------------------

async def _open_session(client: aiosmtplib.SMTP, starttls: bool, tls: ssl.SSLContext | None,
                        user: str | None, password: str) -> None:
    try:
        await client.connect()
    except aiosmtplib.SMTPConnectResponseError as exc:
        raise SmtpSessionRefused("the greeting", exc.code, exc.message) from None
    await _hello(client)
    if starttls:
        if not client.supports_extension("starttls"):
            raise SmtpUnsupported("does not offer STARTTLS, which SMTP_SECURITY=starttls asks "
                                  "for: set SMTP_SECURITY (ssl for port 465) to what it offers")
        try:
            await client.starttls(tls_context=tls)
        except aiosmtplib.SMTPResponseException as exc:
            raise SmtpSessionRefused("STARTTLS", exc.code, exc.message) from None
        await _hello(client)
    if user:
        if not client.supports_extension("auth"):
            raise SmtpUnsupported("offers no AUTH, yet SMTP_USER is set: unset SMTP_USER and "
                                  "SMTP_PASS, or use SMTP_SECURITY=starttls/ssl (many servers "
                                  "offer AUTH only over TLS)")
        try:
            await client.login(user, password)
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise SmtpAuthFailed("AUTH", exc.code, exc.message) from None
        except aiosmtplib.SMTPException as exc:  # no mechanism in common
            offered = client.server_auth_methods
            raise SmtpUnsupported(f"offers AUTH {' '.join(offered) or '(nothing)'}, none of "
                                  "PLAIN, LOGIN, CRAM-MD5: ask the provider for an account "
                                  "that can use one") from exc


async def _hello(client: aiosmtplib.SMTP) -> None:
    """EHLO; HELO if the server knows no better."""
    try:
        await client.ehlo()
    except aiosmtplib.SMTPHeloError:
        try:
            await client.helo()
        except aiosmtplib.SMTPHeloError as exc:
            raise SmtpSessionRefused("HELO", exc.code, exc.message) from None


async def _send_mail(client: aiosmtplib.SMTP, sender: str, recipient: str, raw: bytes,
                     smtputf8: bool) -> None:
    octets = len(raw) + raw.count(b"\n")  # as sent: each line end becomes CRLF
    options = [f"SIZE={octets}"] if client.supports_extension("size") else []
    encoding = "ascii"
    if smtputf8:  # its To header is 8-bit: BODY=8BITMIME (RFC 6152) where it is offered
        options += ["BODY=8BITMIME", "SMTPUTF8"] if client.supports_extension("8bitmime") \
            else ["SMTPUTF8"]
        encoding = "utf-8"
    try:
        await client.mail(sender, options=options, encoding=encoding)
    except aiosmtplib.SMTPResponseException as exc:
        if exc.code == 421:  # closing the channel (aiosmtplib has closed it too)
            raise ConnectionGone(f"421 {' '.join(exc.message.split())[:200]}") from None
        raise SmtpReplyError("MAIL FROM", exc.code, exc.message) from None
    except aiosmtplib.SMTPServerDisconnected as exc:
        raise ConnectionGone(str(exc) or type(exc).__name__) from exc
    try:
        await client.rcpt(recipient, encoding=encoding)
    except aiosmtplib.SMTPResponseException as exc:
        raise SmtpRecipientRefused("RCPT TO", exc.code, exc.message) from None
    try:
        await client.data(raw)
    except aiosmtplib.SMTPResponseException as exc:
        if exc.code >= 0:  # a verdict: 354 refused, or the message refused
            raise SmtpReplyError("DATA", exc.code, exc.message) from None
        reason = f"an unreadable reply: {' '.join(exc.message.split())[:200]}"
        raise DeliveryUnknown(f"no answer to the message ({reason}): the server may have "
                              "accepted it") from exc
    except (aiosmtplib.SMTPServerDisconnected, TimeoutError, OSError) as exc:
        # aiosmtplib does not say whether the message and its end mark had gone out:
        # they may have, and the server may have accepted the mail. (A relay that hangs
        # up right after DATA, before 354, lands here too: safe, if over-cautious.)
        reason = str(exc) or type(exc).__name__
        raise DeliveryUnknown(f"no answer to the message ({reason}): the server may have "
                              "accepted it") from exc


async def _command(call: Callable[[], Awaitable[aiosmtplib.SMTPResponse]], name: str) -> None:
    try:
        await call()
    except aiosmtplib.SMTPResponseException as exc:
        raise SmtpReplyError(name, exc.code, exc.message) from None


async def _abort(client: aiosmtplib.SMTP) -> None:
    """A TLS transport's close() only starts the TLS shutdown, which may never finish;
    abort() closes the socket whatever state it is in."""
    transport = client.transport
    with contextlib.suppress(Exception):
        client.close()
    if isinstance(transport, asyncio.WriteTransport):
        with contextlib.suppress(Exception):
            transport.abort()


_HOST_LABEL: Final = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_ADDRESS: Final = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+$")


def helo_name(settings: MailSettings) -> str:
    """The EHLO name: SMTP_HELO_NAME, else the domain of SMTP_FROM.

    Never `socket.getfqdn()`: that is `localhost` or a container ID, which
    relays refuse (reject_non_fqdn_helo_hostname) and spam filters score.
    """
    if settings.smtp_helo_name:
        return settings.smtp_helo_name.strip().rstrip(".").lower()
    return (settings.smtp_from or "").rpartition("@")[2].strip().rstrip(".").lower()


def _not_fully_qualified(name: str) -> str | None:
    """Why `name` is not a fully qualified host name or address literal, else None."""
    if name.startswith("[") and name.endswith("]"):
        literal = name[1:-1]
        try:
            ipaddress.IPv6Address(literal[5:]) if literal[:5].lower() == "ipv6:" \
                else ipaddress.IPv4Address(literal)
        except ValueError:
            return "not an address literal such as [192.0.2.1]"
        return None
    labels = name.split(".")
    if not name:
        return "it is empty"
    if len(name) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        return "not a valid host name"
    if len(labels) < 2:
        return "it has no domain part"
    if labels[-1] in ("localhost", "localdomain") or labels[0] == "localhost":
        return "it is a local name"
    if labels[-1].isdigit():
        return "an IP address needs brackets, e.g. [192.0.2.1]"
    return None


def check_mail_settings(settings: MailSettings) -> None:
    """Refuse at start-up what would fail every mail later.

    Raises:
        ConfigError: naming the variable and the fix.
    """
    if settings.smtp_reply_to is not None and not _ADDRESS.match(settings.smtp_reply_to):
        raise ConfigError("SMTP_REPLY_TO is not an email address: set it to the address "
                          "that answers replies, e.g. support@example.com, or leave it unset")
    name_problem = header_safe(settings.smtp_from_name or "")
    if name_problem:
        raise ConfigError(f"SMTP_FROM_NAME {name_problem}: write the sender's name on one "
                          "line of printable characters, e.g. Family Mind")
    if settings.smtp_from is not None and not _ADDRESS.match(settings.smtp_from):
        raise ConfigError("SMTP_FROM is not an email address: set it to the sender address, "
                          "e.g. noreply@example.com (the display name goes in SMTP_FROM_NAME)")
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
    name = helo_name(settings)
    problem = _not_fully_qualified(name)
    if problem:
        source = "SMTP_HELO_NAME" if settings.smtp_helo_name else \
            "SMTP_HELO_NAME (default: the domain of SMTP_FROM)"
        raise ConfigError(f"{source} {name!r} is not a fully qualified host name ({problem}): "
                          "set SMTP_HELO_NAME to this host's public DNS name, "
                          "e.g. mail.example.com")
