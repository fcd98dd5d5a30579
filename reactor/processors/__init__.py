"""Queue → processor registry: what `reactor run` drains."""

from __future__ import annotations

from typing import Any

from reactor.processors.analytics import AnalyticsProcessor
from reactor.processors.base import Job, PermanentError, Processor, RetryableError
from reactor.processors.email import EmailProcessor

__all__ = ["PROCESSORS", "Job", "PermanentError", "Processor", "RetryableError"]

# Queues without a processor here are not drained: their messages wait.
PROCESSORS: dict[str, type[Processor[Any]]] = {
    AnalyticsProcessor.queue: AnalyticsProcessor,
    EmailProcessor.queue: EmailProcessor,
}
