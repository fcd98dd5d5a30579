"""Sending mail: SMTP (aiosmtplib, pooled) or a file outbox.

aiosmtplib is asyncio; it runs on an asyncio loop in a thread of its own
(reactor.services.asyncio_thread), confined to this module: everything else
sees `Mailer.session` / `Mailer.send`. (Through trio-asyncio it cost ~1.2 ms
of CPU a mail; on its own loop ~0.6.)
Every SMTP failure is classified here into the failure policy's two kinds:
connection trouble, timeouts and 4xx replies are retried; a 5xx rejection of
a mail is permanent and carries the server's reply.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import re
import secrets
import ssl
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, formataddr, make_msgid
from pathlib import Path
from typing import Final, Protocol

import aiosmtplib
import structlog
import trio

from reactor.config import ConfigError, Settings
from reactor.errors import PermanentError, RetryableError
from reactor.services.asyncio_thread import AsyncioThread
from reactor.services.templates import RenderedEmail

__all__ = ["Attachment", "DeliveryUnknown", "FileMailer", "Mailer", "OutgoingMail",
           "SmtpConnection", "SmtpMailer",
           "ascii_filename", "build_message", "check_mail_settings", "classify", "helo_name",
           "open_mailer"]

log = structlog.get_logger("reactor.mailer")

# RFC 5322 §2.1.1: header lines SHOULD stay within 78 characters; RFC 2047 §2: an
# encoded word is at most 75. Spam filters score mails that ignore either.
MAX_LINE: Final = 78
MAX_ENCODED_WORD: Final = 75
# A pooled connection idle longer than this is checked with NOOP before it carries a
# mail, so a connection the server closed costs a reconnect, never a failed send.
PROBE_AFTER_S: Final = 1.0


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


class ConnectionGone(Exception):
    """The server closed the connection (or said 421, closing) in answer to a mail's
    first command: nothing of the mail was sent, another connection may carry it."""


class DeliveryUnknown(Exception):
    """The whole message went out but the server's answer did not come back (timeout,
    connection lost): it may have accepted the mail, so sending it again is not safe."""


class MailSession(Protocol):
    async def send(self, mail: OutgoingMail) -> str:
        """Deliver one mail; return its Message-ID.

        Raises:
            PermanentError: the server refused it for good (5xx).
            RetryableError: anything that may work later; nothing was accepted.
            DeliveryUnknown: the server may have accepted it.
        """
        ...


class Mailer(MailSession, Protocol):
    """Sends mail; `session()` first waits for the means (a pooled SMTP connection).

    The wait is cancellable and starts nothing, so a job timeout or shutdown may
    end it; the conversation that follows (`MailSession.send`) is what a caller
    shields, because its outcome cannot be known once it is cut.
    """

    def session(self) -> contextlib.AbstractAsyncContextManager[MailSession]: ...


# -- headers -----------------------------------------------------------------------------

def _encoded_words(text: str, first_budget: int) -> list[str]:
    """RFC 2047 B-encoded words, each whole characters and at most 75 long.

    The first word also fits `first_budget` (what is left of the first line).
    """
    words: list[str] = []
    budget = min(first_budget, MAX_ENCODED_WORD)
    chunk, size = "", 0  # size: UTF-8 octets of chunk; base64 makes 4 of every 3
    for char in text:
        octets = len(char.encode())
        if chunk and 12 + 4 * ((size + octets + 2) // 3) > budget:
            # Break after a space where there is one, so a reader that (wrongly) puts
            # a space between encoded words still shows whole words.
            cut = chunk.rfind(" ") + 1 or len(chunk)
            words.append(f"=?utf-8?b?{base64.b64encode(chunk[:cut].encode()).decode()}?=")
            chunk, budget = chunk[cut:], MAX_ENCODED_WORD
            size = len(chunk.encode())
            if chunk and 12 + 4 * ((size + octets + 2) // 3) > budget:  # no room after all
                words.append(f"=?utf-8?b?{base64.b64encode(chunk.encode()).decode()}?=")
                chunk, size = "", 0
        chunk += char
        size += octets
    words.append(f"=?utf-8?b?{base64.b64encode(chunk.encode()).decode()}?=")
    return words


def _fold(name: str, tokens: Sequence[str]) -> str:
    """`Name: t1 t2 …`, folded before a token where the line would pass 78."""
    line = f"{name}:"
    lines: list[str] = []
    for token in tokens:
        if len(line) + 1 + len(token) > MAX_LINE and line.strip() != f"{name}:":
            lines.append(line)
            line = ""
        line += f" {token}"
    lines.append(line)
    return "\n".join(lines)


def _unstructured(name: str, value: str) -> str:
    """A header such as Subject: plain ASCII folded at spaces, else encoded words."""
    if not value:
        return f"{name}:"
    words = value.split(" ")
    plain = value.isascii() and "=?" not in value and all(
        word and len(word) + 1 + (len(name) + 1 if i == 0 else 0) <= MAX_LINE
        for i, word in enumerate(words))
    if plain:
        return _fold(name, words)
    return _fold(name, _encoded_words(value, MAX_LINE - len(name) - 2))


def _mailbox(name: str, display: str | None, address: str) -> str:
    """From/Reply-To: the display name quoted (ASCII) or RFC 2047-encoded."""
    if not display:
        return _fold(name, [address])
    if display.isascii() and "=?" not in display:
        phrase = formataddr((display, address)).rpartition(" <")[0]
        if len(name) + 2 + len(phrase) <= MAX_LINE:
            return _fold(name, [phrase, f"<{address}>"])
    return _fold(name, [*_encoded_words(display, MAX_LINE - len(name) - 2), f"<{address}>"])


# -- attachments ---------------------------------------------------------------------------

_RU_LATIN: Final = dict(zip(
    "абвгдеёжзийклмнопрстуфхцчшщъыьэюя",
    ["a", "b", "v", "g", "d", "e", "e", "zh", "z", "i", "y", "k", "l", "m", "n", "o", "p",
     "r", "s", "t", "u", "f", "kh", "ts", "ch", "sh", "shch", "", "y", "", "e", "yu", "ya"],
    strict=True))
_UNSAFE_IN_QUOTES: Final = re.compile(r'[^A-Za-z0-9 !#$%&\'()*+,\-.:;<=>?@\[\]^_`{|}~]')
_ATTR_CHAR: Final = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                              b"0123456789!#$&+-.^_`|~")
_MAX_PLAIN_NAME: Final = 60


def ascii_filename(name: str) -> str:
    """An ASCII stand-in for a file name, for mail readers that ignore RFC 2231.

    Russian is transliterated, accents are dropped, anything else becomes `_`;
    the extension is kept when the name is shortened.
    """
    out = []
    for char in unicodedata.normalize("NFC", name):
        lower = char.lower()
        if char in "\u2010\u2011\u2012\u2013\u2014\u2015\u2212":  # dashes and minus
            out.append("-")
        elif lower in _RU_LATIN:
            latin = _RU_LATIN[lower]
            out.append(latin.capitalize() if char != lower else latin)
        else:
            out.append(unicodedata.normalize("NFKD", char).encode("ascii", "ignore").decode()
                       or "_")
    text = _UNSAFE_IN_QUOTES.sub("_", "".join(out)).strip()
    stem, dot, ext = text.rpartition(".")
    if not dot:
        stem, ext = text, ""
    ext = ext[:10]
    stem = stem.strip(" _") or "attachment"
    stem = stem[: _MAX_PLAIN_NAME - len(ext) - 1]
    return f"{stem}.{ext}" if ext else stem


def _name_params(attribute: str, filename: str) -> list[str]:
    """`attribute="ascii"`, preceded by RFC 2231 continuations when the name is not
    plain ASCII (readers that know RFC 2231 show the real name, others the fallback)."""
    fallback = ascii_filename(filename)
    plain = f'{attribute}="{fallback}"'
    if fallback == filename:
        return [plain]
    params: list[str] = []
    segment = "utf-8''"
    for char in filename:
        encoded = "".join(chr(b) if b in _ATTR_CHAR else f"%{b:02X}" for b in char.encode())
        # " attribute*NN*=" + segment + ";" must stay within one 78-column line.
        if len(segment) + len(encoded) > MAX_LINE - len(attribute) - 8:
            params.append(f"{attribute}*{len(params)}*={segment}")
            segment = ""
        segment += encoded
    params.append(f"{attribute}*{len(params)}*={segment}")
    return [*params, plain]


def _param_header(name: str, value: str, params: Sequence[str]) -> str:
    """`Name: value;` then one parameter a line, so every line stays short."""
    return "\n ".join([f"{name}: {value}" + (";" if params else ""),
                       *[p + (";" if i < len(params) - 1 else "") for i, p in enumerate(params)]])


# -- bodies --------------------------------------------------------------------------------

def _text_part(subtype: str, text: str) -> list[str]:
    """7bit when the text is short-lined ASCII, else quoted-printable: never base64,
    which spam filters hold against text parts (rspamd MIME_BASE64_TEXT)."""
    if text.isascii() and "\r" not in text and all(len(line) <= MAX_LINE
                                                    for line in text.split("\n")):
        encoding, body = "7bit", text
    else:
        encoding = "quoted-printable"
        body = binascii.b2a_qp(text.encode(), istext=True).decode("ascii")
    return [f'Content-Type: text/{subtype}; charset="utf-8"',
            f"Content-Transfer-Encoding: {encoding}", "", body.rstrip("\n")]


def _attachment_part(item: Attachment) -> list[str]:
    maintype, _, subtype = item.content_type.partition("/")
    content_type = f"{maintype or 'application'}/{subtype or 'octet-stream'}"
    return [_param_header("Content-Type", content_type, _name_params("name", item.filename)),
            "Content-Transfer-Encoding: base64",
            _param_header("Content-Disposition", "attachment",
                          _name_params("filename", item.filename)),
            "", base64.encodebytes(item.content).decode("ascii").rstrip("\n")]


def _multipart(subtype: str, parts: Sequence[list[str]]) -> list[str]:
    # "=_" never occurs in quoted-printable or base64 text, so the boundary cannot either.
    boundary = f"=_{secrets.token_hex(12)}"
    lines = [_param_header("Content-Type", f"multipart/{subtype}", [f'boundary="{boundary}"']),
             ""]
    for part in parts:
        lines += [f"--{boundary}", *part]
    lines += [f"--{boundary}--", ""]
    return lines


def build_message(*, sender: str, sender_name: str | None, to: str, email: RenderedEmail,
                  attachments: Sequence[Attachment] = (),
                  reply_to: str | None = None) -> OutgoingMail:
    """multipart/alternative (text + HTML), in multipart/mixed when there are attachments.

    Written out by hand rather than by the email package: its compat32 generator
    base64-encodes every UTF-8 part and folds encoded words past RFC 2047's
    limits, and the modern EmailMessage API costs milliseconds per header. Here
    text is 7bit or quoted-printable, every header line is at most 78 characters,
    attachment names carry an ASCII fallback, and `Auto-Submitted` keeps
    out-of-office replies away from the no-reply sender. A CR or LF in a header
    value is refused, so it never reaches the wire.
    """
    for name, value in (("To", to), ("Subject", email.subject), ("From", sender),
                        ("SMTP_FROM_NAME", sender_name or ""), ("Reply-To", reply_to or "")):
        if "\r" in value or "\n" in value:
            raise PermanentError(f"{name} contains CR or LF: refused")
    for item in attachments:
        if any(unicodedata.category(c) == "Cc" for c in item.filename):
            raise PermanentError(f"attachment name {item.filename!r} contains control characters")
    domain = sender.rpartition("@")[2] or "localhost"
    message_id = make_msgid(domain=domain)
    body = _multipart("alternative", [_text_part("plain", email.text),
                                      _text_part("html", email.html)])
    if attachments:
        body = _multipart("mixed", [body, *[_attachment_part(a) for a in attachments]])
    headers = [
        _mailbox("From", sender_name, sender),
        _fold("To", [to]),
        *([_fold("Reply-To", [reply_to])] if reply_to else []),
        _unstructured("Subject", email.subject),
        f"Date: {format_datetime(datetime.now(UTC))}",
        f"Message-ID: {message_id}",
        "MIME-Version: 1.0",
        "Auto-Submitted: auto-generated",
        # Exchange and Outlook ignore Auto-Submitted; this asks them the same.
        "X-Auto-Response-Suppress: OOF, AutoReply",
    ]
    try:
        raw = "\n".join([*headers, *body]).encode("ascii")
    except UnicodeEncodeError:
        raise PermanentError("an address contains non-ASCII characters: "
                             "use the ASCII (punycode) form") from None
    return OutgoingMail(sender, to, message_id, raw)


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


def classify(exc: BaseException) -> PermanentError | RetryableError:
    """Map an SMTP (or socket, TLS) failure onto the failure policy.

    Only the server's verdict on a mail (MAIL, RCPT, DATA, the message) can be
    permanent; trouble with the session itself is an outage, waited out.
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
        return RetryableError(f"recipient deferred: {exc.reply}")
    if isinstance(exc, SmtpSessionRefused):
        return RetryableError(f"SMTP server refused the session at {exc.command}: {exc.reply}",
                              outage=True)
    if isinstance(exc, SmtpReplyError):
        if exc.code >= 500:
            return PermanentError(f"SMTP server rejected the mail: {exc.reply}")
        return RetryableError(f"SMTP server deferred the mail: {exc.reply}")
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

    async def sendmail(self, sender: str, recipient: str, raw: bytes) -> None:
        """MAIL, RCPT, DATA and the message.

        Raises:
            SmtpReplyError: a reply that refuses the mail (discard the connection).
            DeliveryUnknown: the conversation broke off after DATA was sent.
        """
        for address in (sender, recipient):
            if not _ENVELOPE_ADDRESS.match(address):
                raise PermanentError(f"{address!r} cannot be an envelope address")
        if not raw.endswith(b"\n"):
            raw += b"\n"  # the end mark must start a line of its own
        await self.loop.call(_send_mail, self.client, sender, recipient, raw)

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


