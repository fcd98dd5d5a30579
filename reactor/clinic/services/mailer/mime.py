"""Writing a mail: text and HTML, attachments, and headers every reader and filter accepts.

`build_message` builds the message with the standard library's `email` package
(`EmailMessage`, `email.policy.SMTP`): multipart structure, 7bit or
quoted-printable bodies, base64 attachments, RFC 2231 file names, Date and
Message-ID. What it returns, `OutgoingMail`, is what every mailer sends.

Two things the package is asked for differently, and why (Python 3.11, what the
image runs):
- Subjects and display names that need RFC 2047 encoded words are encoded by the
  package's own `email.header.Header`, not by `policy.SMTP`'s folder: on 3.11 that
  folder writes encoded words of 76-77 characters (RFC 2047 allows 75) and drops the
  space at a fold between two encoded words ("записана: очень" arrives as
  "записана:очень"); of 201 Russian subjects and names (those of
  `test_any_subject_and_display_name_round_trip_within_the_limits`), 183 broke one
  or the other.
- An attachment's name goes twice: RFC 2231 (`filename*=`, the package's encoding)
  for readers that know it, and a plain ASCII `filename=` and `name=` for those that
  do not (munpack, old Outlook). The package keeps one value per parameter name, so
  the plain one is appended on a line of its own to what the package wrote.
Both reach the message as header objects, which the package stores and writes as
they are (EmailPolicy's documented protocol: a value that has a `name` is stored
unchanged and written by its `fold`).

What it costs: the package parses and refolds every header it is given, in
Python. The headers we make as one short ASCII line (Date, Message-ID, an
address, a plain subject: `_line`) are stored as written, by the same protocol;
the rest (the parts' Content-Type and encoding, encoded words) is the package's,
and what is the same in every mail is parsed and folded once per process
(`_HeaderClasses`, `_FoldedOnce`, `_sender`: the package never changes a header
object once made). Two more steps go round the package's slow paths through its
documented hooks: the text parts are set by a content manager of our own
(`_set_text`: quoted-printable from binascii's C encoder, not quoprimime's loop
over each character), and a multipart's boundary is given as its Content-Type
written out (`_set_boundary`), not added by reparsing the header.
A Russian mail takes 0.18 ms of CPU to build on 3.11, its recipient's address
already checked as in the pipeline (0.40 ms without those two steps, 0.67 ms
without any sharing; the hand-written writer this replaced, 0.04 ms; side by
side). The rest is the package's own: its generator writes a body line by line, and
`Header` measures an encoded word a character at a time. What it costs the pipeline
is in docs/benchmarks.md (Mail).

`ascii_filename` transliterates by hand: Unidecode would do it, but it is GPL and
a dependency for 33 Russian letters.
"""

from __future__ import annotations

import binascii
import email.policy
import functools
import re
import secrets
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.contentmanager import ContentManager
from email.header import Header
from email.headerregistry import BaseHeader, HeaderRegistry
from email.message import EmailMessage, MIMEPart
from email.policy import Policy
from email.utils import format_datetime, formataddr, make_msgid, quote
from typing import Any, Final

from reactor.clinic.services.mailer.address import WireAddress, wire_address
from reactor.clinic.services.templates import RenderedEmail
from reactor.engine.errors import PermanentError

__all__ = ["MAX_ENCODED_WORD", "MAX_LINE", "Attachment", "OutgoingMail", "ascii_filename",
           "build_message", "header_safe"]

# RFC 5322 §2.1.1: header lines SHOULD stay within 78 characters; RFC 2047 §2: an
# encoded word is at most 75. Spam filters score mails that ignore either.
MAX_LINE: Final = 78
MAX_ENCODED_WORD: Final = 75


