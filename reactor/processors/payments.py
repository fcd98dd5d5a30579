"""payment_processing_queue: confirm payments with the provider.

Only the provider's answer changes a payment: `succeeded` → completed,
`canceled` → failed (with the reason), `pending`/`waiting_for_capture` → ask
again later with growing intervals until PAYMENT_VERIFY_MAX_AGE, then
dead-letter "still pending". The status update fires the payment trigger
(migration 032), which sends the mails and marks the consultation paid; this
processor sends no mail. A final status never moves backwards.

It also serves `POST /webhooks/yookassa`: the notification's body is never
trusted, it only makes us ask the API (a `verify`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal
from uuid import UUID

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from reactor import queries
from reactor.config import Settings
from reactor.db import Database, DatabaseUnavailable
from reactor.errors import PermanentError, RetryLater
from reactor.processors.base import Job, MessageModel, Processor
from reactor.services.payments import PaymentProvider, ProviderPayment, open_provider

__all__ = ["PaymentMessage", "PaymentProcessor"]

log = structlog.get_logger("reactor.payments")

WEBHOOK_MAX_BYTES = 64 * 1024
WEBHOOK_EVENTS = {"payment.succeeded", "payment.waiting_for_capture", "payment.canceled"}
IGNORED_EVENTS = {"refund.succeeded"}  # refunds are ours: their API answer already counted
CHECK_MAX_S = 3600  # a pending payment is asked at least hourly (from RETRY_BASE_S up)


class PaymentMessage(MessageModel):
    payment_id: UUID
    action: Literal["verify", "capture", "refund"] = "verify"
    amount: Decimal | None = None


class PaymentProcessor(Processor[PaymentMessage]):
    queue = "payment_processing_queue"
    model = PaymentMessage
    concurrency = 10
    timeout_s = 60.0
    max_deliveries = 10_000  # "still pending" is asked again for up to a day

    def __init__(self, settings: Settings, db: Database) -> None:
        super().__init__(settings, db)
        self.provider: PaymentProvider = open_provider(settings)  # ConfigError if keys missing

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await self.provider.aclose()

    async def handle(self, job: Job[PaymentMessage]) -> None:
        msg = job.message
        row = await self.db.run(lambda c: c.execute(
            queries.LOAD_PAYMENT, {"payment_id": msg.payment_id}).fetchone())
        if row is None:
            raise PermanentError(f"payment {msg.payment_id} does not exist in public.payments")
        status, amount, currency, _provider, provider_id, created_at = row
        external_id = provider_id or (str(msg.payment_id)
                                      if self.settings.payment_provider == "manual" else None)
        if external_id is None:
            raise PermanentError(f"payment {msg.payment_id} has no provider_payment_id")
        key = f"{self.queue}:{job.msg_id}:{msg.action}"  # the same on every redelivery

        if msg.action == "refund":
            if status == "refunded":
                return
            if status != "completed":
                raise PermanentError(f"payment {msg.payment_id} is {status}: only a completed "
                                     "payment can be refunded")
            refund = await self.provider.refund(external_id, msg.amount or amount, currency, key)
            if refund.status == "succeeded":
                await self._set(msg.payment_id, "refunded", None)
                return
            if refund.status == "canceled":
                raise PermanentError(f"refund canceled: {refund.reason or 'no reason given'}")
            raise self._later(job, created_at, "refund still pending")

        if status != "pending":
            return  # already final: never moved backwards, nothing to ask
        if msg.action == "capture":
            answer = await self.provider.capture(external_id, msg.amount or amount, currency, key)
        else:
            answer = await self.provider.get(external_id)
        await self._apply(job, msg.payment_id, answer, created_at)

    async def _apply(self, job: Job[PaymentMessage], payment_id: UUID, answer: ProviderPayment,
                     created_at: datetime) -> None:
        if answer.status == "succeeded":
            await self._set(payment_id, "completed", None)
        elif answer.status == "canceled":
            await self._set(payment_id, "failed", answer.reason or "canceled by the provider")
        else:
            raise self._later(job, created_at, f"payment {answer.status}")

    def _later(self, job: Job[PaymentMessage], created_at: datetime, what: str) -> Exception:
        age = (datetime.now(UTC) - created_at).total_seconds()
        if age > self.settings.payment_verify_max_age_s:
            return PermanentError(f"still pending after {age / 3600:.1f} h "
                                  f"(PAYMENT_VERIFY_MAX_AGE={self.settings.payment_verify_max_age_s}s)")
        first = self.settings.retry_base_s
        delay = max(1, round(min(CHECK_MAX_S, first * 2 ** max(0, job.delivery.attempt - 1))))
        return RetryLater(f"{what}; asking again in {delay}s", delay)

    async def _set(self, payment_id: UUID, status: str, reason: str | None) -> None:
        await self.db.run(lambda c: c.execute(queries.SET_PAYMENT_STATUS, {
            "payment_id": payment_id, "status": status, "reason": reason}))

    # -- provider notifications -----------------------------------------------------------
    def routes(self) -> list[Any]:
        return [Route("/webhooks/yookassa", self._webhook, methods=["POST"])]

    async def _webhook(self, request: Request) -> Response:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > WEBHOOK_MAX_BYTES:
            return JSONResponse({"error": "body too large"}, status_code=413)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > WEBHOOK_MAX_BYTES:
                return JSONResponse({"error": "body too large"}, status_code=413)
        try:
            note = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return JSONResponse({"error": "body is not JSON"}, status_code=400)
        if not isinstance(note, dict) or note.get("type") != "notification":
            return JSONResponse({"error": "not a notification"}, status_code=400)
        event = note.get("event")
        if event in IGNORED_EVENTS:
            return JSONResponse({"status": "ignored"})
        if event not in WEBHOOK_EVENTS:
            return JSONResponse({"error": f"unknown event {event!r}"}, status_code=422)
        obj = note.get("object")
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or not obj["id"]:
            return JSONResponse({"error": "object.id is missing"}, status_code=422)
        provider_id = obj["id"][:100]

        def enqueue(conn: Any) -> bool:
            row = conn.execute(queries.PAYMENT_BY_PROVIDER_ID,
                               {"provider_payment_id": provider_id}).fetchone()
            if row is None:
                return False
            conn.execute(queries.QUEUE_PAYMENT_VERIFY, {"payment_id": row[0]})
            return True

        try:
            queued = await self.db.run(enqueue)
        except DatabaseUnavailable:
            return JSONResponse({"error": "try again"}, status_code=503)  # the provider retries
        if not queued:
            log.info("notification for an unknown payment ignored", notification=event)
            return JSONResponse({"status": "ignored"})
        return JSONResponse({"status": "queued"})
