"""payment_processing_queue: payments change on the provider's word only.

PAYMENT_PROVIDER=manual (the default): staff decide. The reactor calls no
provider and never changes a payment's status; a `verify` leaves the row as
it is, a capture or refund is dead-lettered ("do it by hand"), and no
provider webhook is served (404).

PAYMENT_PROVIDER=yookassa: a payment is `completed` only when YooKassa's
payment object agrees with our row: same id, same amount and currency, and
(when the provider has it) `metadata.payment_id` equal to our row id.
`canceled` → failed (with the reason); `pending`/`waiting_for_capture` → ask
again later, at intervals that grow with the operation's age, until
PAYMENT_VERIFY_MAX_AGE, then dead-letter "still pending". A disagreement
changes nothing: it is dead-lettered with the reason and published as a
`payment.mismatch` event. A row of another provider is never checked with
this one, and neither is a row whose provider payment another row also
names (one provider payment pays for one row; migration 037 also makes that
unique per provider). The status is written only while the row still has the
amount, currency and provider id that were checked; else it is checked
again. The status update fires the payment trigger (migration 032),
which sends the mails and marks the consultation paid; this processor sends
no mail. A final status never moves backwards.

Amounts: a capture is for the row's amount (no partial capture); a refund is
for `amount` (default: all that is left), more than 0 and at most what is
left. A refund the provider confirms adds to `payments.refunded_amount`; the
payment becomes `refunded` once all of it is. Bad amounts are dead-lettered
before the provider is asked.

Every verify, capture and refund is an operation recorded in
`reactor.payment_operations` (migration 037): its Idempotence-Key
("<payment id>:<action>:<seq>") and its deadline belong to the operation,
so a redelivery, a requeue or a `reactor dlq replay` repeats the same key,
and a pending refund is then polled by its own id. YooKassa forgets a key
after 24 h: an older capture or refund with no answer on record is looked
up at the provider before it is requested again. A message redelivered after
its operation was recorded finds it done (`payment_operations.msg_id`).

It also serves `POST /webhooks/yookassa` (YooKassa only): accepted only from
YOOKASSA_WEBHOOK_NETWORKS (X-Forwarded-For only from WEBHOOK_TRUSTED_PROXIES),
the body is never trusted, and it queues a `verify` unless one is queued.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import TYPE_CHECKING, Any, Literal
from uuid import UUID

import structlog
import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from reactor.clinic import queries
from reactor.clinic.services.payments import (
    PaymentProvider,
    ProviderObject,
    check_yookassa_id,
    open_provider,
    shown,
)
from reactor.clinic.settings import PaymentSettings, Settings, parse_networks
from reactor.engine.db import DatabaseUnavailable
from reactor.engine.errors import PermanentError, RetryLater
from reactor.engine.processor import Context, Job, MessageModel, Processor
from reactor.engine.web import BodyRefused, read_body

if TYPE_CHECKING:
    import psycopg

__all__ = ["PaymentMessage", "PaymentProcessor"]

log = structlog.get_logger("reactor.payments")

WEBHOOK_MAX_BYTES = 64 * 1024
WEBHOOK_EVENTS = {"payment.succeeded", "payment.waiting_for_capture", "payment.canceled"}
IGNORED_EVENTS = {"refund.succeeded"}  # refunds are ours: their API answer already counted
REFUSED_REMEMBERED = 1000  # distinct refused senders warned about, then debug only
WEBHOOK_DB_BUDGET_S = 5.0  # answer the provider fast; it retries a 503 for a day
CHECK_MAX_S = 3600  # a pending operation is asked at least hourly
CHECK_AGE_FACTOR = 0.25  # ...and otherwise after a quarter of its age: ~60 calls a day at most
# YooKassa honours an Idempotence-Key for 24 h; past 23 h, an unanswered capture or
# refund is looked up at the provider before it is asked for again.
IDEMPOTENCE_WINDOW_S = 23 * 3600
CENT = Decimal("0.01")

Action = Literal["verify", "capture", "refund"]
IPAddress = IPv4Address | IPv6Address


class PaymentMessage(MessageModel):
    payment_id: UUID
    action: Action = "verify"
    amount: Decimal | None = None


@dataclass(frozen=True)
class Operation:
    """One intent on one payment, as recorded in reactor.payment_operations."""

    payment_id: UUID
    action: Action
    seq: int
    amount: Decimal | None
    object_id: str | None  # the refund's id at the provider, once known
    age_s: float  # since it was first requested (database clock)
    msg_id: int  # the message carrying it now; recorded when it finishes

    @property
    def idempotence_key(self) -> str:
        """The same for every delivery of the intent; never depends on a msg_id."""
        return f"{self.payment_id}:{self.action}:{self.seq}"


@dataclass(frozen=True)
class Row:
    """public.payments as loaded (queries.LOAD_PAYMENT) when a message is handled."""

    payment_id: UUID
    status: str
    amount: Decimal
    currency: str
    provider: str
    provider_id: str  # "" when the row has none
    created_at: datetime
    refunded_amount: Decimal
    sharing: list[str]  # other rows naming the same provider payment (should be none)


def _requested_amount(msg: PaymentMessage, row: Row) -> Decimal:
    """The amount the message's action moves, checked against the row.

    A refund moves `amount` (default: all that is left to refund), more than 0 and
    at most what is left; a capture moves the row's amount (no partial capture).

    Raises:
        PermanentError: naming what is wrong with the amount, before any provider call.
    """
    asked = msg.amount
    pid, currency = msg.payment_id, row.currency
    if asked is not None:
        if not asked.is_finite() or asked <= 0:
            raise PermanentError(f"{msg.action} of payment {pid}: amount {asked} is not more "
                                 "than 0; give a positive amount, or none for the whole")
        if asked != asked.quantize(CENT):
            raise PermanentError(f"{msg.action} of payment {pid}: amount {asked} has more "
                                 "than 2 decimal places")
    if msg.action == "refund":
        left = row.amount - row.refunded_amount
        wanted = left if asked is None else asked
        if row.status == "completed" and wanted <= 0:
            raise PermanentError(f"payment {pid} has nothing left to refund "
                                 f"({row.refunded_amount:.2f} {currency} refunded already)")
        if row.status == "completed" and wanted > left:
            raise PermanentError(
                f"refund of {wanted:.2f} {currency} of payment {pid} is more than the "
                f"{left:.2f} {currency} left to refund ({row.amount:.2f} paid, "
                f"{row.refunded_amount:.2f} refunded); nothing was asked of the provider")
        return wanted
    if msg.action == "capture" and asked is not None and asked != row.amount:
        raise PermanentError(
            f"capture of {asked:.2f} {currency} asked, but payment {pid} is for "
            f"{row.amount:.2f} {currency}: partial capture is not supported; omit amount to "
            "capture the payment's amount")
    return row.amount


class PaymentProcessor(Processor[PaymentMessage]):
    settings: Settings
    payment: PaymentSettings  # what it reads of the settings: its own part
    model = PaymentMessage
    concurrency = 10
    timeout_s = 60.0

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.payment = settings = self.settings
        self.provider: PaymentProvider | None = open_provider(settings)  # ConfigError: keys
        self.sources = parse_networks(settings.yookassa_webhook_networks)
        self.proxies = parse_networks(settings.webhook_trusted_proxies)
        self._refused_seen: set[str] = set()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if self.provider is not None:
                await self.provider.aclose()

    async def handle(self, job: Job[PaymentMessage]) -> None:
        msg = job.message
        pid = msg.payment_id
        loaded = await self.db.run(lambda c: c.execute(
            queries.LOAD_PAYMENT, {"payment_id": pid}).fetchone())
        if loaded is None:
            raise PermanentError(f"payment {pid} does not exist in public.payments")
        status, amount, currency, row_provider, provider_id, created, refunded, sharing = loaded
        row = Row(pid, status, amount, currency, row_provider, provider_id or "", created,
                  refunded, list(sharing))
        provider = self.provider
        if provider is None:
            self._manual(msg, row.provider)
            return
        if row.provider != provider.name:
            raise PermanentError(
                f"payment {pid} has provider {row.provider!r} but PAYMENT_PROVIDER="
                f"{provider.name}: it is never checked with another provider; set its "
                "status by hand, or correct payments.provider and replay it")
        if not row.provider_id:
            raise PermanentError(f"payment {pid} has no provider_payment_id")
        check_yookassa_id(row.provider_id)
        if row.sharing:
            others = ", ".join(row.sharing)
            reason = (f"provider payment {row.provider_id} is also named by payment(s) "
                      f"{others}: one provider payment pays for one row")
            self.bus.publish("payment.mismatch", self.queue, job.msg_id, job.delivery.attempt,
                             error=reason, payment_id=str(pid), action=msg.action,
                             provider_payment_id=row.provider_id)
            raise PermanentError(f"payment {pid}: {reason}; nothing was changed: correct "
                                 "provider_payment_id on the wrong row(s), then replay this")
        requested = _requested_amount(msg, row)  # PermanentError before any provider call
        if await self._already_done(job):
            return

        if msg.action == "refund":
            if row.status == "refunded":
                await self._supersede(pid, "refund")
                return
            if row.status != "completed":
                raise PermanentError(f"payment {pid} is {row.status}: only a completed "
                                     "payment can be refunded")
            op = await self._claim(job, "refund", requested)
            if op.amount != requested:
                raise PermanentError(
                    f"a refund of {op.amount:.2f} {row.currency} of payment {pid} is still "
                    f"open (Idempotence-Key {op.idempotence_key}); this message asks for "
                    f"{requested:.2f}: replay it once that refund is finished")
            await self._refund(job, provider, op, row)
            return

        if row.status != "pending":
            await self._supersede(pid, msg.action)
            return  # already final: never moved backwards, nothing to ask
        if msg.action == "capture":
            op = await self._claim(job, "capture", row.amount)
            if op.amount != row.amount:
                raise PermanentError(
                    f"payment {pid} is now {row.amount:.2f} {row.currency}, but its open "
                    f"capture (Idempotence-Key {op.idempotence_key}) was asked for "
                    f"{op.amount:.2f}: nothing was changed; check the payment at the provider")
            answer = await self._capture(provider, op, row)
        else:
            op = await self._claim(job, "verify", row.amount)
            answer = await provider.get(row.provider_id)
            await self._record_check(op, None)
        await self._agree(job, op, answer, row.provider_id, row.amount, row.currency)
        if answer.status == "succeeded":
            await self._finish(op, row, "succeeded", "completed")
        elif answer.status == "canceled":
            await self._finish(op, row, "canceled", "failed",
                               answer.reason or "canceled by the provider")
        else:
            raise await self._later(op, f"payment {answer.status}")

    async def _already_done(self, job: Job[PaymentMessage]) -> bool:
        """True when this very message finished its operation before (the reactor
        stopped before archiving it): its redelivery must not start another one."""
        msg = job.message
        done = await self.db.run(lambda c: c.execute(queries.FINISHED_BY_MESSAGE, {
            "payment_id": msg.payment_id, "action": msg.action,
            "msg_id": job.msg_id}).fetchone())
        if done is None:
            return False
        seq, outcome = done
        if outcome in ("succeeded", "superseded"):
            log.info("payment operation already finished by this message", msg_id=job.msg_id,
                     payment_id=str(msg.payment_id), action=msg.action, seq=seq)
            return True
        raise PermanentError(f"the {msg.action} of payment {msg.payment_id} this message "
                             f"asked for already ended ({outcome}); nothing was done again")

    async def _capture(self, provider: PaymentProvider, op: Operation,
                       row: Row) -> ProviderObject:
        """Capture once: after the first answer (or once the provider may have forgotten
        the Idempotence-Key) ask how the payment stands before capturing."""
        assert op.amount is not None
        answer: ProviderObject | None = None
        if op.object_id is not None or op.age_s > IDEMPOTENCE_WINDOW_S:
            answer = await provider.get(row.provider_id)
        if answer is None or (op.object_id is None and answer.status == "waiting_for_capture"):
            answer = await provider.capture(row.provider_id, op.amount, row.currency,
                                            op.idempotence_key)
        await self._record_check(op, row.provider_id)  # "asked before": never capture twice
        return answer

    def _manual(self, msg: PaymentMessage, row_provider: str) -> None:
        """No provider configured: the status the database holds is the decision."""
        if row_provider != "manual":
            raise PermanentError(
                f"payment {msg.payment_id} has provider {row_provider!r} but PAYMENT_PROVIDER="
                f"manual: the reactor never decides it; set PAYMENT_PROVIDER={row_provider} "
                "(with its keys) and replay it, or set its status by hand")
        if msg.action != "verify":
            raise PermanentError(
                f"PAYMENT_PROVIDER=manual cannot {msg.action} payment {msg.payment_id}: do it "
                "with the provider by hand, then set payments.status")
        log.debug("manual payments: the status is set by staff", payment_id=str(msg.payment_id))

    async def _refund(self, job: Job[PaymentMessage], provider: PaymentProvider,
                      op: Operation, row: Row) -> None:
        assert op.amount is not None
        refund: ProviderObject | None = None
        if op.object_id is not None:  # requested before (maybe by a dead letter): poll it
            refund = await provider.get_refund(op.object_id)
        elif op.age_s > IDEMPOTENCE_WINDOW_S:
            # The provider forgets an Idempotence-Key after 24 h: posting again now could
            # refund twice if the first request got through unrecorded. Look for it first.
            refund = await provider.find_refund(row.provider_id, op.idempotence_key)
            if refund is None:
                log.info("refund not found at the provider: asking for it again",
                         payment_id=str(op.payment_id), idempotence_key=op.idempotence_key)
        if refund is None:
            refund = await provider.refund(row.provider_id, op.amount, row.currency,
                                           op.idempotence_key)
        try:
            refund_id: str | None = check_yookassa_id(refund.id, "refund id")
        except PermanentError:
            refund_id = None  # asked again with the same key, the provider names it again
        await self._record_check(op, refund_id)
        await self._agree(job, op, refund, row.provider_id, op.amount, row.currency)
        if refund.status == "succeeded":
            await self._finish(op, row, "succeeded", "refunded")
        elif refund.status == "canceled":
            await self._close(op, "canceled")
            raise PermanentError(f"refund canceled: {refund.reason or 'no reason given'}")
        else:
            raise await self._later(op, "refund pending")

    async def _agree(self, job: Job[PaymentMessage], op: Operation, answer: ProviderObject,
                     provider_id: str, amount: Decimal, currency: str) -> None:
        """Dead-letter (and announce) a provider object that is not the one we mean."""
        problems = []
        if op.action == "refund":
            if answer.payment_ref != provider_id:
                problems.append(f"refund of payment {shown(answer.payment_ref)} at the provider, "
                                f"of {provider_id} here")
        elif answer.id != provider_id:
            problems.append(f"id {shown(answer.id)} at the provider, {provider_id} here")
        if answer.amount != amount or answer.currency != currency:
            there = (f"{answer.amount:.2f} {shown(answer.currency)}" if answer.amount is not None
                     else "no amount")
            problems.append(f"amount {there} at the provider, {amount:.2f} {currency} here")
        if (op.action != "refund" and answer.payment_ref is not None
                and answer.payment_ref != str(op.payment_id)):
            problems.append(f"metadata.payment_id {shown(answer.payment_ref)} at the provider, "
                            f"{op.payment_id} here")
        if not problems:
            return
        reason = "; ".join(problems)
        if op.action == "verify":
            # Nothing moved: a later verify starts afresh. A capture or refund stays open,
            # so a replay repeats its Idempotence-Key instead of moving money twice.
            await self._close(op, "mismatch")
        self.bus.publish("payment.mismatch", self.queue, job.msg_id, job.delivery.attempt,
                         error=reason, payment_id=str(op.payment_id), action=op.action,
                         provider_payment_id=provider_id)
        raise PermanentError(f"payment {op.payment_id} does not match the provider's "
                             f"{op.action}: {reason}; nothing was changed")

    async def _later(self, op: Operation, what: str) -> Exception:
        """Ask again after a quarter of the operation's age; give up after the max age."""
        age = op.age_s
        limit = self.payment.payment_verify_max_age_s
        if age > limit:
            if op.action == "verify":
                await self._close(op, "expired")
                hint = ""
            else:
                hint = (f"; the {op.action} keeps its Idempotence-Key: `reactor dlq replay "
                        f"{self.queue}` asks the provider again")
            return PermanentError(f"{what}: still pending after {age / 3600:.1f} h "
                                  f"(PAYMENT_VERIFY_MAX_AGE={limit}s){hint}")
        delay = max(1, round(min(CHECK_MAX_S, max(self.settings.retry_base_s,
                                                  age * CHECK_AGE_FACTOR))))
        return RetryLater(f"{what}; asking again in {delay}s", delay)

    # -- the operations ledger ------------------------------------------------------------
    async def _claim(self, job: Job[PaymentMessage], action: Action,
                     amount: Decimal) -> Operation:
        """The open operation of this payment and action (or a new one), as carried
        by this message."""
        pid = job.message.payment_id
        row = await self.db.run(lambda c: c.execute(queries.CLAIM_PAYMENT_OPERATION, {
            "payment_id": pid, "action": action, "amount": amount}).fetchone())
        assert row is not None  # INSERT ... ON CONFLICT DO UPDATE always returns the row
        seq, op_amount, object_id, age_s = row
        return Operation(pid, action, seq, op_amount, object_id, float(age_s), job.msg_id)

    async def _record_check(self, op: Operation, object_id: str | None) -> None:
        await self.db.run(lambda c: c.execute(queries.RECORD_PAYMENT_CHECK, {
            "payment_id": op.payment_id, "action": op.action, "seq": op.seq,
            "object_id": object_id}))

    async def _close(self, op: Operation, outcome: str) -> None:
        """Finish an operation that changed nothing on the payment."""
        await self.db.run(lambda c: c.execute(queries.FINISH_PAYMENT_OPERATION, {
            "payment_id": op.payment_id, "action": op.action, "seq": op.seq,
            "outcome": outcome, "msg_id": op.msg_id}))

    async def _finish(self, op: Operation, row: Row, outcome: str, status: str,
                      reason: str | None = None) -> None:
        """Close the operation and record its effect on the payment, in one transaction,
        provided the row is still the one the provider was asked about.

        Raises:
            RetryLater: the row changed meanwhile (amount, currency, provider id, or
                another row now names its provider payment): nothing was recorded,
                and the next attempt checks the changed row from the start.
        """
        facts = {"payment_id": op.payment_id, "amount": row.amount, "currency": row.currency,
                 "provider": row.provider, "provider_payment_id": row.provider_id}

        def run(conn: psycopg.Connection) -> bool:
            with conn.transaction():
                if status == "refunded":
                    recorded = conn.execute(queries.RECORD_REFUND, {
                        **facts, "refund": op.amount}).fetchone()
                else:
                    recorded = conn.execute(queries.SET_PAYMENT_STATUS, {
                        **facts, "status": status, "reason": reason}).fetchone()
                if recorded is None:
                    return False
                conn.execute(queries.FINISH_PAYMENT_OPERATION, {
                    "payment_id": op.payment_id, "action": op.action, "seq": op.seq,
                    "outcome": outcome, "msg_id": op.msg_id})
                return True
        if await self.db.run(run):
            return
        now = await self.db.run(lambda c: c.execute(
            queries.LOAD_PAYMENT, {"payment_id": op.payment_id}).fetchone())
        if now is None:
            raise PermanentError(f"payment {op.payment_id} was deleted while it was checked")
        expected = "completed" if status == "refunded" else "pending"
        if now[0] != expected:  # decided meanwhile by someone else: never moved backwards
            await self._supersede(op.payment_id, op.action)
            return
        raise RetryLater(f"payment {op.payment_id} changed while it was checked; checking "
                         "it again", max(1, round(self.settings.retry_base_s)))

    async def _supersede(self, pid: UUID, action: Action) -> None:
        await self.db.run(lambda c: c.execute(queries.SUPERSEDE_PAYMENT_OPERATIONS, {
            "payment_id": pid, "action": action}))

    # -- provider notifications -----------------------------------------------------------
    def routes(self) -> list[Any]:
        """Served only when YooKassa is the provider (else a forged one meets a 404)."""
        if self.provider is None or self.provider.name != "yookassa":
            return []
        return [Route("/webhooks/yookassa", self._webhook, methods=["POST"])]

    def source_of(self, request: Request) -> IPAddress | None:
        """The address a request came from: the peer, or the X-Forwarded-For hop named
        by the last trusted proxy (WEBHOOK_TRUSTED_PROXIES). None when unknowable."""
        peer = _address(request.client.host if request.client else None)
        if peer is None or not _within(peer, self.proxies):
            return peer
        hops = [hop.strip() for value in request.headers.getlist("x-forwarded-for")
                for hop in value.split(",")]
        source = peer
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:
                return None  # a hop we cannot read: trust nothing beyond it
            source = address
            if not _within(address, self.proxies):
                break
        return source

    def _refused(self, request: Request, source: IPAddress | None) -> None:
        """A warning the first time a sender is refused (a proxy left out of
        WEBHOOK_TRUSTED_PROXIES shows up at once); then quiet, so a flood of
        forged requests cannot flood the log."""
        peer = request.client.host if request.client else "?"
        key = f"{peer}>{source}"
        if key in self._refused_seen or len(self._refused_seen) >= REFUSED_REMEMBERED:
            log.debug("notification refused", peer=peer, source=str(source))
            return
        self._refused_seen.add(key)
        log.warning("notification refused: not from YOOKASSA_WEBHOOK_NETWORKS; if the peer is "
                    "your reverse proxy, add it to WEBHOOK_TRUSTED_PROXIES",
                    peer=peer, source=str(source))

    async def _webhook(self, request: Request) -> Response:
        source = self.source_of(request)
        if source is None or not _within(source, self.sources):
            self._refused(request, source)
            return JSONResponse({"error": "notifications are accepted only from "
                                 "YOOKASSA_WEBHOOK_NETWORKS (behind a reverse proxy: list "
                                 "it in WEBHOOK_TRUSTED_PROXIES)"}, status_code=403)
        try:
            body = await read_body(request, WEBHOOK_MAX_BYTES)
        except BodyRefused as refused:
            return refused.response()
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
            return JSONResponse({"error": f"unknown event {str(event)[:60]!r}"},
                                status_code=422)
        obj = note.get("object")
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or not obj["id"]:
            return JSONResponse({"error": "object.id is missing"}, status_code=422)
        try:
            provider_id = check_yookassa_id(obj["id"], "object.id")
        except PermanentError as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)

        def enqueue(conn: psycopg.Connection) -> str:
            with conn.transaction():
                row = conn.execute(queries.PAYMENT_BY_PROVIDER, {
                    "provider": "yookassa", "provider_payment_id": provider_id}).fetchone()
                if row is None:
                    return "ignored"
                queued = conn.execute(queries.QUEUE_PAYMENT_VERIFY_ONCE,
                                      {"payment_id": row[0]}).fetchone()
                return "queued" if queued is not None and queued[0] is not None \
                    else "already queued"

        outcome: str | None = None
        with trio.move_on_after(WEBHOOK_DB_BUDGET_S), suppress(DatabaseUnavailable):
            outcome = await self.db.run(enqueue)
        if outcome is None:
            return JSONResponse({"error": "try again"}, status_code=503)  # the provider retries
        if outcome == "ignored":
            log.info("notification for an unknown payment ignored", notification=event)
        return JSONResponse({"status": outcome})


def _address(text: str | None) -> IPAddress | None:
    if not text:
        return None
    try:
        address = ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _within(address: IPAddress, networks: tuple[Any, ...]) -> bool:
    return any(address.version == net.version and address in net for net in networks)