class _FoldedOnce(BaseHeader):
    """The base of every header class (HeaderRegistry's documented `base_class`): a
    header object keeps what its `fold` wrote for each output policy. The email package
    never changes a header object after making it (checked for 3.11: setting a parameter
    or a boundary makes a new one), so its folded form under one policy never changes;
    the ones `_HeaderClasses` shares between mails are refolded by the package's parser
    once per process instead of once per mail."""

    def fold(self, *, policy: Policy) -> str:
        # What the fold depends on: the generator hands each part a clone of its policy.
        key = (policy.linesep, policy.max_line_length, policy.utf8)  # type: ignore[attr-defined]
        folds: dict[tuple[str, int | None, bool], str] = self.__dict__.setdefault("_folds", {})
        folded = folds.get(key)
        if folded is None:
            folded = folds[key] = super().fold(policy=policy)
        return folded


class _HeaderClasses:
    """A policy's `header_factory` (documented: called with a name and a value, it makes
    the header object; indexed by a name, it gives that header's class): the stock
    HeaderRegistry's, with two savings.

    - Each name's class is made once: the stock registry makes a new class for every
      header it is asked about (twice per header set), a quarter of a build.
    - A structural header gives the same object for the same value (`_structural`: what
      a part's set-up writes from its kind, such as `text/plain; charset="utf-8"`,
      `quoted-printable`, `multipart/alternative`; every header the package parses in a
      mail without files, all but the file's name in one with): parsing each again was
      another third of a build. Values that carry something of one mail (a boundary, a
      file name) are never kept, so the cache holds no family's data, and at most
      `SHARED_HEADERS` short values.
    """

    SHARED_HEADERS: Final = 64
    SHARED_VALUE_CHARS: Final = 64
    _SHARED_NAMES: Final = frozenset({"content-type", "content-transfer-encoding",
                                      "mime-version", "content-disposition"})
    _SHARED_PARAMS: Final = frozenset({"", 'charset="utf-8"', 'charset="us-ascii"'})

    def __init__(self) -> None:
        self._registry = HeaderRegistry(base_class=_FoldedOnce)
        self._made = functools.lru_cache(maxsize=self.SHARED_HEADERS)(self._make)

    @functools.cache  # noqa: B019 - one instance, for the life of the process
    def __getitem__(self, name: str) -> type[BaseHeader]:
        return self._registry[name]

    def _make(self, name: str, value: str) -> BaseHeader:
        return self[name](name, value)

    def _structural(self, name: str, value: Any) -> bool:
        """A value the package writes from a part's kind alone: one of the MIME headers,
        short, with no parameter but the charset."""
        return (type(value) is str and len(value) <= self.SHARED_VALUE_CHARS
                and name.lower() in self._SHARED_NAMES
                and value.partition(";")[2].strip() in self._SHARED_PARAMS)

    def __call__(self, name: str, value: Any) -> BaseHeader:
        if self._structural(name, value):
            return self._made(name, value)
        return self[name](name, value)


# What the message is built under, and what it is written out with: the mailers send LF
# line ends (aiosmtplib makes them CRLF on the wire; the outbox writes .eml files).
_POLICY: Final = email.policy.SMTP.clone(header_factory=_HeaderClasses())
_OUTPUT: Final = _POLICY.clone(linesep="\n")
# A mail to an address without an ASCII form (RFC 6532): the same, its To header in UTF-8.
_OUTPUT_UTF8: Final = _OUTPUT.clone(utf8=True)


@dataclass(frozen=True)
class Attachment:
    filename: str
    content: bytes
    content_type: str = "application/pdf"


@dataclass(frozen=True)
class OutgoingMail:
    """A mail ready for the wire: envelope and the bytes, flattened once. `recipient` is
    the address's wire form (mailer.address); `smtputf8`: it has no ASCII form, and the
    mail goes only with SMTPUTF8 (RFC 6531)."""

    sender: str
    recipient: str
    message_id: str
    raw: bytes
    smtputf8: bool = False