async def _send_mail(client: aiosmtplib.SMTP, sender: str, recipient: str, raw: bytes) -> None:
    octets = len(raw) + raw.count(b"\n")  # as sent: each line end becomes CRLF
    size = [f"SIZE={octets}"] if client.supports_extension("size") else []
    try:
        await client.mail(sender, options=size)
    except aiosmtplib.SMTPResponseException as exc:
        if exc.code == 421:  # closing the channel (aiosmtplib has closed it too)
            raise ConnectionGone(f"421 {' '.join(exc.message.split())[:200]}") from None
        raise SmtpReplyError("MAIL FROM", exc.code, exc.message) from None
    except aiosmtplib.SMTPServerDisconnected as exc:
        raise ConnectionGone(str(exc) or type(exc).__name__) from exc
    try:
        await client.rcpt(recipient)
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


def helo_name(settings: Settings) -> str:
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


def check_mail_settings(settings: Settings) -> None:
    """Refuse at start-up what would fail every mail later.

    Raises:
        ConfigError: naming the variable and the fix.
    """
    if settings.smtp_reply_to is not None and not _ADDRESS.match(settings.smtp_reply_to):
        raise ConfigError("SMTP_REPLY_TO is not an email address: set it to the address "
                          "that answers replies, e.g. support@example.com, or leave it unset")
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


