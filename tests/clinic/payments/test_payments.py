"""Payments against a local HTTP server that speaks the YooKassa v3 shapes."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from reactor.clinic.resources import MIGRATIONS_DIR
from reactor.clinic.schema import migrate
from reactor.clinic.services.payments import YooKassaProvider
from reactor.clinic.settings import YOOKASSA_NETWORKS, ConfigError, Settings, load_settings
from reactor.engine import dead_letters
from reactor.engine.errors import PermanentError
from reactor.engine.web import serve_http
from reactor.testing import patience
from tests import factories as f
from tests.harness import (
    eventually,
    migrate_like_the_last_release,
    post_raw,
    running_reactor,
    sql,
    wait_for,
)

SHOP, SECRET = "123456", "test_secret_key"
HOOK = "/webhooks/yookassa"
LOOPBACK = {"YOOKASSA_WEBHOOK_NETWORKS": "127.0.0.1/32"}  # the tests' "provider network"
QUEUE = "payment_processing_queue"


def yid(n: int) -> str:
    """A provider id in YooKassa's format."""
    return f"2d8d0ecb-000f-5000-9000-{n:012x}"


@dataclass
class FakeYooKassa:
    """Scripted answers per 'METHOD provider-id'; the last one repeats. Records every call.

    `before` runs a coroutine before answering a key (e.g. to change our row while the
    reactor waits for the provider)."""

    script: dict[str, list[tuple[int, dict[str, Any] | bytes]]] = field(default_factory=dict)
    calls: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0
    before: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)

    async def answer_after_hook(self, key: str) -> Response:
        hook = self.before.get(key)
        if hook is not None:
            await hook()
        return self.answer(key)

    def answer(self, key: str) -> Response:
        steps = self.script.get(key)
        if not steps:
            return JSONResponse({"type": "error", "code": "not_found"}, status_code=404)
        code, body = steps.pop(0) if len(steps) > 1 else steps[0]
        if isinstance(body, bytes):  # JSON as written, e.g. with escapes JSONResponse refuses
            return Response(body, status_code=code, media_type="application/json")
        return JSONResponse(body, status_code=code)

    def app(self) -> Starlette:
        async def record(request: Request, key: str) -> Response:
            body = await request.body()
            self.calls.append({"key": key, "auth": request.headers.get("authorization"),
                               "idempotence_key": request.headers.get("idempotence-key"),
                               "path": request.url.path, "query": request.url.query,
                               "json": (await request.json()) if body else None})
            return await self.answer_after_hook(key)

        async def get_payment(request: Request) -> Response:
            return await record(request, f"GET {request.path_params['pid']}")

        async def capture(request: Request) -> Response:
            return await record(request, f"CAPTURE {request.path_params['pid']}")

        async def refunds(request: Request) -> Response:
            if request.method == "GET":  # the list, filtered by payment_id as YooKassa does
                return await record(
                    request, f"LIST_REFUNDS {request.query_params.get('payment_id')}")
            payload = await request.json()
            return await record(request, f"REFUND {payload.get('payment_id')}")

        async def get_refund(request: Request) -> Response:
            return await record(request, f"GET_REFUND {request.path_params['rid']}")

        async def anything_else(request: Request) -> Response:
            return await record(request, f"OTHER {request.url.path}")

        return Starlette(routes=[
            Route("/v3/payments/{pid}", get_payment),
            Route("/v3/payments/{pid}/capture", capture, methods=["POST"]),
            Route("/v3/refunds", refunds, methods=["GET", "POST"]),
            Route("/v3/refunds/{rid}", get_refund),
            Route("/{rest:path}", anything_else, methods=["GET", "POST"]),
        ])

    def keys(self) -> list[str]:
        return [c["key"] for c in self.calls]


def on_payments(type_: str) -> Callable[[dict[str, Any]], bool]:
    """Events of the payment queue only (the triggers also feed analytics_queue)."""
    return lambda e: e["type"] == type_ and e["queue"] == QUEUE


def payment_body(pid: str, status: str, value: str = "3500.00", currency: str = "RUB",
                 **extra: Any) -> dict[str, Any]:
    return {"id": pid, "status": status, "paid": status == "succeeded",
            "amount": {"value": value, "currency": currency}, **extra}


def refund_body(rid: str, pid: str, status: str, value: str = "3500.00",
                **extra: Any) -> dict[str, Any]:
    return {"id": rid, "payment_id": pid, "status": status,
            "amount": {"value": value, "currency": "RUB"}, **extra}


@asynccontextmanager
async def provider_and_reactor(database_url: str, fake: FakeYooKassa,
                               **env: Any) -> AsyncIterator[Any]:
    async with trio.open_nursery() as nursery:
        fake.port = await nursery.start(serve_http, fake.app(), "127.0.0.1", 0)
        async with running_reactor(
                database_url, PAYMENT_PROVIDER="yookassa", YOOKASSA_SHOP_ID=SHOP,
                YOOKASSA_SECRET_KEY=SECRET, YOOKASSA_API_URL=f"http://127.0.0.1:{fake.port}/v3",
                **env) as reactor:
            yield reactor
        nursery.cancel_scope.cancel()


def pending_payment(database_url: str, pid: str, status: str = "pending", *,
                    amount: str = "3500.00", provider: str = "yookassa") -> tuple[Any, Any]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        user = f.profile(conn)
        appointment = f.appointment(conn, user, starts_in=timedelta(days=2),
                                    status="pending_payment")
        payment = f.payment(conn, user, appointment, status=status, amount=amount)
        conn.execute("UPDATE public.payments SET provider = %s, provider_payment_id = %s "
                     "WHERE id = %s", (provider, pid, payment))
        conn.execute("DELETE FROM pgmq.q_email_queue")
    return payment, appointment


async def verify(database_url: str, payment: Any, action: str = "verify") -> None:
    await sql(database_url, "SELECT public.queue_payment_processing(%s, %s)", (payment, action))


