"""Payments against a local HTTP server that speaks the YooKassa v3 shapes."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
import psycopg
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from reactor.web import serve_http
from tests import factories as f
from tests.harness import running_reactor, sql, wait_for

SHOP, SECRET = "123456", "test_secret_key"


@dataclass
class FakeYooKassa:
    """Scripted answers per 'METHOD provider-id'; the last one repeats. Records every call."""

    script: dict[str, list[tuple[int, dict[str, Any]]]] = field(default_factory=dict)
    calls: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0

    def answer(self, key: str) -> Response:
        steps = self.script.get(key)
        if not steps:
            return JSONResponse({"type": "error", "code": "not_found"}, status_code=404)
        code, body = steps.pop(0) if len(steps) > 1 else steps[0]
        return JSONResponse(body, status_code=code)

    def app(self) -> Starlette:
        async def record(request: Request, key: str) -> Response:
            body = await request.body()
            self.calls.append({"key": key, "auth": request.headers.get("authorization"),
                               "idempotence_key": request.headers.get("idempotence-key"),
                               "json": (await request.json()) if body else None})
            return self.answer(key)

        async def get_payment(request: Request) -> Response:
            return await record(request, f"GET {request.path_params['pid']}")

        async def capture(request: Request) -> Response:
            return await record(request, f"CAPTURE {request.path_params['pid']}")

        async def refunds(request: Request) -> Response:
            payload = await request.json()
            return await record(request, f"REFUND {payload.get('payment_id')}")

        return Starlette(routes=[
            Route("/v3/payments/{pid}", get_payment),
            Route("/v3/payments/{pid}/capture", capture, methods=["POST"]),
            Route("/v3/refunds", refunds, methods=["POST"]),
        ])


def on_payments(type_: str) -> Callable[[dict[str, Any]], bool]:
    """Events of the payment queue only (the triggers also feed analytics_queue)."""
    return lambda e: e["type"] == type_ and e["queue"] == "payment_processing_queue"


def payment_body(pid: str, status: str, **extra: Any) -> dict[str, Any]:
    return {"id": pid, "status": status, "paid": status == "succeeded",
            "amount": {"value": "3500.00", "currency": "RUB"}, **extra}


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


def pending_payment(database_url: str, pid: str, status: str = "pending") -> tuple[Any, Any]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        user = f.profile(conn)
        appointment = f.appointment(conn, user, starts_in=timedelta(days=2),
                                    status="pending_payment")
        payment = f.payment(conn, user, appointment, status=status)
        conn.execute("UPDATE public.payments SET provider = 'yookassa', provider_payment_id = %s "
                     "WHERE id = %s", (pid, payment))
        conn.execute("DELETE FROM pgmq.q_email_queue")
    return payment, appointment


async def verify(database_url: str, payment: Any, action: str = "verify") -> None:
    await sql(database_url, "SELECT public.queue_payment_processing(%s, %s)", (payment, action))


async def test_succeeded_payment_marks_the_consultation_paid(database_url: str) -> None:
    fake = FakeYooKassa({"GET pay_1": [(200, payment_body("pay_1", "succeeded"))]})
    payment, appointment = pending_payment(database_url, "pay_1")
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
    templates = [m["template"] for (m,) in await sql(
        database_url, "SELECT message FROM pgmq.q_email_queue UNION ALL "
                      "SELECT message FROM pgmq.a_email_queue")]
    assert templates == ["payment_confirmation"]  # sent by the trigger, not the processor
    [call] = fake.calls
    assert call["auth"] == "Basic " + base64.b64encode(f"{SHOP}:{SECRET}".encode()).decode()


async def test_canceled_payment_fails_with_the_reason(database_url: str) -> None:
    body = payment_body("pay_2", "canceled", cancellation_details={
        "party": "payment_network", "reason": "insufficient_funds"})
    fake = FakeYooKassa({"GET pay_2": [(200, body)]})
    payment, _ = pending_payment(database_url, "pay_2")
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment)
            await wait_for(sub, on_payments("job.succeeded"))
    assert await sql(database_url, "SELECT status, status_reason FROM public.payments") == [
        ("failed", "payment_network: insufficient_funds")]


async def test_pending_is_asked_again_until_it_succeeds(database_url: str) -> None:
    fake = FakeYooKassa({"GET pay_3": [(200, payment_body("pay_3", "pending")),
                                       (200, payment_body("pay_3", "waiting_for_capture")),
                                       (200, payment_body("pay_3", "succeeded"))]})
    payment, _ = pending_payment(database_url, "pay_3")
    async with provider_and_reactor(database_url, fake, MAX_ATTEMPTS=1) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment)
            later = await wait_for(sub, on_payments("job.retrying"), count=2, within_s=15)
            await wait_for(sub, on_payments("job.succeeded"), within_s=15)
    assert "payment pending; asking again in 1s" in later[0]["error"]
    assert "waiting_for_capture" in later[1]["error"]  # more checks than MAX_ATTEMPTS: fine
    assert await sql(database_url, "SELECT status FROM public.payments") == [("completed",)]


async def test_still_pending_after_the_max_age_is_dead_lettered(database_url: str) -> None:
    fake = FakeYooKassa({"GET pay_4": [(200, payment_body("pay_4", "pending"))]})
    payment, _ = pending_payment(database_url, "pay_4")
    await sql(database_url, "UPDATE public.payments SET created_at = now() - interval '2 days'")
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment)
            [event] = await wait_for(sub, on_payments("job.dead_lettered"))
    assert "still pending after" in event["error"]


async def test_server_error_then_success(database_url: str) -> None:
    fake = FakeYooKassa({"GET pay_5": [(500, {"type": "error"}),
                                       (200, payment_body("pay_5", "succeeded"))]})
    payment, _ = pending_payment(database_url, "pay_5")
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment)
            [retry] = await wait_for(sub, on_payments("job.retrying"))
            await wait_for(sub, on_payments("job.succeeded"), within_s=10)
    assert "HTTP 500" in retry["error"]
    assert await sql(database_url, "SELECT status FROM public.payments") == [("completed",)]


async def test_bad_credentials_are_a_named_configuration_error_and_retried(
        database_url: str) -> None:
    fake = FakeYooKassa({"GET pay_6": [(401, {"type": "error", "code": "invalid_credentials"})]})
    payment, _ = pending_payment(database_url, "pay_6")
    async with provider_and_reactor(database_url, fake, MAX_ATTEMPTS=1) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment)
            retries = await wait_for(sub, on_payments("job.retrying"), count=2, within_s=15)
    assert "check YOOKASSA_SHOP_ID and YOOKASSA_SECRET_KEY" in retries[0]["error"]
    assert SECRET not in retries[0]["error"]
    assert await sql(database_url, "SELECT status FROM public.payments") == [("pending",)]


async def test_unknown_to_the_provider_or_to_us_is_dead_lettered(database_url: str) -> None:
    fake = FakeYooKassa()
    payment, _ = pending_payment(database_url, "pay_missing")
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment)
            await verify(database_url, "00000000-0000-0000-0000-000000000042")
            dead = await wait_for(sub, on_payments("job.dead_lettered"), count=2)
    errors = " | ".join(e["error"] for e in dead)
    assert "HTTP 404" in errors
    assert "does not exist in public.payments" in errors


async def test_capture_sends_a_stable_idempotence_key(database_url: str) -> None:
    fake = FakeYooKassa({"CAPTURE pay_7": [(503, {"type": "error"}),
                                           (200, payment_body("pay_7", "succeeded"))]})
    payment, _ = pending_payment(database_url, "pay_7")
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment, "capture")
            await wait_for(sub, on_payments("job.succeeded"), within_s=10)
    first, second = fake.calls
    assert first["idempotence_key"]
    assert first["idempotence_key"] == second["idempotence_key"]
    assert first["json"] == {"amount": {"value": "3500.00", "currency": "RUB"}}
    assert await sql(database_url, "SELECT status FROM public.payments") == [("completed",)]


async def test_refund_of_a_completed_payment(database_url: str) -> None:
    fake = FakeYooKassa({"REFUND pay_8": [(200, {"id": "rf_1", "status": "succeeded",
                                                 "payment_id": "pay_8"})]})
    payment, _ = pending_payment(database_url, "pay_8", status="completed")
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment, "refund")
            await wait_for(sub, on_payments("job.succeeded"))
    [call] = fake.calls
    assert call["json"]["payment_id"] == "pay_8"
    assert call["idempotence_key"]
    assert await sql(database_url, "SELECT status FROM public.payments") == [("refunded",)]


async def test_a_final_status_never_moves_backwards(database_url: str) -> None:
    fake = FakeYooKassa({"GET pay_9": [(200, payment_body("pay_9", "canceled"))]})
    payment, _ = pending_payment(database_url, "pay_9", status="completed")
    async with provider_and_reactor(database_url, fake) as reactor:
        with reactor.bus.subscribe() as sub:
            await verify(database_url, payment)
            await wait_for(sub, on_payments("job.succeeded"))
    assert await sql(database_url, "SELECT status FROM public.payments") == [("completed",)]
    assert fake.calls == []


async def test_webhook_queues_a_verify_and_refuses_bad_bodies(database_url: str) -> None:
    fake = FakeYooKassa({"GET pay_10": [(200, payment_body("pay_10", "pending"))]})
    pending_payment(database_url, "pay_10")
    async with provider_and_reactor(database_url, fake) as reactor, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        hook = "/webhooks/yookassa"
        note = {"type": "notification", "event": "payment.succeeded",
                "object": payment_body("pay_10", "succeeded")}
        bad = [(b"{not json", 400), (b'{"type": "notification", "event": "payment.hacked", '
                                     b'"object": {"id": "pay_10"}}', 422),
               (b'{"type": "notification", "event": "payment.succeeded"}', 422),
               (b"[]", 400), (b"x" * 70_000, 413)]
        for body, code in bad:
            assert (await http.post(hook, content=body)).status_code == code
        assert await sql(database_url, "SELECT count(*) FROM pgmq.q_payment_processing_queue "
                                       "UNION ALL SELECT count(*) FROM "
                                       "pgmq.a_payment_processing_queue") == [(0,), (0,)]
        unknown = {**note, "object": payment_body("pay_unknown", "succeeded")}
        ignored = await http.post(hook, json=unknown)
        assert ignored.json() == {"status": "ignored"}, ignored.text
        with reactor.bus.subscribe() as sub:
            answer = await http.post(hook, json=note)
            assert (answer.status_code, answer.json()) == (200, {"status": "queued"})
            [event] = await wait_for(sub, lambda e: e["type"] == "job.retrying"
                                     and e["queue"] == "payment_processing_queue")
    # The body said "succeeded", but only the API's answer counts, and it says "pending".
    assert "payment pending" in event["error"]
    assert await sql(database_url, "SELECT status FROM public.payments") == [("pending",)]
    assert [c["key"] for c in fake.calls] == ["GET pay_10"]
