"""Queue → processor registry: what `reactor run` drains."""

from __future__ import annotations

from typing import Any

from reactor.processors.analytics import AnalyticsProcessor
from reactor.processors.base import Job, PermanentError, Processor, RetryableError
from reactor.processors.email import EmailProcessor
from reactor.processors.payments import PaymentProcessor
from reactor.processors.reports import ReportProcessor

__all__ = ["PROCESSORS", "Job", "PermanentError", "Processor", "RetryableError"]

PROCESSORS: dict[str, type[Processor[Any]]] = {
    AnalyticsProcessor.queue: AnalyticsProcessor,
    EmailProcessor.queue: EmailProcessor,
    ReportProcessor.queue: ReportProcessor,
    PaymentProcessor.queue: PaymentProcessor,
}
