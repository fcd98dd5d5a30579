"""The webhooks app's composition root: one queue, its sender, its settings and its
migrations. `reactor run --app webhooks.app:build`."""

from __future__ import annotations

from pathlib import Path

from reactor.engine import App, Queue
from webhooks.settings import WebhookSettings

__all__ = ["build"]

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def build(settings: WebhookSettings | None = None) -> App:
    return App(name="webhooks", settings=settings or WebhookSettings, migrations=MIGRATIONS,
               # A delivery waits on the subscriber's answer: many at once, each bounded
               # by WEBHOOK_TIMEOUT_S (and by WEBHOOK_PER_ENDPOINT per endpoint).
               queues=(Queue("webhook_queue", "webhooks.sender:WebhookSender",
                             concurrency=50, timeout_s=120.0),))