class _Written(str):
    """A header value already folded, lines joined by LF, that the email package writes
    as it is: it has a `name`, so EmailPolicy stores it unchanged and writes its `fold`.
    Being a str, it also reads as the header it is (`get_content_type`, `get_filename`)."""

    name: str

    def __new__(cls, name: str, folded: str) -> _Written:
        self = super().__new__(cls, folded)
        self.name = name
        return self

    def fold(self, *, policy: Policy) -> str:
        return f"{self.name}: {self}".replace("\n", policy.linesep) + policy.linesep


def _encoded(name: str, text: str, address: str | None = None) -> _Written:
    """`text` as RFC 2047 encoded words (then `<address>`), folded within the limits."""
    # maxlinelen counts the continuation lines' leading space: words stay within 75.
    header = Header(text, "utf-8", maxlinelen=MAX_ENCODED_WORD, header_name=name)
    if address is not None:
        header.append(f"<{address}>", "us-ascii")
    return _Written(name, header.encode(linesep="\n"))


@functools.lru_cache(maxsize=8)
def _sender(name: str | None, address: str) -> _Written | str:
    """The From header: the same in every mail (SMTP_FROM_NAME and SMTP_FROM are
    settings), so made once."""
    if not name:
        return _line("From", address)
    if _plain(name):
        return _line("From", formataddr((name, address)))
    return _encoded("From", name, address)


@functools.lru_cache(maxsize=1)
def _date(second: int) -> _Written | str:
    """The Date header of the mails made within one second: formatted once."""
    return _line("Date", format_datetime(datetime.fromtimestamp(second, UTC)))


def header_safe(value: str, *, allow_tab: bool = False) -> str | None:
    """Why `value` cannot go into a mail header (a control character: CR, LF, NUL, ...;
    a Unicode line or paragraph separator), else None."""
    for char in value:
        if char == "\t" and allow_tab:
            continue
        if unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            return f"must not contain control characters (found {char!r})"
    return None


def _line(name: str, value: str) -> _Written | str:
    """A header the package would only parse and write back the same: an ASCII value that
    fits one line (what email.utils makes: a date, a Message-ID, an address), stored as
    written. Parsing and refolding such a header took a third of a mail's build. Any
    other value (empty, a tab, a control character: the package's own checks refuse
    what would break the line) goes to the package as it is."""
    if (value and value.isascii() and value.isprintable() and "=?" not in value
            and len(name) + 2 + len(value) <= MAX_LINE):
        return _Written(name, value)
    return value


def _plain(text: str) -> bool:
    """Text the package folds at its spaces and writes as it is: ASCII that a reader
    cannot take for an encoded word, with no word too long for a line (the package would
    encode that one, with 3.11's faults)."""
    return (text.isascii() and "=?" not in text
            and all(len(word) <= MAX_LINE - len("Subject: ") for word in text.split(" ")))


# The headers that are the same in every mail whatever its settings: made once.
_AUTO_SUBMITTED: Final = _line("Auto-Submitted", "auto-generated")
# Exchange and Outlook ignore Auto-Submitted; this asks them the same.
_NO_AUTO_REPLY: Final = _line("X-Auto-Response-Suppress", "OOF, AutoReply")
# RFC 2045 wants it at the top only: the parts are MIMEParts, which have none.
_MIME_VERSION: Final = _line("MIME-Version", "1.0")


# -- attachments ---------------------------------------------------------------------------

_RU_LATIN: Final = dict(zip(
    "абвгдеёжзийклмнопрстуфхцчшщъыьэюя",
    ["a", "b", "v", "g", "d", "e", "e", "zh", "z", "i", "y", "k", "l", "m", "n", "o", "p",
     "r", "s", "t", "u", "f", "kh", "ts", "ch", "sh", "shch", "", "y", "", "e", "yu", "ya"],
    strict=True))
_UNSAFE_IN_QUOTES: Final = re.compile(r'[^A-Za-z0-9 !#$%&\'()*+,\-.:;<=>?@\[\]^_`{|}~]')
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