class SmtpMailer:
    """A small pool of persistent SMTP connections.

    A connection goes back to the pool as soon as the server has accepted a
    mail (its slot too: the caller's ledger write does not hold it); one idle
    for SMTP_POOL_IDLE_S is closed with QUIT by `reap_idle` (servers otherwise
    time it out and log it), and one the server closed is replaced before it
    carries a mail.
    """

    def __init__(self, settings: Settings) -> None:
        check_mail_settings(settings)
        self.settings = settings
        self.security = settings.smtp_security_effective
        self.helo_name = helo_name(settings)
        self._idle: list[tuple[SmtpConnection, float]] = []  # (connection, idle since)
        self._went_idle = trio.Event()
        self._slots = trio.Semaphore(settings.smtp_pool_size)
        # Loading the CA store costs milliseconds: once, not per connection.
        self._tls = self._tls_context() if self.security != "none" else None
        # aiosmtplib's event loop, in a thread of its own (closed by aclose).
        self._loop = AsyncioThread("reactor-smtp")
        self._loop.start()

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()  # certificates are always verified
        if self.settings.smtp_ca_file:
            context.load_verify_locations(cafile=str(self.settings.smtp_ca_file))
        return context

    async def _connect(self) -> SmtpConnection:
        s = self.settings
        host = s.smtp_host or "localhost"
        try:
            return await SmtpConnection.open(
                self._loop, host=host, port=s.smtp_port, reply_timeout_s=s.smtp_timeout_s,
                security=self.security, tls=self._tls, helo=self.helo_name,
                user=s.smtp_user, password=s.smtp_pass.get_secret_value() if s.smtp_pass else "")
        except SmtpAuthFailed as exc:
            log.error("SMTP authentication failed: check SMTP_USER and SMTP_PASS",
                      host=host, code=exc.code)
            raise classify(exc) from None
        except Exception as exc:
            raise classify(exc) from None

    async def _checkout(self) -> SmtpConnection:
        """A pooled connection that still works, else a new one.

        One that was idle for a while, or whose server has said something since
        (closed it, or sent 421 first), is asked NOOP first: a connection the
        server dropped costs a reconnect, not a failed send.
        """
        while self._idle:
            client, since = self._idle.pop()  # the most recently used: the others may expire
            if trio.current_time() - since < PROBE_AFTER_S and client.idle_and_quiet():
                return client
            try:
                await client.noop()
                return client
            except Exception as exc:
                log.debug("pooled SMTP connection no longer answers; reconnecting",
                          error=f"{type(exc).__name__}: {exc}")
                await self._discard(client)
            except BaseException:  # cancelled mid-NOOP: the connection is in doubt
                await self._discard(client)
                raise
        return await self._connect()

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[MailSession]:
        """A pool slot and a working connection (waiting is cancellable); back to the
        pool as soon as the mail is accepted, or at the end of the block, unless the
        conversation failed or was cut."""
        await self._slots.acquire()
        try:
            client = await self._checkout()
        except BaseException:
            self._slots.release()
            raise
        session = _SmtpSession(self, client)
        try:
            yield session
        finally:
            await session.finish(usable=session.usable)

    def _give_back(self, client: SmtpConnection | None) -> None:
        """The slot is free again; the connection, if any, waits in the pool."""
        if client is not None:
            self._idle.append((client, trio.current_time()))
            self._went_idle.set()
        self._slots.release()

    async def send(self, mail: OutgoingMail) -> str:
        async with self.session() as session:
            return await session.send(mail)

    async def reap_idle(self) -> None:
        """Close connections idle for SMTP_POOL_IDLE_S with QUIT; runs until cancelled."""
        idle_s = self.settings.smtp_pool_idle_s
        while True:
            now = trio.current_time()
            expired = [client for client, since in self._idle if now - since >= idle_s]
            self._idle = [(client, since) for client, since in self._idle
                          if now - since < idle_s]
            await self._quit_all(expired)
            if self._idle:
                await trio.sleep_until(min(since for _, since in self._idle) + idle_s)
            else:
                self._went_idle = trio.Event()
                await self._went_idle.wait()

    async def _quit_all(self, clients: list[SmtpConnection]) -> None:
        """QUIT the connections side by side, all within one bound (a relay that does
        not answer QUIT must not cost one bound per connection), then close them."""
        try:
            with trio.move_on_after(min(5.0, self.settings.smtp_timeout_s)):
                async with trio.open_nursery() as nursery:
                    for client in clients:
                        nursery.start_soon(self._say_quit, client)
        finally:
            for client in clients:  # after QUIT too: a TLS close may not have finished
                await self._discard(client)

    @staticmethod
    async def _say_quit(client: SmtpConnection) -> None:
        try:
            await client.quit()
        except Exception as exc:
            log.debug("QUIT on an idle SMTP connection failed", error=str(exc))

    @staticmethod
    async def _discard(client: SmtpConnection | None) -> None:
        """Close the connection now, socket included, whatever state it is in."""
        if client is not None:
            await client.abort()

    async def aclose(self) -> None:
        """QUIT the idle connections, then end the asyncio thread (shielded: it runs on
        the way out of cancelled scopes too)."""
        with trio.CancelScope(shield=True):
            idle, self._idle = self._idle, []
            await self._quit_all([client for client, _ in idle])
            await self._loop.aclose()