async def ask(database_url: str, payment: Any, action: str, amount: Any) -> None:
    """A capture or refund message naming an amount (as trusted backend code sends it)."""
    await sql(database_url, "SELECT public.enqueue('payment_processing_queue', "
                            "jsonb_build_object('payment_id', %s::text, 'action', %s::text, "
                            "'amount', %s::jsonb))", (payment, action, str(amount)))


async def mails(database_url: str) -> list[str]:
    return [m["template"] for (m,) in await sql(
        database_url, "SELECT message FROM pgmq.q_email_queue UNION ALL "
                      "SELECT message FROM pgmq.a_email_queue")]


async def queued_verifies(database_url: str) -> int:
    [(n,)] = await sql(database_url, "SELECT count(*) FROM pgmq.q_payment_processing_queue "
                                     "WHERE message->>'action' = 'verify'")
    return int(n)


async def replay(database_url: str) -> list[int]:
    """`reactor dlq replay` of the whole queue (reactor.engine.dead_letters); the new ids."""
    def run() -> list[int]:
        with psycopg.connect(database_url, autocommit=True) as conn:
            result = dead_letters.replay(conn, dead_letters.Selection(QUEUE), client="test")
            return result.new_msg_ids or []
    return await trio.to_thread.run_sync(run)


def notification(pid: str, event: str = "payment.succeeded") -> dict[str, Any]:
    return {"type": "notification", "event": event, "object": payment_body(pid, "succeeded")}


async def test_succeeded_payment_marks_the_consultation_paid(database_url: str) -> None:
    pid = yid(1)
    fake = FakeYooKassa({f"GET {pid}": [(200, payment_body(pid, "succeeded"))]})
    payment, appointment = pending_payment(database_url, pid)
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment)
            await wait_for(sub, on_payments("job.succeeded"))
    assert await sql(database_url, "SELECT status FROM public.payments") == [("completed",)]
    [(status, paid_at)] = await sql(database_url, "SELECT status, paid_at FROM "
                                                  "public.appointments WHERE id = %s",
                                    (appointment,))
    assert status == "scheduled"
    assert paid_at is not None
    assert await mails(database_url) == ["payment_confirmation"]  # by the trigger
    [call] = fake.calls
    assert call["auth"] == "Basic " + base64.b64encode(f"{SHOP}:{SECRET}".encode()).decode()
    assert await sql(database_url, "SELECT action, seq, outcome, checks FROM "
                                   "reactor.payment_operations") == [("verify", 1, "succeeded", 1)]


async def test_canceled_payment_fails_with_the_reason(database_url: str) -> None:
    pid = yid(2)
    body = payment_body(pid, "canceled", cancellation_details={
        "party": "payment_network", "reason": "insufficient_funds"})
    fake = FakeYooKassa({f"GET {pid}": [(200, body)]})
    payment, _ = pending_payment(database_url, pid)
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment)
            await wait_for(sub, on_payments("job.succeeded"))
    assert await sql(database_url, "SELECT status, status_reason FROM public.payments") == [
        ("failed", "payment_network: insufficient_funds")]


async def test_pending_is_asked_again_until_it_succeeds(database_url: str) -> None:
    pid = yid(3)
    fake = FakeYooKassa({f"GET {pid}": [(200, payment_body(pid, "pending")),
                                        (200, payment_body(pid, "waiting_for_capture")),
                                        (200, payment_body(pid, "succeeded"))]})
    payment, _ = pending_payment(database_url, pid)
    async with provider_and_reactor(database_url, fake, MAX_ATTEMPTS=1) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment)
            later = await wait_for(sub, on_payments("job.retrying"), count=2, within_s=15)
            await wait_for(sub, on_payments("job.succeeded"), within_s=15)
    assert "payment pending; asking again in 1s" in later[0]["error"]
    assert "waiting_for_capture" in later[1]["error"]  # more checks than MAX_ATTEMPTS: fine
    assert await sql(database_url, "SELECT status FROM public.payments") == [("completed",)]
    # One intent, however many messages carried it.
    assert await sql(database_url, "SELECT seq, checks FROM reactor.payment_operations") == [
        (1, 3)]


async def test_the_deadline_counts_from_the_request_not_the_payment(database_url: str) -> None:
    pid = yid(4)
    fake = FakeYooKassa({f"GET {pid}": [(200, payment_body(pid, "pending"))]})
    payment, _ = pending_payment(database_url, pid)
    await sql(database_url, "UPDATE public.payments SET created_at = now() - interval '2 days'")
    async with provider_and_reactor(database_url, fake, RETRY_BASE_S=3) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment)
            # An old payment is not given up on its first check...
            [retry] = await wait_for(sub, on_payments("job.retrying"))
            # ...only once the check itself has been pending for longer than the max age.
            await sql(database_url, "UPDATE reactor.payment_operations "
                                    "SET requested_at = now() - interval '2 days'")
            [event] = await wait_for(sub, on_payments("job.dead_lettered"), within_s=15)
    assert "asking again in 3s" in retry["error"]
    assert "still pending after 48.0 h" in event["error"]
    assert await sql(database_url, "SELECT outcome FROM reactor.payment_operations") == [
        ("expired",)]
    assert await sql(database_url, "SELECT status FROM public.payments") == [("pending",)]


async def test_server_error_then_success(database_url: str) -> None:
    pid = yid(5)
    fake = FakeYooKassa({f"GET {pid}": [(500, {"type": "error"}),
                                        (200, payment_body(pid, "succeeded"))]})
    payment, _ = pending_payment(database_url, pid)
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment)
            [retry] = await wait_for(sub, on_payments("job.retrying"))
            await wait_for(sub, on_payments("job.succeeded"), within_s=10)
    assert "HTTP 500" in retry["error"]
    assert await sql(database_url, "SELECT status FROM public.payments") == [("completed",)]