# -- the message ---------------------------------------------------------------------------

def _cte(text: str) -> str:
    """7bit when the text is short-lined ASCII, else quoted-printable: never base64,
    which spam filters hold against text parts (rspamd MIME_BASE64_TEXT)."""
    if text.isascii() and "\r" not in text and all(len(line) <= MAX_LINE
                                                    for line in text.split("\n")):
        return "7bit"
    return "quoted-printable"


def _set_text(part: MIMEPart, text: str, subtype: str) -> None:
    """The text content manager's handler: what the package's `raw_data_manager` does
    for a str with `cte=` given (the same headers, the body's lines ended by LF, 7bit
    as it is), with one difference: quoted-printable comes from `binascii.b2a_qp`, the
    standard library's C encoder (what `quopri` uses), where raw_data_manager calls
    `email.quoprimime.body_encode`, which loops over every character in Python (0.03 ms
    a part, a sixth of a build). Its lines are at most 76 characters (RFC 2045) but for
    a space or tab encoded at a line's end (78; the package's own wrote 78 throughout:
    policy.SMTP's max_line_length)."""
    body = b"\n".join(text.encode("utf-8").splitlines()) + b"\n"
    cte = _cte(text)
    part["Content-Type"] = f'text/{subtype}; charset="utf-8"'
    part.set_payload(body.decode("ascii") if cte == "7bit"
                     else binascii.b2a_qp(body, istext=True).decode("ascii"))
    part["Content-Transfer-Encoding"] = cte


_TEXT: Final = ContentManager()
_TEXT.add_set_handler(str, _set_text)


def _text_part(text: str, subtype: str) -> MIMEPart:
    part = MIMEPart(policy=_POLICY)
    part.set_content(text, subtype, content_manager=_TEXT)
    return part


def _attachment_part(item: Attachment) -> MIMEPart:
    """The file, base64, named by the package (RFC 2231 where the name needs it) and by
    its ASCII stand-in, one parameter a line."""
    maintype, _, subtype = item.content_type.partition("/")
    maintype, subtype = maintype or "application", subtype or "octet-stream"
    part = MIMEPart(policy=_POLICY)
    part.set_content(item.content, maintype, subtype, filename=item.filename)
    fallback = f'"{quote(ascii_filename(item.filename))}"'
    written = _OUTPUT.fold("Content-Disposition", part["Content-Disposition"])
    if "filename*" in written:  # the package's RFC 2231 form, continued: the plain one too
        disposition = f"{written.partition(': ')[2].rstrip()};\n filename={fallback}"
    else:  # a name the package wrote as it is (and so fits a line): nothing to add
        disposition = f'attachment;\n filename="{quote(item.filename)}"'
    # The type as the package read it: type/subtype, whatever else the caller's string held.
    part.replace_header("Content-Type", _Written(
        "Content-Type", f"{part.get_content_type()};\n name={fallback}"))
    part.replace_header("Content-Disposition", _Written("Content-Disposition", disposition))
    return part


def _attach(msg: EmailMessage, part: MIMEPart) -> None:
    # MIMEPart is the documented class of a subpart (EmailMessage less the MIME-Version
    # set_content adds); typeshed's stub wants the parent's own class.
    msg.attach(part)  # type: ignore[arg-type]


def _set_boundary(msg: MIMEPart) -> None:
    """The multipart's boundary, in its Content-Type as one written line. The package's
    `make_alternative(boundary=...)` (and `set_boundary`) reparses the whole header to
    add the parameter, a sixth of a build; the generator reads the boundary back from
    the value (`get_boundary`) as it would from the package's own header."""
    # "=_" never occurs in quoted-printable or base64 text, so the boundary cannot either;
    # in a 7bit (ASCII) part only by guessing 96 random bits.
    msg.replace_header("Content-Type", _Written(
        "Content-Type", f'{msg.get_content_type()}; boundary="=_{secrets.token_hex(12)}"'))


