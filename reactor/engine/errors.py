"""The two kinds of failure the failure policy tells apart (see processors.base)."""

from __future__ import annotations

__all__ = ["PermanentError", "RetryLater", "RetryableError"]


class PermanentError(Exception):
    """Retrying cannot help (bad shape, unknown template, missing row): dead-letter now."""


class RetryableError(Exception):
    """A transient failure; `delay_s` overrides the backoff when the cause knows better.

    `outage=True` says a dependency is down (SMTP server, provider, database):
    such failures get the larger OUTAGE_MAX_ATTEMPTS budget.
    """

    def __init__(self, message: str, delay_s: int | None = None, *,
                 outage: bool = False) -> None:
        super().__init__(message)
        self.delay_s = delay_s
        self.outage = outage


class RetryLater(RetryableError):
    """Not a failure: the outcome is not known yet (a payment still pending).

    Never counts against MAX_ATTEMPTS; the processor decides when to give up.
    """

    def __init__(self, message: str, delay_s: int) -> None:
        super().__init__(message, delay_s)
