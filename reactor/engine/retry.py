"""Retry policy: exponential backoff with jitter, capped."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["RetryPolicy"]


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a failed message again, and when to give up.

    Args:
        base_s: the delay after the first failure.
        max_s: no delay is longer than this.
        max_attempts: deliveries after which a failing message is dead-lettered.
        outage_attempts: the same for failures of a dependency (SMTP server or
            database unreachable): an outage of minutes must not dead-letter
            every message it touched, so these get a larger budget.
        jitter: +/- this fraction, so that a burst of failures does not come
            back as a burst.
    """

    base_s: float = 2.0
    max_s: float = 900.0
    max_attempts: int = 5
    outage_attempts: int = 20
    jitter: float = 0.2

    def delay_s(self, attempt: int, rng: random.Random | None = None) -> int:
        """Seconds to wait after failed delivery number `attempt` (1-based).

        Whole seconds, because pgmq.set_vt takes an integer; never below 1.
        """
        raw = min(self.max_s, self.base_s * 2.0 ** max(0, attempt - 1))
        spread: float = (rng or random).uniform(-self.jitter, self.jitter)
        return max(1, round(min(self.max_s, raw * (1 + spread))))

    def exhausted(self, attempt: int, *, outage: bool = False) -> bool:
        """True when delivery number `attempt` was the last one allowed."""
        return attempt >= (max(self.outage_attempts, self.max_attempts) if outage
                           else self.max_attempts)

    @property
    def most_deliveries(self) -> int:
        """No message is delivered more often than this, whatever happens to its workers."""
        return max(self.max_attempts, self.outage_attempts)