class _SmtpSession:
    """One conversation on a pooled connection."""

    def __init__(self, pool: SmtpMailer, client: SmtpConnection) -> None:
        self.pool = pool
        self.client: SmtpConnection | None = client
        self.usable = True

    async def send(self, mail: OutgoingMail) -> str:
        client = self.client
        if client is None or not self.usable:
            raise RuntimeError("one mail per session")
        self.usable = False  # until the server has answered the whole mail
        try:
            try:
                await client.sendmail(mail.sender, mail.recipient, mail.raw)
            except ConnectionGone as exc:
                if not client.carried:
                    raise
                # A connection that has carried mail, closed by the server since (a
                # per-connection limit: 250 and the hang-up in one breath, or 421 at
                # the next MAIL) before our check could see it: nothing of this mail
                # went out, so a new connection carries it, once.
                log.debug("pooled SMTP connection closed by the server; reconnecting",
                          error=str(exc))
                client = await self.pool._connect()
                stale, self.client = self.client, client
                await self.pool._discard(stale)
                await client.sendmail(mail.sender, mail.recipient, mail.raw)
        except (PermanentError, RetryableError, DeliveryUnknown):  # already told apart
            await self.finish(usable=False)
            raise
        except Exception as exc:
            await self.finish(usable=False)
            raise classify(exc) from None
        client.carried += 1
        await self.finish(usable=True)
        return mail.message_id

    async def finish(self, *, usable: bool) -> None:
        """Give the slot back, with the connection if it is in step; once."""
        client, self.client = self.client, None
        if client is None:
            return
        if usable:
            self.pool._give_back(client)
            return
        try:
            await self.pool._discard(client)
        finally:
            self.pool._give_back(None)


class FileMailer:
    """Writes each mail as an .eml file, atomically (temp file, then rename)."""

    def __init__(self, outbox: Path) -> None:
        self.outbox = outbox

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[MailSession]:
        yield self

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
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mailer.reap_idle)
        try:
            yield mailer
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await mailer.aclose()
