"""Writing a mail: text and HTML, attachments, and headers every reader and filter accepts.

`build_message` writes the MIME message by hand (why: its docstring): 7bit or
quoted-printable text, header lines of at most 78 characters, RFC 2047 encoded
words, attachment names with an ASCII fallback (`ascii_filename`). What it
returns, `OutgoingMail`, is what every mailer sends.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, formataddr, make_msgid
from typing import Final

from reactor.clinic.services.templates import RenderedEmail
from reactor.engine.errors import PermanentError

__all__ = ["MAX_ENCODED_WORD", "MAX_LINE", "Attachment", "OutgoingMail", "ascii_filename",
           "build_message"]

# RFC 5322 §2.1.1: header lines SHOULD stay within 78 characters; RFC 2047 §2: an
# encoded word is at most 75. Spam filters score mails that ignore either.
MAX_LINE: Final = 78
MAX_ENCODED_WORD: Final = 75


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
