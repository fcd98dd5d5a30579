"""What the email processor sees of a mailer, whatever carries the mail.

`Mailer.session()` waits for the means (a pooled SMTP connection: `SmtpMailer`;
nothing for the file outbox: `FileMailer`), then `MailSession.send` delivers one
mail. Both mailers implement these protocols.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

from reactor.clinic.services.mailer.mime import OutgoingMail

__all__ = ["MailSession", "Mailer"]


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
