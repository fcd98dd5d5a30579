"""EMAIL_PROVIDER=file: each mail written as an .eml file to EMAIL_OUTBOX_DIR.

For development and the demo stack: the same messages as SMTP would carry,
readable with any mail client, and no server needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import trio

from reactor.clinic.services.mailer.mime import OutgoingMail
from reactor.clinic.services.mailer.protocol import MailSession
from reactor.engine.errors import RetryableError

__all__ = ["FileMailer"]


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