async def test_bad_credentials_are_a_named_configuration_error_and_retried(
        database_url: str) -> None:
    pid = yid(6)
    fake = FakeYooKassa({f"GET {pid}": [(401, {"type": "error", "code": "invalid_credentials"})]})
    payment, _ = pending_payment(database_url, pid)
    async with provider_and_reactor(database_url, fake, MAX_ATTEMPTS=1) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment)
            retries = await wait_for(sub, on_payments("job.retrying"), count=2, within_s=15)
    assert "check YOOKASSA_SHOP_ID and YOOKASSA_SECRET_KEY" in retries[0]["error"]
    assert SECRET not in retries[0]["error"]
    assert await sql(database_url, "SELECT status FROM public.payments") == [("pending",)]


async def test_unknown_to_the_provider_or_to_us_is_dead_lettered(database_url: str) -> None:
    fake = FakeYooKassa()
    payment, _ = pending_payment(database_url, yid(7))
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment)
            await verify(database_url, "00000000-0000-0000-0000-000000000042")
            dead = await wait_for(sub, on_payments("job.dead_lettered"), count=2)
    errors = " | ".join(e["error"] for e in dead)
    assert "HTTP 404" in errors
    assert "does not exist in public.payments" in errors


async def test_capture_sends_a_stable_idempotence_key(database_url: str) -> None:
    pid = yid(8)
    fake = FakeYooKassa({f"CAPTURE {pid}": [(503, {"type": "error"}),
                                            (200, payment_body(pid, "succeeded"))]})
    payment, _ = pending_payment(database_url, pid)
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment, "capture")
            await wait_for(sub, on_payments("job.succeeded"), within_s=10)
    first, second = fake.calls
    assert first["idempotence_key"] == second["idempotence_key"] == f"{payment}:capture:1"
    assert first["json"] == {"amount": {"value": "3500.00", "currency": "RUB"}}
    assert await sql(database_url, "SELECT status FROM public.payments") == [("completed",)]


async def test_refund_of_a_completed_payment(database_url: str) -> None:
    pid, rid = yid(9), yid(0x900)
    fake = FakeYooKassa({f"REFUND {pid}": [(200, refund_body(rid, pid, "succeeded"))]})
    payment, _ = pending_payment(database_url, pid, status="completed")
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment, "refund")
            await wait_for(sub, on_payments("job.succeeded"))
    [call] = fake.calls
    assert call["json"]["payment_id"] == pid
    assert call["idempotence_key"] == f"{payment}:refund:1"
    assert await sql(database_url, "SELECT status FROM public.payments") == [("refunded",)]
    assert await sql(database_url, "SELECT provider_object_id, outcome FROM "
                                   "reactor.payment_operations") == [(rid, "succeeded")]


async def test_a_refund_the_provider_cancels_is_dead_lettered_with_its_reason(
        database_url: str) -> None:
    pid, rid = yid(11), yid(0x911)
    canceled = {**refund_body(rid, pid, "canceled"),
                "cancellation_details": {"party": "yoo_money", "reason": "insufficient_funds"}}
    fake = FakeYooKassa({f"REFUND {pid}": [(200, canceled)]})
    payment, _ = pending_payment(database_url, pid, status="completed")
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment, "refund")
            [dead] = await wait_for(sub, on_payments("job.dead_lettered"))
    assert dead["attempt"] == 1
    assert "refund canceled: yoo_money: insufficient_funds" in dead["error"]
    assert fake.keys() == [f"REFUND {pid}"]  # asked once, never again
    assert await sql(database_url, "SELECT status FROM public.payments") == [("completed",)]
    assert await sql(database_url, "SELECT outcome FROM reactor.payment_operations") == [
        ("canceled",)]


@pytest.mark.parametrize(("status", "provider_id", "reason"), [
    ("pending", yid(12), "is pending: only a completed payment can be refunded"),
    ("failed", yid(12), "is failed: only a completed payment can be refunded"),
    ("completed", None, "has no provider_payment_id"),
])
async def test_a_refund_the_row_cannot_have_asks_the_provider_nothing(
        database_url: str, status: str, provider_id: str | None, reason: str) -> None:
    fake = FakeYooKassa()
    payment, _ = pending_payment(database_url, yid(12), status=status)
    if provider_id is None:
        await sql(database_url, "UPDATE public.payments SET provider_payment_id = NULL")
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment, "refund")
            [dead] = await wait_for(sub, on_payments("job.dead_lettered"))
    assert dead["attempt"] == 1
    assert f"payment {payment} {reason}" in dead["error"]
    assert fake.calls == []
    assert await sql(database_url, "SELECT status FROM public.payments") == [(status,)]


async def test_a_verify_of_a_payment_with_no_provider_id_is_dead_lettered(
        database_url: str) -> None:
    fake = FakeYooKassa()
    payment, appointment = pending_payment(database_url, yid(13))
    await sql(database_url, "UPDATE public.payments SET provider_payment_id = NULL")
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment)
            [dead] = await wait_for(sub, on_payments("job.dead_lettered"))
    assert f"payment {payment} has no provider_payment_id" in dead["error"]
    assert fake.calls == []
    assert await sql(database_url, "SELECT status FROM public.payments") == [("pending",)]
    assert await sql(database_url, "SELECT status FROM public.appointments WHERE id = %s",
                     (appointment,)) == [("pending_payment",)]


async def test_a_final_status_never_moves_backwards(database_url: str) -> None:
    pid = yid(10)
    fake = FakeYooKassa({f"GET {pid}": [(200, payment_body(pid, "canceled"))]})
    payment, _ = pending_payment(database_url, pid, status="completed")
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment)
            await wait_for(sub, on_payments("job.succeeded"))
    assert await sql(database_url, "SELECT status FROM public.payments") == [("completed",)]
    assert fake.calls == []


