"""The failures a handler raises, which the drainer tells apart (reactor.engine.drainer):
permanent, retryable, and "not yet" (RetryLater, and Deferred: the other side said not now)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["Deferred", "PermanentError", "RetryLater", "RetryableError"]


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
    The body goes back on the queue as a new message, with `stamp` merged into it
    (top-level keys): what the next delivery must know that only this one learnt
    (e.g. since when it has been waiting), since the new message has a new id and
    enqueue time.
    """

    def __init__(self, message: str, delay_s: int, *,
                 stamp: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, delay_s)
        self.stamp = dict(stamp) if stamp else None


class Deferred(RetryLater):
    """The other side said "not now" (a relay's 4xx: greylisting, a rate limit): not a
    failure, and not counted against MAX_ATTEMPTS.

    Handled like RetryLater (a new message after `delay_s`, with `stamp`), but published
    as `job.deferred` (and counted in reactor_jobs_deferred_total), not `job.retrying`,
    and the original is deleted rather than archived, so the archive (the jobs counted
    as done) holds the message once, when it finally succeeds. The processor keeps the
    time budget (in `stamp`) and raises PermanentError when it is spent.
    """
