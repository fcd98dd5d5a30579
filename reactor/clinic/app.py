"""The clinic's composition root: every queue it drains, named once, with its
processor; its settings, migrations, event kinds and its own CLI commands; its HTTP
route (the payment webhook) comes with the payment processor (Processor.routes).

`reactor run` loads this by default (`--app reactor.clinic.app:build`).
"""

from __future__ import annotations

from reactor.clinic.commands import COMMANDS
from reactor.clinic.resources import MIGRATIONS_DIR
from reactor.clinic.settings import Settings, load_settings
from reactor.engine.app import App, Queue

__all__ = ["EVENT_KINDS", "QUEUES", "build"]

# Processors by path: imported by `reactor run` only (the CLI's other commands need
# the queue names, not fpdf2 and aiosmtplib).
QUEUES = (
    # A relay conversation may take SMTP_TIMEOUT_S per command: 120 s a mail at most.
    Queue("email_queue", "reactor.clinic.email:EmailProcessor",
          concurrency=20, timeout_s=120.0),
    # CPU-bound (rendering runs in a worker thread): two at once on a small VM.
    Queue("report_generation_queue", "reactor.clinic.reports:ReportProcessor",
          concurrency=2, timeout_s=120.0),
    Queue("payment_processing_queue", "reactor.clinic.payments:PaymentProcessor",
          concurrency=10, timeout_s=60.0),
    # Each job is one INSERT: the database pool is the real limit.
    Queue("analytics_queue", "reactor.clinic.analytics:AnalyticsProcessor",
          concurrency=8, timeout_s=30.0),
)
# Published by the clinic's processors: the provider's word differs from our row
# (payments); a delivery-unknown dead letter resolved by a 'sent' written later (mail).
EVENT_KINDS = ("payment.mismatch", "email.reconciled")


def build(settings: Settings | None = None) -> App:
    """The clinic app; its settings from the environment (when first used) unless given.

    A setting that is missing or wrong raises ConfigError (one line naming the fix) from
    `app.settings`, not here: `reactor --help` and `reactor dev` need none.
    """
    return App(name="clinic", settings=settings or load_settings, queues=QUEUES,
               migrations=MIGRATIONS_DIR, event_kinds=EVENT_KINDS, pg_cron=True,
               commands=COMMANDS)
