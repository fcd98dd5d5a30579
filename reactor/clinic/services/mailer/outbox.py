"""EMAIL_PROVIDER=file: each mail written as an .eml file to EMAIL_OUTBOX_DIR.

For development and the demo stack: the same messages as SMTP would carry,
readable with any mail client, and no server needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

from reactor.clinic.services.mailer.mime import OutgoingMail
from reactor.clinic.services.mailer.protocol import MailSession
from reactor.engine.errors import RetryableError
from reactor.engine.files import WriteFailed, swept, write_whole

__all__ = ["FileMailer", "open_file_mailer"]


class FileMailer:
    """Writes each mail as an .eml file, whole and durably (engine.files): the ledger
    says 'sent' only once the file would survive a power loss."""

    def __init__(self, outbox: Path) -> None:
        self.outbox = outbox

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[MailSession]:
        yield self

    async def send(self, mail: OutgoingMail) -> str:
        message_id = mail.message_id
        name = message_id.strip("<>").replace("/", "_").replace("@", "_at_")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        try:
            await write_whole(self.outbox / f"{stamp}-{name}.eml", mail.raw)
        except WriteFailed as exc:
            # A full or read-only disk is not the mail's fault: an outage, like SMTP down.
            raise RetryableError(f"cannot write to EMAIL_OUTBOX_DIR ({exc.directory}): "
                                 f"{exc.reason}", outage=True) from None
        return message_id

    async def aclose(self) -> None:
        return None


@contextlib.asynccontextmanager
async def open_file_mailer(outbox: Path) -> AsyncIterator[FileMailer]:
    """The file mailer, with EMAIL_OUTBOX_DIR swept of what a crash mid-write left (at
    start, then every hour)."""
    async with swept(outbox):
        yield FileMailer(outbox)