def build_message(*, sender: str, sender_name: str | None, to: str, email: RenderedEmail,
                  attachments: Sequence[Attachment] = (),
                  reply_to: str | None = None) -> OutgoingMail:
    """multipart/alternative (text + HTML), in multipart/mixed when there are attachments.

    `Auto-Submitted` keeps out-of-office replies away from the no-reply sender. A CR or
    LF in a header value, or a control character in an attachment name, is refused
    before anything is built, so it never reaches the wire.
    """
    for name, value in (("To", to), ("Subject", email.subject), ("From", sender),
                        ("SMTP_FROM_NAME", sender_name or ""), ("Reply-To", reply_to or "")):
        if "\r" in value or "\n" in value:
            raise PermanentError(f"{name} contains CR or LF: refused")
    for item in attachments:
        if any(unicodedata.category(c) == "Cc" for c in item.filename):
            raise PermanentError(f"attachment name {item.filename!r} contains control characters")
        if any(unicodedata.category(c) == "Cc" for c in item.content_type):
            raise PermanentError(f"attachment type {item.content_type!r} contains control "
                                 "characters")
    if not all(address.isascii() for address in (sender, reply_to or "")):
        raise PermanentError("SMTP_FROM or SMTP_REPLY_TO contains non-ASCII characters: "
                             "use the ASCII (punycode) form")
    try:
        recipient = wire_address(to)
    except ValueError as exc:
        raise PermanentError(f"To is not a valid email address: {exc}") from None
    domain = sender.rpartition("@")[2] or "localhost"
    message_id = make_msgid(domain=domain)

    try:
        raw = _write(sender, sender_name, recipient, message_id, email, attachments, reply_to)
    except ValueError as exc:  # (UnicodeError too) the package cannot write what it was given
        raise PermanentError(f"the mail cannot be written: {exc}") from None
    return OutgoingMail(sender, recipient.address, message_id, raw,
                        smtputf8=recipient.smtputf8)


def _write(sender: str, sender_name: str | None, recipient: WireAddress, message_id: str,
           email: RenderedEmail, attachments: Sequence[Attachment],
           reply_to: str | None) -> bytes:
    """The message's bytes. What the package refuses here (a subject's lone surrogate, a
    content type that is not ASCII) raises ValueError: the same again on every try."""
    msg = EmailMessage(policy=_POLICY)
    msg["From"] = _sender(sender_name, sender)
    # The ASCII form where there is one (user@xn--e1afmkfd.xn--p1ai), else UTF-8 as it is.
    msg["To"] = (_Written("To", recipient.address) if recipient.smtputf8
                 else _line("To", recipient.address))
    if reply_to:
        msg["Reply-To"] = _line("Reply-To", reply_to)
    msg["Subject"] = (_line("Subject", email.subject) if _plain(email.subject)
                      else _encoded("Subject", email.subject))
    msg["Date"] = _date(int(time.time()))
    msg["Message-ID"] = _line("Message-ID", message_id)
    msg["Auto-Submitted"] = _AUTO_SUBMITTED
    msg["X-Auto-Response-Suppress"] = _NO_AUTO_REPLY
    msg["MIME-Version"] = _MIME_VERSION

    msg.make_alternative()
    _attach(msg, _text_part(email.text, "plain"))
    _attach(msg, _text_part(email.html, "html"))
    _set_boundary(msg)
    if attachments:
        msg.make_mixed()  # the alternative, boundary and all, becomes its first part
        _set_boundary(msg)
        for item in attachments:
            _attach(msg, _attachment_part(item))
    # The same bytes as as_bytes(), whose generator encodes each line as it writes it.
    if recipient.smtputf8:
        return msg.as_string(policy=_OUTPUT_UTF8).encode("utf-8")
    return msg.as_string(policy=_OUTPUT).encode("ascii")