async def test_webhook_refuses_a_body_that_trickles_or_is_declared_too_big(
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even from the provider's network, a notification body must arrive whole and in time:
    one declared over the limit is refused before it is read (413), one sent a byte at a
    time is refused at the deadline (408); nothing is queued."""
    monkeypatch.setattr("reactor.engine.web.BODY_DEADLINE_S", 1.0)
    fake = FakeYooKassa({})
    async with provider_and_reactor(database_url, fake, **LOOPBACK) as reactor:
        port = reactor.http_port
        with trio.fail_after(patience(15)):
            assert " 413 " in await post_raw(port, HOOK, "Content-Length: 999999999\r\n",
                                              [b"x" * 65536] * 4)
            assert " 408 " in await post_raw(port, HOOK, "Content-Length: 30\r\n",
                                              [b"{"] * 30, gap_s=0.2)
    assert await sql(database_url, "SELECT count(*) FROM pgmq.q_payment_processing_queue"
                     ) == [(0,)]
    assert fake.calls == []


async def test_webhook_queues_a_verify_and_refuses_bad_bodies(database_url: str) -> None:
    pid = yid(11)
    fake = FakeYooKassa({f"GET {pid}": [(200, payment_body(pid, "pending"))]})
    pending_payment(database_url, pid)
    async with provider_and_reactor(database_url, fake, **LOOPBACK) as reactor, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        bad = [(b"{not json", 400), (b'{"type": "notification", "event": "payment.hacked", '
                                     b'"object": {"id": "x"}}', 422),
               (b'{"type": "notification", "event": "payment.succeeded"}', 422),
               (b"[]", 400), (b"x" * 70_000, 413)]
        for body, code in bad:
            assert (await http.post(HOOK, content=body)).status_code == code
        assert await sql(database_url, "SELECT count(*) FROM pgmq.q_payment_processing_queue "
                                       "UNION ALL SELECT count(*) FROM "
                                       "pgmq.a_payment_processing_queue") == [(0,), (0,)]
        ignored = await http.post(HOOK, json=notification(yid(0xbad)))
        assert ignored.json() == {"status": "ignored"}, ignored.text
        with reactor.bus.subscribe() as sub:
            answer = await http.post(HOOK, json=notification(pid))
            assert (answer.status_code, answer.json()) == (200, {"status": "queued"})
            [event] = await wait_for(sub, on_payments("job.retrying"))
    # The body said "succeeded", but only the API's answer counts, and it says "pending".
    assert "payment pending" in event["error"]
    assert await sql(database_url, "SELECT status FROM public.payments") == [("pending",)]
    assert fake.keys() == [f"GET {pid}"]


# -- no provider, no decision ---------------------------------------------------------------
async def test_forged_webhook_under_default_settings_completes_nothing(
        database_url: str) -> None:
    """The attack of issue 11: an unsigned POST naming a pending YooKassa payment."""
    pid = yid(12)
    payment, appointment = pending_payment(database_url, pid)
    manual, _ = pending_payment(database_url, yid(13), provider="manual")
    async with running_reactor(database_url) as reactor, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        assert isinstance(reactor.settings, Settings)
        assert reactor.settings.payment_provider == "manual"  # the default
        answer = await http.post(HOOK, json=notification(pid))
        assert answer.status_code == 404
        with reactor.bus.subscribe() as sub:
            # Asked directly, the reactor still decides nothing.
            await verify(database_url, payment)
            [dead] = await wait_for(sub, on_payments("job.dead_lettered"))
            await verify(database_url, manual)
            await wait_for(sub, on_payments("job.succeeded"))
            await verify(database_url, manual, "refund")
            [refund] = await wait_for(sub, on_payments("job.dead_lettered"))
    assert "has provider 'yookassa' but PAYMENT_PROVIDER=manual" in dead["error"]
    assert "PAYMENT_PROVIDER=manual cannot refund" in refund["error"]
    assert await sql(database_url, "SELECT DISTINCT status FROM public.payments") == [
        ("pending",)]
    assert await sql(database_url, "SELECT status FROM public.appointments WHERE id = %s",
                     (appointment,)) == [("pending_payment",)]
    assert await mails(database_url) == []


async def test_a_row_of_another_provider_is_never_verified_with_this_one(
        database_url: str) -> None:
    pid = yid(14)
    fake = FakeYooKassa({f"GET {pid}": [(200, payment_body(pid, "succeeded"))]})
    payment, _ = pending_payment(database_url, pid, provider="manual")
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment)
            [dead] = await wait_for(sub, on_payments("job.dead_lettered"))
    assert "has provider 'manual' but PAYMENT_PROVIDER=yookassa" in dead["error"]
    assert fake.calls == []
    assert await sql(database_url, "SELECT status FROM public.payments") == [("pending",)]


# -- verify what was paid ------------------------------------------------------------------
MISMATCHES: dict[str, tuple[dict[str, Any], str]] = {
    "amount": ({"value": "1.00"}, "amount 1.00 RUB at the provider, 35000.00 RUB here"),
    "currency": ({"value": "35000.00", "currency": "USD"},
                 "amount 35000.00 USD at the provider, 35000.00 RUB here"),
    "metadata": ({"value": "35000.00",
                  "metadata": {"payment_id": "00000000-0000-0000-0000-0000000000ff"}},
                 "metadata.payment_id 00000000-0000-0000-0000-0000000000ff at the provider"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
async def test_a_mismatch_completes_nothing_and_is_dead_lettered_with_the_reason(
        database_url: str, case: str) -> None:
    pid = yid(15)
    answer, reason = MISMATCHES[case]
    fake = FakeYooKassa({f"GET {pid}": [(200, payment_body(pid, "succeeded", **answer))]})
    payment, appointment = pending_payment(database_url, pid, amount="35000.00")
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment)
            [alert] = await wait_for(sub, lambda e: e["type"] == "payment.mismatch")
            [dead] = await wait_for(sub, on_payments("job.dead_lettered"))
    assert reason in alert["error"]
    assert alert["payment_id"] == str(payment)
    assert reason in dead["error"]
    assert "nothing was changed" in dead["error"]
    assert await sql(database_url, "SELECT status FROM public.payments") == [("pending",)]
    assert await sql(database_url, "SELECT status FROM public.appointments WHERE id = %s",
                     (appointment,)) == [("pending_payment",)]
    assert await mails(database_url) == []
    [(letter,)] = await sql(database_url,
                            "SELECT message FROM pgmq.q_payment_processing_queue_dlq")
    assert reason in letter["error"]  # what the operator sees in `reactor dlq list`


async def test_a_crafted_id_never_reaches_another_url(database_url: str) -> None:
    crafted = "../refunds/xyz?limit=1#"
    fake = FakeYooKassa({"GET_REFUND xyz": [(200, refund_body(yid(1), yid(2), "succeeded"))]})
    payment, _ = pending_payment(database_url, crafted)
    completed, _ = pending_payment(database_url, crafted.replace("1", "2"), status="completed")
    async with provider_and_reactor(database_url, fake, **LOOPBACK) as reactor, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment)
            await verify(database_url, payment, "capture")
            await verify(database_url, completed, "refund")
            dead = await wait_for(sub, on_payments("job.dead_lettered"), count=3)
        answer = await http.post(HOOK, json=notification(crafted))
        assert answer.status_code == 422
    assert all("is not a YooKassa id" in e["error"] for e in dead), dead
    assert fake.calls == []
    # And the provider client itself refuses such an id before any request is made.
    provider = YooKassaProvider(load_settings(
        _env_file=None, DATABASE_URL=database_url, PAYMENT_PROVIDER="yookassa",
        YOOKASSA_SHOP_ID=SHOP, YOOKASSA_SECRET_KEY=SECRET,
        YOOKASSA_API_URL=f"http://127.0.0.1:{fake.port}/v3"))
    try:
        with pytest.raises(PermanentError, match="not a YooKassa id"):
            await provider.get(crafted)
        with pytest.raises(PermanentError, match="not a YooKassa id"):
            await provider.get_refund("a/../b")
    finally:
        await provider.aclose()
    assert fake.calls == []


# -- exactly one refund per intent -------------------------------------------------------------
async def test_replaying_a_dead_lettered_refund_sends_the_same_idempotence_key(
        database_url: str) -> None:
    pid, rid = yid(16), yid(0x1600)
    fake = FakeYooKassa({f"REFUND {pid}": [(503, {"type": "error"}),
                                           (200, refund_body(rid, pid, "succeeded"))]})
    payment, _ = pending_payment(database_url, pid, status="completed")
    async with provider_and_reactor(database_url, fake, MAX_ATTEMPTS=1,
                                    OUTAGE_MAX_ATTEMPTS=1) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment, "refund")
            await wait_for(sub, on_payments("job.dead_lettered"))
            assert len(await replay(database_url)) == 1
            await wait_for(sub, on_payments("job.succeeded"))
    first, second = fake.calls
    assert first["key"] == second["key"] == f"REFUND {pid}"
    assert first["idempotence_key"] == second["idempotence_key"] == f"{payment}:refund:1"
    assert await sql(database_url, "SELECT status FROM public.payments") == [("refunded",)]


async def test_a_pending_refund_is_polled_by_its_id_and_never_requested_twice(
        database_url: str) -> None:
    pid, rid = yid(17), yid(0x1700)
    fake = FakeYooKassa({f"REFUND {pid}": [(200, refund_body(rid, pid, "pending"))],
                         f"GET_REFUND {rid}": [(200, refund_body(rid, pid, "pending")),
                                               (200, refund_body(rid, pid, "succeeded"))]})
    payment, _ = pending_payment(database_url, pid, status="completed")
    # A payment older than a day: the refund's own deadline counts, not the payment's age.
    await sql(database_url, "UPDATE public.payments SET created_at = now() - interval '3 days'")
    async with provider_and_reactor(database_url, fake, RETRY_BASE_S=3) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment, "refund")
            [pending] = await wait_for(sub, on_payments("job.retrying"))
            await sql(database_url, "UPDATE reactor.payment_operations "
                                    "SET requested_at = now() - interval '2 days'")
            [dead] = await wait_for(sub, on_payments("job.dead_lettered"), within_s=15)
            assert len(await replay(database_url)) == 1
            await wait_for(sub, on_payments("job.succeeded"))
    assert "refund pending; asking again in 3s" in pending["error"]
    assert "keeps its Idempotence-Key" in dead["error"]
    assert fake.keys() == [f"REFUND {pid}", f"GET_REFUND {rid}", f"GET_REFUND {rid}"]
    assert await sql(database_url, "SELECT status FROM public.payments") == [("refunded",)]


# -- the webhook is a hint, and a cheap one ----------------------------------------------------
async def test_300_notifications_for_one_payment_queue_one_verify(database_url: str) -> None:
    pid = yid(18)
    fake = FakeYooKassa({f"GET {pid}": [(200, payment_body(pid, "pending"))]})
    pending_payment(database_url, pid)
    answers: list[str] = []
    async with provider_and_reactor(database_url, fake, RETRY_BASE_S=30,
                                    **LOOPBACK) as reactor, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{reactor.http_port}",
                              timeout=30) as http:
        limit = trio.CapacityLimiter(20)

        async def post() -> None:
            async with limit:
                answer = await http.post(HOOK, json=notification(pid))
                assert answer.status_code == 200, answer.text
                answers.append(answer.json()["status"])
                assert await queued_verifies(database_url) <= 1

        async with trio.open_nursery() as nursery:
            for _ in range(300):
                nursery.start_soon(post)
    assert answers.count("queued") == 1
    assert answers.count("already queued") == 299
    assert await queued_verifies(database_url) == 1
    assert 1 <= len(fake.calls) <= 2, fake.keys()
    assert await sql(database_url, "SELECT status FROM public.payments") == [("pending",)]


async def test_a_notification_brings_a_waiting_check_forward_at_most_once_a_minute(
        database_url: str) -> None:
    pid = yid(21)
    fake = FakeYooKassa({f"GET {pid}": [(200, payment_body(pid, "pending")),
                                        (200, payment_body(pid, "succeeded"))]})
    payment, _ = pending_payment(database_url, pid)
    delayed = ("SELECT count(*) FROM pgmq.q_payment_processing_queue "
               "WHERE read_ct = 0 AND vt > now() + interval '5 minutes'")
    async with provider_and_reactor(database_url, fake, RETRY_BASE_S=600,
                                    **LOOPBACK) as reactor, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        with reactor.bus.subscribe() as sub:
            assert (await http.post(HOOK, json=notification(pid))).json() == {
                "status": "queued"}
            [retry] = await wait_for(sub, on_payments("job.retrying"))
            assert "asking again in 600s" in retry["error"]
            async def requeued() -> bool:  # the requeued check, waiting for its turn
                return await sql(database_url, delayed) == [(1,)]
            await eventually(requeued, within_s=30)
            # Asked a moment ago: a notification now adds nothing, not even a call.
            assert (await http.post(HOOK, json=notification(pid))).json() == {
                "status": "already queued"}
            assert await sql(database_url, delayed) == [(1,)]
            # A minute later, a notification makes the waiting check happen now.
            await sql(database_url, "UPDATE reactor.payment_operations "
                                    "SET checked_at = now() - interval '2 minutes'")
            assert (await http.post(HOOK, json=notification(pid))).json() == {
                "status": "already queued"}
            await wait_for(sub, on_payments("job.succeeded"))
    assert fake.keys() == [f"GET {pid}", f"GET {pid}"]
    assert await sql(database_url, "SELECT status FROM public.payments WHERE id = %s",
                     (payment,)) == [("completed",)]


async def test_a_notification_from_a_non_allowed_address_is_refused(database_url: str) -> None:
    pid = yid(19)
    fake = FakeYooKassa({f"GET {pid}": [(200, payment_body(pid, "succeeded"))]})
    pending_payment(database_url, pid)
    async with provider_and_reactor(database_url, fake) as reactor, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        # Default networks are YooKassa's; 127.0.0.1 is not one of them, and without a
        # trusted proxy X-Forwarded-For is nobody's word.
        for headers in ({}, {"X-Forwarded-For": "185.71.76.10"}):
            answer = await http.post(HOOK, json=notification(pid), headers=headers)
            assert answer.status_code == 403
            assert "YOOKASSA_WEBHOOK_NETWORKS" in answer.json()["error"]
    assert await sql(database_url, "SELECT count(*) FROM pgmq.q_payment_processing_queue "
                                   "UNION ALL SELECT count(*) FROM "
                                   "pgmq.a_payment_processing_queue") == [(0,), (0,)]
    assert fake.calls == []
    assert await sql(database_url, "SELECT status FROM public.payments") == [("pending",)]


async def test_forwarded_for_is_honoured_only_from_a_trusted_proxy(database_url: str) -> None:
    pid = yid(20)
    fake = FakeYooKassa({f"GET {pid}": [(200, payment_body(pid, "pending"))]})
    pending_payment(database_url, pid)
    async with provider_and_reactor(database_url, fake, RETRY_BASE_S=30,
                                    WEBHOOK_TRUSTED_PROXIES="127.0.0.0/8") as reactor, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        async def status(forwarded: str | None) -> int:
            headers = {"X-Forwarded-For": forwarded} if forwarded is not None else {}
            return (await http.post(HOOK, json=notification(pid), headers=headers)).status_code

        assert await status(None) == 403  # the proxy itself is not the provider
        assert await status("203.0.113.9") == 403
        assert await status("185.71.76.10, 203.0.113.9") == 403  # the client's own claim
        assert await status("not-an-address") == 403
        assert await status("185.71.76.10") == 200
        assert await status("203.0.113.9, 77.75.153.5, 127.0.0.1") == 200  # two proxies
    assert await queued_verifies(database_url) == 1


def test_webhook_network_settings_are_checked_at_start() -> None:
    url = "postgresql://reactor@127.0.0.1/reactor"
    with pytest.raises(ConfigError) as error:
        load_settings(_env_file=None, DATABASE_URL=url, WEBHOOK_TRUSTED_PROXIES="10.0.0.1,bogus")
    assert str(error.value).startswith("invalid WEBHOOK_TRUSTED_PROXIES=")
    assert "'bogus' is not an IP address or network" in str(error.value)
    # Left empty in .env, the provider's own ranges apply (never "refuse everyone").
    empty = load_settings(_env_file=None, DATABASE_URL=url, YOOKASSA_WEBHOOK_NETWORKS=" ")
    assert empty.yookassa_webhook_networks == YOOKASSA_NETWORKS


# -- one provider payment, one row (security review of issue 11) ----------------------------
async def test_two_rows_cannot_name_one_provider_payment(database_url: str) -> None:
    pid = yid(0x51)
    pending_payment(database_url, pid)
    with pytest.raises(psycopg.errors.UniqueViolation, match="payments_provider_payment_id_key"):
        pending_payment(database_url, pid)
    # Another provider's row may carry the same text (its own id space)...
    pending_payment(database_url, pid, provider="manual")
    # ...and rows without a provider id are not affected.
    first, _ = pending_payment(database_url, yid(0x52))
    second, _ = pending_payment(database_url, yid(0x53))
    await sql(database_url, "UPDATE public.payments SET provider_payment_id = NULL "
                            "WHERE id IN (%s, %s)", (first, second))


async def test_a_row_whose_provider_payment_another_row_names_is_never_completed(
        database_url: str) -> None:
    pid = yid(0x54)
    fake = FakeYooKassa({f"GET {pid}": [(200, payment_body(pid, "succeeded"))]})
    payment, appointment = pending_payment(database_url, pid)
    other, _ = pending_payment(database_url, pid, provider="manual")
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment)
            [alert] = await wait_for(sub, lambda e: e["type"] == "payment.mismatch")
            [dead] = await wait_for(sub, on_payments("job.dead_lettered"))
    reason = f"provider payment {pid} is also named by payment(s) {other}"
    assert reason in alert["error"]
    assert reason in dead["error"]
    assert "nothing was changed" in dead["error"]
    assert fake.calls == []  # refused before asking anything
    assert await sql(database_url, "SELECT DISTINCT status FROM public.payments") == [
        ("pending",)]
    assert await sql(database_url, "SELECT status FROM public.appointments WHERE id = %s",
                     (appointment,)) == [("pending_payment",)]


def test_migration_037_names_the_rows_that_share_a_provider_payment(
        empty_database_url: str, tmp_path: Path) -> None:
    """On a database that already has such rows, the migration stops with the ids and
    the fix; once fixed, it applies."""
    before = tmp_path / "before"
    before.mkdir()
    for path in MIGRATIONS_DIR.glob("*.sql"):
        if path.name < "037":
            shutil.copy(path, before)
    migrate_like_the_last_release(empty_database_url, before)  # an installation of then
    pid = yid(0x55)
    first, _ = pending_payment(empty_database_url, pid)
    second, _ = pending_payment(empty_database_url, pid)
    with pytest.raises(psycopg.Error) as error:
        migrate(empty_database_url)
    message = str(error.value)
    assert f"yookassa payment {pid} is named by rows {first}, {second}" in message
    assert "set provider_payment_id to NULL" in message
    assert "run reactor migrate again" in message
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute("UPDATE public.payments SET provider_payment_id = NULL WHERE id = %s",
                     (second,))
    migrate(empty_database_url)
    with psycopg.connect(empty_database_url, autocommit=True) as conn, \
            pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("UPDATE public.payments SET provider_payment_id = %s WHERE id = %s",
                     (pid, second))


# -- amounts of refunds and captures ----------------------------------------------------------
BAD_AMOUNTS: dict[str, tuple[str, str, str]] = {
    "refund zero": ("refund", "0", "amount 0 is not more than 0"),
    "refund negative": ("refund", "-5", "amount -5 is not more than 0"),
    "refund fractions of a cent": ("refund", "100.001", "has more than 2 decimal places"),
    "refund more than paid": ("refund", "3500.01", "refund of 3500.01 RUB of payment"),
    "capture zero": ("capture", "0", "amount 0 is not more than 0"),
    "capture part": ("capture", "100", "partial capture is not supported"),
}


@pytest.mark.parametrize("case", sorted(BAD_AMOUNTS))
async def test_a_bad_amount_is_refused_before_the_provider_is_asked(
        database_url: str, case: str) -> None:
    action, amount, reason = BAD_AMOUNTS[case]
    pid = yid(0x56)
    fake = FakeYooKassa({
        f"REFUND {pid}": [(200, refund_body(yid(0x956), pid, "succeeded", amount))],
        f"CAPTURE {pid}": [(200, payment_body(pid, "succeeded", amount))]})
    status = "completed" if action == "refund" else "pending"
    payment, _ = pending_payment(database_url, pid, status=status)
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await ask(database_url, payment, action, amount)
            [dead] = await wait_for(sub, on_payments("job.dead_lettered"))
    assert reason in dead["error"]
    assert dead["attempt"] == 1
    assert fake.calls == []
    assert await sql(database_url, "SELECT status, refunded_amount FROM public.payments") == [
        (status, Decimal("0.00"))]


async def test_a_partial_refund_keeps_the_payment_completed_until_all_is_refunded(
        database_url: str) -> None:
    pid, first, rest = yid(0x57), yid(0x957), yid(0x958)
    fake = FakeYooKassa({f"REFUND {pid}": [(200, refund_body(first, pid, "succeeded", "100.00")),
                                           (200, refund_body(rest, pid, "succeeded", "3400.00"))]})
    payment, _ = pending_payment(database_url, pid, status="completed")
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await ask(database_url, payment, "refund", "100")
            await wait_for(sub, on_payments("job.succeeded"))
            assert await sql(database_url, "SELECT status, refunded_amount FROM "
                                           "public.payments") == [("completed", Decimal("100"))]
            await verify(database_url, payment, "refund")  # no amount: all that is left
            await wait_for(sub, on_payments("job.succeeded"))
    one, two = fake.calls
    assert one["json"]["amount"] == {"value": "100.00", "currency": "RUB"}
    assert two["json"]["amount"] == {"value": "3400.00", "currency": "RUB"}
    assert (one["idempotence_key"], two["idempotence_key"]) == (
        f"{payment}:refund:1", f"{payment}:refund:2")
    assert one["json"]["metadata"] == {"reactor_operation": f"{payment}:refund:1"}
    assert await sql(database_url, "SELECT status, refunded_amount FROM public.payments") == [
        ("refunded", Decimal("3500.00"))]


async def test_a_redelivered_partial_refund_is_not_made_twice(database_url: str) -> None:
    """The reactor stopped after recording the refund, before archiving its message."""
    pid, rid = yid(0x58), yid(0x959)
    fake = FakeYooKassa({f"REFUND {pid}": [(200, refund_body(rid, pid, "succeeded", "100.00"))]})
    payment, _ = pending_payment(database_url, pid, status="completed")
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await ask(database_url, payment, "refund", "100")
            [done] = await wait_for(sub, on_payments("job.succeeded"))

            async def archived() -> bool:  # the archive follows the event, batched
                return await sql(database_url, "SELECT count(*) FROM "
                                 "pgmq.a_payment_processing_queue WHERE msg_id = %s",
                                 (done["msg_id"],)) == [(1,)]

            await eventually(archived)
            await sql(database_url, """
                WITH back AS (DELETE FROM pgmq.a_payment_processing_queue
                               WHERE msg_id = %s RETURNING msg_id, read_ct, message)
                INSERT INTO pgmq.q_payment_processing_queue (msg_id, read_ct, vt, message)
                OVERRIDING SYSTEM VALUE SELECT msg_id, read_ct, now(), message FROM back""",
                      (done["msg_id"],))
            await sql(database_url, "SELECT pg_notify('reactor_wakeup', %s)", (QUEUE,))
            [again] = await wait_for(sub, on_payments("job.succeeded"))
    assert again["msg_id"] == done["msg_id"]
    assert fake.keys() == [f"REFUND {pid}"]
    assert await sql(database_url, "SELECT status, refunded_amount FROM public.payments") == [
        ("completed", Decimal("100.00"))]


async def test_a_capture_the_provider_makes_for_less_completes_nothing(
        database_url: str) -> None:
    pid = yid(0x59)
    fake = FakeYooKassa({f"CAPTURE {pid}": [(200, payment_body(pid, "succeeded", "100.00"))]})
    payment, _ = pending_payment(database_url, pid)
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment, "capture")
            [dead] = await wait_for(sub, on_payments("job.dead_lettered"))
    [call] = fake.calls
    assert call["json"] == {"amount": {"value": "3500.00", "currency": "RUB"}}  # the row's
    assert "amount 100.00 RUB at the provider, 3500.00 RUB here" in dead["error"]
    assert await sql(database_url, "SELECT status FROM public.payments") == [("pending",)]


# -- the row must still be the one the provider was asked about -------------------------------
async def test_a_row_changed_while_the_provider_was_asked_is_not_completed(
        database_url: str) -> None:
    pid = yid(0x5a)
    payment, appointment = pending_payment(database_url, pid)

    async def cheapen() -> None:  # someone edits the row while the reactor waits
        await sql(database_url, "UPDATE public.payments SET amount = 1.00 WHERE id = %s",
                  (payment,))

    fake = FakeYooKassa({f"GET {pid}": [(200, payment_body(pid, "succeeded"))]},
                        before={f"GET {pid}": cheapen})
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment)
            [retry] = await wait_for(sub, on_payments("job.retrying"))
            [dead] = await wait_for(sub, on_payments("job.dead_lettered"), within_s=15)
    assert f"payment {payment} changed while it was checked" in retry["error"]
    assert "amount 3500.00 RUB at the provider, 1.00 RUB here" in dead["error"]
    assert await sql(database_url, "SELECT status FROM public.payments") == [("pending",)]
    assert await sql(database_url, "SELECT status FROM public.appointments WHERE id = %s",
                     (appointment,)) == [("pending_payment",)]
    assert await mails(database_url) == []


# -- a key the provider has forgotten -----------------------------------------------------------
@pytest.mark.parametrize("made", [True, False], ids=["made-before", "never-made"])
async def test_a_refund_unrecorded_for_a_day_is_looked_up_before_it_is_asked_again(
        database_url: str, made: bool) -> None:
    """Its first request may have reached YooKassa, which forgets keys after 24 h."""
    pid, rid = yid(0x5b), yid(0x95b)
    payment, _ = pending_payment(database_url, pid, status="completed")
    key = f"{payment}:refund:1"
    ours = refund_body(rid, pid, "succeeded", metadata={"reactor_operation": key})
    staff = refund_body(yid(0x95c), pid, "succeeded", "10.00")  # made by hand: not ours
    listed = [staff, ours] if made else [staff]
    fake = FakeYooKassa({f"LIST_REFUNDS {pid}": [(200, {"type": "list", "items": listed})],
                         f"REFUND {pid}": [(200, ours)]})
    await sql(database_url, "INSERT INTO reactor.payment_operations (payment_id, action, seq, "
                            "amount, requested_at, checks) VALUES (%s, 'refund', 1, 3500, "
                            "now() - interval '25 hours', 1)", (payment,))
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment, "refund")
            await wait_for(sub, on_payments("job.succeeded"))
    assert fake.keys() == ([f"LIST_REFUNDS {pid}"] if made
                           else [f"LIST_REFUNDS {pid}", f"REFUND {pid}"])
    assert fake.calls[0]["query"] == f"payment_id={pid}&limit=100"
    if not made:
        assert fake.calls[1]["idempotence_key"] == key
    assert await sql(database_url, "SELECT status FROM public.payments") == [("refunded",)]
    assert await sql(database_url, "SELECT seq, provider_object_id, outcome FROM "
                                   "reactor.payment_operations") == [(1, rid, "succeeded")]


async def test_provider_text_with_nul_or_surrogates_is_recorded_escaped(
        database_url: str) -> None:
    """Provider answers are untrusted: their text reaches errors and status_reason only
    escaped, so neither jsonb nor text refuses them and the queue keeps moving."""
    odd, declined = yid(0x5c), yid(0x5d)
    canceled = json.dumps(payment_body(declined, "canceled", cancellation_details={
        "party": "bank\x00", "reason": "no\ud800"})).encode()  # ASCII, with \u escapes
    fake = FakeYooKassa({f"GET {odd}": [(200, payment_body(odd + "\x00", "succeeded"))],
                         f"GET {declined}": [(200, canceled)]})
    first, _ = pending_payment(database_url, odd)
    second, _ = pending_payment(database_url, declined)
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, first)
            [dead] = await wait_for(sub, on_payments("job.dead_lettered"))
            await verify(database_url, second)
            await wait_for(sub, on_payments("job.succeeded"))
    assert f"id '{odd}\\x00' at the provider" in dead["error"]
    [(letter,)] = await sql(database_url,
                            "SELECT message FROM pgmq.q_payment_processing_queue_dlq")
    assert "\\x00" in letter["error"]
    assert await sql(database_url, "SELECT status, status_reason FROM public.payments "
                                   "WHERE id = %s", (second,)) == [
        ("failed", "'bank\\x00': 'no\\ud800'")]
