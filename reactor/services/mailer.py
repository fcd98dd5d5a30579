"""Sending mail: SMTP (a trio-native client, pooled, pipelining) or a file outbox.

The SMTP client is this module's own, on trio streams (TCP, TLS): the
asyncio libraries need an asyncio loop, and aiosmtplib driven through
trio-asyncio cost the reactor ~1.2 ms of CPU a mail and could not pipeline.
Everything else sees `Mailer.session` / `Mailer.send`.
Every SMTP failure is classified here into the failure policy's two kinds:
connection trouble, timeouts and 4xx replies are retried; a 5xx rejection of
a mail is permanent and carries the server's reply.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import ipaddress
import re
import secrets
import select
import ssl
import unicodedata
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, formataddr, make_msgid
from pathlib import Path
from typing import Final, Protocol

import structlog
import trio

from reactor.config import ConfigError, Settings
from reactor.errors import PermanentError, RetryableError
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


class SmtpProtocolError(ConnectionError):
    """The server closed the connection, or said something that is not SMTP."""


def classify(exc: BaseException) -> PermanentError | RetryableError:
    """Map an SMTP (or socket, TLS) failure onto the failure policy.

    Only the server's verdict on a mail (MAIL, RCPT, DATA, the message) can be
    permanent; trouble with the session itself is an outage, waited out.
    """
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
    if isinstance(exc, TimeoutError | trio.TooSlowError):
        return RetryableError(f"SMTP timed out: {exc}", outage=True)
    cause = exc.__cause__
    detail = str(exc) or (f"{type(cause).__name__}: {cause}" if cause else "it broke off")
    return RetryableError(f"SMTP connection failed: {type(exc).__name__}: {detail}",
                          outage=True)


@contextlib.contextmanager
def _deadline(seconds: float, what: str, *, reply: bool = True) -> Iterator[None]:
    """At most `seconds` (SMTP_TIMEOUT_S) for one step of the conversation, else
    TimeoutError naming the step: the reply to `what`, or `what` itself."""
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        step = f"the reply to {what}" if reply else what
        raise TimeoutError(f"{step} took longer than SMTP_TIMEOUT_S={seconds:g}") from None


_MAX_REPLY: Final = 64 * 1024  # a server that says more than this in one reply is not SMTP
_ENVELOPE_ADDRESS: Final = re.compile(r"^[!-;=?-~]+$")  # printable ASCII, no space, < or >


def _data(raw: bytes) -> bytes:
    """The message as DATA carries it: CRLF line ends, leading dots doubled, the end mark.

    bytes.replace rather than a regular expression: a tenth of the time.
    """
    wire = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    wire = (b"." if wire.startswith(b".") else b"") + wire.replace(b"\r\n.", b"\r\n..")
    return wire + (b".\r\n" if wire.endswith(b"\r\n") else b"\r\n.\r\n")


class SmtpConnection:
    """One SMTP session on a trio stream (TCP, or TLS over it).

    Written for trio rather than borrowed from an asyncio library: the bench
    measured aiosmtplib under trio-asyncio at ~1.2 ms of CPU a mail, this at
    ~0.15, and it pipelines MAIL, RCPT and DATA (RFC 2920) when the server
    offers PIPELINING, which halves the round trips per mail. Every command
    waits at most `timeout` for its reply (TimeoutError).
    """

    def __init__(self, stream: trio.abc.Stream, host: str, timeout: float) -> None:
        self.stream = stream
        self.host = host
        self.timeout = timeout
        self.extensions: dict[str, str] = {}
        self._buffer = bytearray()
        self.last_lines: list[str] = []  # the text lines of the last reply (EHLO's keywords)

    # -- the wire --

    async def _write(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _reply(self, command: str) -> tuple[int, str]:
        """The next reply (all its lines): its code and its text, joined into one line."""
        lines: list[bytes] = []
        size = 0
        while True:
            end = self._buffer.find(b"\r\n")
            if end < 0:
                if len(self._buffer) + size > _MAX_REPLY:
                    raise SmtpProtocolError(f"the reply to {command} is too long")
                data = await self.stream.receive_some(65536)
                if not data:
                    raise SmtpProtocolError(f"the server closed the connection ({command})")
                self._buffer += data
                continue
            line = bytes(self._buffer[:end])
            del self._buffer[:end + 2]
            size += len(line)
            code = line[:3]
            if len(code) < 3 or not code.isdigit() or line[3:4] not in (b"", b" ", b"-"):
                raise SmtpProtocolError(f"not an SMTP reply to {command}: "
                                        f"{line[:80].decode('ascii', 'replace')!r}")
            lines.append(line[4:])
            if line[3:4] != b"-":
                self.last_lines = [part.decode("utf-8", "replace").strip() for part in lines]
                return int(code), " ".join(" ".join(self.last_lines).split())

    async def command(self, line: str, command: str | None = None) -> tuple[int, str]:
        """Send one command, wait for its reply."""
        name = command or line.split(" ", 1)[0]
        with _deadline(self.timeout, name):
            await self._write(line.encode("ascii") + b"\r\n")
            return await self._reply(name)

    def idle_and_quiet(self) -> bool:
        """Nothing has arrived since the last reply: a server that closed an idle
        connection (or sent 421 first) makes its socket readable."""
        if self._buffer:
            return False
        stream = self.stream
        while isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        if not isinstance(stream, trio.SocketStream):
            return False
        poller = select.poll()
        poller.register(stream.socket.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
        return not poller.poll(0)

    # -- the session --

    async def greet(self, helo: str) -> None:
        """Read the greeting, then EHLO (HELO if the server knows no better)."""
        with _deadline(self.timeout, "the greeting", reply=False):
            code, text = await self._reply("the greeting")
        if code != 220:
            raise SmtpSessionRefused("the greeting", code, text)
        await self.ehlo(helo)

    async def ehlo(self, helo: str) -> None:
        self.extensions = {}
        with _deadline(self.timeout, "EHLO"):
            await self._write(f"EHLO {helo}\r\n".encode("ascii"))
            code, _ = await self._reply("EHLO")
            lines = self.last_lines
        if code == 250:
            for line in lines[1:]:
                keyword, _, params = line.partition(" ")
                keyword, eq, legacy = keyword.partition("=")  # old "AUTH=LOGIN" form
                self.extensions[keyword.upper()] = (params or legacy if eq else params).strip()
            return
        code, text = await self.command(f"HELO {helo}")
        if code != 250:
            raise SmtpSessionRefused("HELO", code, text)

    async def starttls(self, context: ssl.SSLContext, helo: str) -> None:
        if "STARTTLS" not in self.extensions:
            raise SmtpUnsupported("does not offer STARTTLS, which SMTP_SECURITY=starttls asks "
                                  "for: set SMTP_SECURITY (ssl for port 465) to what it offers")
        code, text = await self.command("STARTTLS")
        if code != 220:
            raise SmtpSessionRefused("STARTTLS", code, text)
        if self._buffer:  # plaintext sent after the 220 would pass as TLS-protected
            raise SmtpProtocolError("the server sent data after agreeing to STARTTLS")
        tls = trio.SSLStream(self.stream, context, server_hostname=self.host)
        with _deadline(self.timeout, "the TLS handshake", reply=False):
            await tls.do_handshake()
        self.stream = tls
        await self.ehlo(helo)

    async def login(self, user: str, password: str) -> None:
        """AUTH with the first mechanism both sides know: PLAIN, LOGIN, CRAM-MD5."""
        offered = self.extensions.get("AUTH", "").upper().split()
        if "AUTH" not in self.extensions:
            raise SmtpUnsupported("offers no AUTH, yet SMTP_USER is set: unset SMTP_USER and "
                                  "SMTP_PASS, or use SMTP_SECURITY=starttls/ssl (many servers "
                                  "offer AUTH only over TLS)")

        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode("ascii")

        secret = password.encode()
        if "PLAIN" in offered:
            code, text = await self.command(
                "AUTH PLAIN " + b64(b"\0" + user.encode() + b"\0" + secret), "AUTH")
        elif "LOGIN" in offered:
            code, text = await self.command("AUTH LOGIN")
            if code == 334:
                code, text = await self.command(b64(user.encode()), "AUTH")
            if code == 334:
                code, text = await self.command(b64(secret), "AUTH")
        elif "CRAM-MD5" in offered:
            code, text = await self.command("AUTH CRAM-MD5")
            if code == 334:
                try:
                    challenge = base64.b64decode(text, validate=True)
                except binascii.Error:
                    raise SmtpProtocolError("not a CRAM-MD5 challenge") from None
                digest = hmac.new(secret, challenge, "md5").hexdigest()
                code, text = await self.command(b64(f"{user} {digest}".encode()), "AUTH")
        else:
            raise SmtpUnsupported(f"offers AUTH {' '.join(offered) or '(nothing)'}, none of "
                                  "PLAIN, LOGIN, CRAM-MD5: ask the provider for an account "
                                  "that can use one")
        if code != 235:
            raise SmtpAuthFailed("AUTH", code, text)

    async def sendmail(self, sender: str, recipient: str, raw: bytes) -> None:
        """MAIL, RCPT, DATA and the message: pipelined when the server offers it.

        Raises:
            SmtpReplyError: a reply that refuses the mail (the connection is then
                out of step: discard it).
        """
        for address in (sender, recipient):
            if not _ENVELOPE_ADDRESS.match(address):
                raise PermanentError(f"{address!r} cannot be an envelope address")
        data = _data(raw)
        size = f" SIZE={len(data)}" if "SIZE" in self.extensions else ""
        envelope = [f"MAIL FROM:<{sender}>{size}", f"RCPT TO:<{recipient}>", "DATA"]
        names, expected = ("MAIL FROM", "RCPT TO", "DATA"), ((250,), (250, 251), (354,))
        replies: list[tuple[int, str]] = []
        if "PIPELINING" in self.extensions:
            with _deadline(self.timeout, "MAIL FROM"):
                await self._write("".join(f"{line}\r\n" for line in envelope).encode("ascii"))
                replies.append(await self._reply("MAIL FROM"))
            # One deadline a reply, as if sent one by one: the same bound on the whole.
            for name in ("RCPT TO", "DATA"):
                with _deadline(self.timeout, name):
                    replies.append(await self._reply(name))
        else:
            for line, name, ok in zip(envelope, names, expected, strict=True):
                replies.append(await self.command(line, name))
                if replies[-1][0] not in ok:
                    break
        # The first refusal is the one that counts (after it, a pipelining server
        # answers 503 "bad sequence" to what follows).
        for (code, text), name, ok in zip(replies, names, expected, strict=False):
            if code not in ok:
                error = SmtpRecipientRefused if name == "RCPT TO" else SmtpReplyError
                raise error(name, code, text)
        written = False
        try:
            with _deadline(self.timeout, "the message"):
                await self._write(data)
                written = True  # the end mark is out: the server may accept it from here on
                code, text = await self._reply("the message")
        except Exception as exc:
            if not written:
                raise  # the end mark never left: the server cannot have accepted the mail
            reason = str(exc)
            if not isinstance(exc, TimeoutError):
                reason = f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
            raise DeliveryUnknown(f"no answer to the end of the message ({reason}): the "
                                  "server may have accepted it") from exc
        if code != 250:
            raise SmtpReplyError("the message", code, text)

    async def noop(self) -> None:
        code, text = await self.command("NOOP")
        if code != 250:
            raise SmtpReplyError("NOOP", code, text)

    async def quit(self) -> None:
        await self.command("QUIT")
        await self.stream.aclose()


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

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()  # certificates are always verified
        if self.settings.smtp_ca_file:
            context.load_verify_locations(cafile=str(self.settings.smtp_ca_file))
        return context

    async def _connect(self) -> SmtpConnection:
        s = self.settings
        host = s.smtp_host or "localhost"
        client: SmtpConnection | None = None
        try:
            with _deadline(s.smtp_timeout_s, f"connecting to {host}:{s.smtp_port}",
                           reply=False):
                stream: trio.abc.Stream = await trio.open_tcp_stream(host, s.smtp_port)
            client = SmtpConnection(stream, host, s.smtp_timeout_s)
            if self.security == "ssl":
                assert self._tls is not None
                tls = trio.SSLStream(stream, self._tls, server_hostname=host)
                client.stream = tls
                with _deadline(s.smtp_timeout_s, "the TLS handshake", reply=False):
                    await tls.do_handshake()
            await client.greet(self.helo_name)
            if self.security == "starttls":
                assert self._tls is not None
                await client.starttls(self._tls, self.helo_name)
            if s.smtp_user:
                await client.login(s.smtp_user,
                                   s.smtp_pass.get_secret_value() if s.smtp_pass else "")
        except SmtpAuthFailed as exc:
            await self._discard(client)
            log.error("SMTP authentication failed: check SMTP_USER and SMTP_PASS",
                      host=host, code=exc.code)
            raise classify(exc) from None
        except Exception as exc:
            await self._discard(client)
            raise classify(exc) from None
        except BaseException:  # cancelled while connecting (job timeout, shutdown)
            await self._discard(client)
            raise
        return client

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
            for client in expired:
                await self._quit(client)
            if self._idle:
                await trio.sleep_until(min(since for _, since in self._idle) + idle_s)
            else:
                self._went_idle = trio.Event()
                await self._went_idle.wait()

    async def _quit(self, client: SmtpConnection) -> None:
        try:
            with trio.move_on_after(min(5.0, self.settings.smtp_timeout_s)):
                try:
                    await client.quit()
                except Exception as exc:
                    log.debug("QUIT on an idle SMTP connection failed", error=str(exc))
        finally:
            await self._discard(client)  # after QUIT too: a TLS close may not have finished

    @staticmethod
    async def _discard(client: SmtpConnection | None) -> None:
        """Close the connection now, socket included, whatever state it is in."""
        if client is not None:
            await trio.aclose_forcefully(client.stream)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for client, _ in idle:
            await self._quit(client)


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
            await client.sendmail(mail.sender, mail.recipient, mail.raw)
        except (PermanentError, DeliveryUnknown):
            await self.finish(usable=False)
            raise
        except Exception as exc:
            await self.finish(usable=False)
            raise classify(exc) from None
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
