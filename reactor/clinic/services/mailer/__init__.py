"""Sending mail: SMTP (aiosmtplib, pooled) or a file outbox.

aiosmtplib is asyncio; it runs on an asyncio loop in a thread of its own
(reactor.clinic.services.asyncio_thread), confined to this package: everything else
sees `Mailer.session` / `Mailer.send`. (Through trio-asyncio it cost ~1.2 ms
of CPU a mail; on its own loop ~0.6.)
Every SMTP failure is classified here into the failure policy's two kinds:
connection trouble and timeouts are retried; a 4xx verdict on a mail is a
deferral (`SmtpDeferred`, waited out on a time budget); a 5xx rejection of a
mail is permanent and carries the server's reply.

The modules, by responsibility:
- `address`: recipient addresses, checked (RFC 6531 / IDNA 2008) and in their wire
  form (`address_problem`, `wire_address`);
- `mime`: the message, written out (`build_message`, `OutgoingMail`, `Attachment`);
- `smtp`: one SMTP session on the asyncio thread (`SmtpConnection`), its errors and
  their classification (`classify`), the EHLO name and the start-up checks;
- `protocol`: what a mailer is to its callers (`Mailer`, `MailSession`);
- `pool`: the SMTP pool (`SmtpMailer`) and `open_mailer`;
- `outbox`: the file outbox (`FileMailer`).
This module re-exports what the rest of the app imports from
`reactor.clinic.services.mailer`.
"""

from __future__ import annotations

from reactor.clinic.services.mailer.address import WireAddress, address_problem, wire_address
from reactor.clinic.services.mailer.mime import (
    Attachment,
    OutgoingMail,
    ascii_filename,
    build_message,
    header_safe,
)
from reactor.clinic.services.mailer.outbox import FileMailer
from reactor.clinic.services.mailer.pool import SmtpMailer, open_mailer
from reactor.clinic.services.mailer.protocol import Mailer
from reactor.clinic.services.mailer.protocol import MailSession as MailSession
from reactor.clinic.services.mailer.smtp import (
    DeliveryUnknown,
    SmtpConnection,
    SmtpDeferred,
    check_mail_settings,
    classify,
    helo_name,
)

__all__ = ["Attachment", "DeliveryUnknown", "FileMailer", "Mailer", "OutgoingMail",
           "SmtpConnection", "SmtpDeferred", "SmtpMailer", "WireAddress", "address_problem",
           "ascii_filename", "build_message", "check_mail_settings", "classify", "header_safe",
           "helo_name", "open_mailer", "wire_address"]
