"""The webhooks app's settings: the engine's, and the sender's own."""

from __future__ import annotations

from pydantic import Field

from reactor.engine import EngineSettings

__all__ = ["WebhookSettings"]


class WebhookSettings(EngineSettings):
    # Seconds a subscriber has to answer one delivery (connect, send, answer).
    webhook_timeout_s: float = Field(10.0, alias="WEBHOOK_TIMEOUT_S", gt=0, le=60)
    # Deliveries in flight to one endpoint (scheme, host, port) from one process: a slow
    # subscriber takes this many, never the whole queue's concurrency.
    webhook_per_endpoint: int = Field(4, alias="WEBHOOK_PER_ENDPOINT", ge=1, le=100)
    # Allow subscribers on loopback, private, link-local or otherwise reserved addresses
    # (SSRF: off by default; on for a subscriber inside your own network, and for tests).
    webhook_allow_private: bool = Field(False, alias="WEBHOOK_ALLOW_PRIVATE")
    # The longest Retry-After honoured; a longer one is cut to this (seconds).
    webhook_retry_after_max_s: int = Field(3600, alias="WEBHOOK_RETRY_AFTER_MAX_S", ge=1)
