"""The webhooks app's delivery rules, each against a real HTTP server on loopback
(Starlette served by Hypercorn, as the reactor serves its own port), with the app
running through reactor.testing, the plugin the engine's wheel ships."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import trio
from psycopg.types.json import Jsonb
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from reactor.engine import Reactor
from reactor.engine.web import serve_http
from reactor.testing import eventually, of_type, sql, wait_for_event
from webhooks.sender import _is_public, retry_after_s

SECRET = "whsec_" + base64.b64encode(b"a test secret of 32 bytes long!!").decode()


@pytest.fixture(scope="session")
def reactor_app_path() -> str:
    return "webhooks.app:build"


@pytest.fixture
def allow_private() -> bool:
    """The receivers listen on loopback: allowed, except where a test parametrizes it."""
    return True


@pytest.fixture
def webhook_timeout_s() -> str:
    """WEBHOOK_TIMEOUT_S in these tests (a test that needs another parametrizes it)."""
    return "2"


@pytest.fixture
def reactor_env(reactor_env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                allow_private: bool, webhook_timeout_s: str) -> dict[str, str]:
    extra = {"WEBHOOK_ALLOW_PRIVATE": str(allow_private).lower(),
             "RETRY_BASE_S": "0.1", "RETRY_MAX_S": "1", "MAX_ATTEMPTS": "5",
             "WEBHOOK_PER_ENDPOINT": "4", "WEBHOOK_TIMEOUT_S": webhook_timeout_s}
    for key, value in extra.items():
        monkeypatch.setenv(key, value)
    return {**reactor_env, **extra}


@dataclass
class Receiver:
    """A subscriber's endpoint: records every request, answers as `answer` says."""

    answer: Callable[[Request, int], Awaitable[Response]]
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    port: int = 0

    async def endpoint(self, request: Request) -> Response:
        body = await request.body()
        self.received.append(({k.lower(): v for k, v in request.headers.items()}, body))
        return await self.answer(request, len(self.received))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


async def start(nursery: trio.Nursery, answer: Callable[[Request, int], Awaitable[Response]]
                ) -> Receiver:
    receiver = Receiver(answer)
    app = Starlette(routes=[Route("/hook", receiver.endpoint, methods=["POST"])])
    receiver.port = await nursery.start(serve_http, app, "127.0.0.1", 0)
    return receiver


def answering(*codes: int, headers: dict[str, str] | None = None, body: bytes = b""
              ) -> Callable[[Request, int], Awaitable[Response]]:
    """Answer the n-th request with codes[n-1] (the last code from then on)."""
    async def answer(_: Request, n: int) -> Response:
        return Response(body, status_code=codes[min(n, len(codes)) - 1], headers=headers)
    return answer


def subscribe(url: str, database: str, types: list[str] | None = None) -> int:
    with psycopg.connect(database, autocommit=True) as db:
        [(sid,)] = db.execute(
            "INSERT INTO webhooks.subscriptions (url, secret, event_types) VALUES (%s, %s, %s)"
            " RETURNING id", (url, SECRET, types)).fetchall()
    return int(sid)


async def publish(database: str, type_: str, data: Any) -> None:
    await sql(database, "SELECT webhooks.publish(%s, %s)", (type_, Jsonb(data)))


async def test_a_row_change_is_delivered_signed_and_the_receiver_verifies_it(
        running_reactor: Reactor, reactor_database: str, nursery: trio.Nursery) -> None:
    receiver = await start(nursery, answering(204))
    subscribe(receiver.url, reactor_database, ["orders.insert"])
    await sql(reactor_database, "CREATE TABLE public.orders (id int PRIMARY KEY, item text)")
    await sql(reactor_database, "CREATE TRIGGER orders_webhooks AFTER INSERT OR UPDATE ON "
                                "public.orders FOR EACH ROW "
                                "EXECUTE FUNCTION webhooks.row_changed()")
    with running_reactor.bus.subscribe() as sub:
        await sql(reactor_database, "INSERT INTO public.orders VALUES (1, 'книга')")
        await sql(reactor_database, "UPDATE public.orders SET item = 'pen'")  # not subscribed
        await wait_for_event(sub, of_type("job.succeeded"))
    [(headers, body)] = receiver.received
    payload = Webhook(SECRET).verify(body, headers)  # signature, timestamp tolerance
    assert payload["type"] == "orders.insert"
    assert payload["data"] == {"id": 1, "item": "книга"}
    assert headers["webhook-id"].startswith("msg_")
    assert headers["content-type"] == "application/json"
    assert headers["host"] == f"127.0.0.1:{receiver.port}"


async def test_a_failing_subscriber_gets_retries_with_the_same_webhook_id_until_it_takes_it(
        running_reactor: Reactor, reactor_database: str, nursery: trio.Nursery) -> None:
    receiver = await start(nursery, answering(503, 500, 204))
    subscribe(receiver.url, reactor_database)
    with running_reactor.bus.subscribe() as sub:
        await publish(reactor_database, "invoice.paid", {"invoice": 7})
        retried = await wait_for_event(sub, of_type("job.retrying"), count=2)
        await wait_for_event(sub, of_type("job.succeeded"))
    assert [e["error"] for e in retried] == ["RetryableError: 127.0.0.1 answered HTTP 503",
                                            "RetryableError: 127.0.0.1 answered HTTP 500"]
    ids = {headers["webhook-id"] for headers, _ in receiver.received}
    assert len(receiver.received) == 3
    assert len(ids) == 1  # the receiver de-duplicates on it
    for headers, body in receiver.received:
        Webhook(SECRET).verify(body, headers)  # each attempt signed afresh


async def test_a_429_with_retry_after_is_retried_when_the_subscriber_asks(
        running_reactor: Reactor, reactor_database: str, nursery: trio.Nursery) -> None:
    """Retry-After: 3600 → the message becomes visible again in an hour, not after the
    default backoff (0.1 s here); read from the queue's row, not from a clock."""
    receiver = await start(nursery, answering(429, headers={"Retry-After": "3600"}))
    subscribe(receiver.url, reactor_database)
    with running_reactor.bus.subscribe() as sub:
        await publish(reactor_database, "invoice.paid", {"invoice": 8})
        [event] = await wait_for_event(sub, of_type("job.retrying"))
    assert event["error"] == "RetryableError: 127.0.0.1 answered HTTP 429 (Retry-After 3600s)"
    [(wait_s,)] = await eventually(lambda: sql(
        reactor_database, "SELECT extract(epoch FROM vt - now()) FROM pgmq.q_webhook_queue "
                          "WHERE vt > now() + interval '10 minutes'"))
    assert 3500 < float(wait_s) <= 3600
    assert len(receiver.received) == 1


@pytest.mark.parametrize(("code", "gone"), [(400, False), (404, False), (410, True)])
async def test_a_4xx_is_dead_lettered_with_its_status_and_the_start_of_the_body(
        running_reactor: Reactor, reactor_database: str, nursery: trio.Nursery,
        code: int, gone: bool) -> None:
    receiver = await start(nursery, answering(code, body=b"no such tenant " + b"x" * 500))
    sid = subscribe(receiver.url, reactor_database)
    with running_reactor.bus.subscribe() as sub:
        await publish(reactor_database, "invoice.paid", {"invoice": 9})
        [event] = await wait_for_event(sub, of_type("job.dead_lettered"))
    assert event["attempt"] == 1
    assert f"HTTP {code} 'no such tenant xxx" in event["error"]
    assert len(event["error"]) < 400  # the start of the body, not all of it
    [(active,)] = await sql(reactor_database,
                            "SELECT active FROM webhooks.subscriptions WHERE id = %s", (sid,))
    assert active is not gone  # 410 Gone: the subscriber asked for no more


@pytest.mark.parametrize("allow_private", [False])
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "169.254.169.254",
                                  "10.0.0.1", "0.0.0.0"])
async def test_a_subscriber_on_a_private_address_is_refused(
        running_reactor: Reactor, reactor_database: str, nursery: trio.Nursery,
        host: str) -> None:
    receiver = await start(nursery, answering(204))
    subscribe(f"http://{host}:{receiver.port}/hook", reactor_database)
    with running_reactor.bus.subscribe() as sub:
        await publish(reactor_database, "invoice.paid", {"invoice": 10})
        [event] = await wait_for_event(sub, of_type("job.dead_lettered"))
    assert "resolves to a non-public address" in event["error"]
    assert "WEBHOOK_ALLOW_PRIVATE" in event["error"]
    assert receiver.received == []


# The slow endpoint holds its deliveries until released: they must not time out first,
# however long a loaded machine takes over the other endpoint's 20.
@pytest.mark.parametrize("webhook_timeout_s", ["60"])
async def test_a_slow_subscriber_takes_its_bound_and_never_starves_the_others(
        running_reactor: Reactor, reactor_database: str, nursery: trio.Nursery) -> None:
    """WEBHOOK_PER_ENDPOINT (4 here): with the slow endpoint holding all its deliveries,
    another endpoint's 20 go through; then the slow one's are delivered too."""
    release = trio.Event()
    in_flight = [0, 0]  # now, most

    async def slow_answer(_: Request, n: int) -> Response:
        in_flight[0] += 1
        in_flight[1] = max(in_flight[1], in_flight[0])
        try:
            await release.wait()
        finally:
            in_flight[0] -= 1
        return Response(status_code=204)

    slow = await start(nursery, slow_answer)
    fast = await start(nursery, answering(204))
    subscribe(slow.url, reactor_database, ["slow"])
    subscribe(fast.url, reactor_database, ["fast"])
    for i in range(8):
        await publish(reactor_database, "slow", {"i": i})
    for i in range(20):
        await publish(reactor_database, "fast", {"i": i})
    # The slow endpoint holds its bound (4) while all 20 of the other one's go through.
    await eventually(lambda: len(fast.received) == 20 and in_flight[0] == 4)
    release.set()
    await eventually(lambda: len({h["webhook-id"] for h, _ in slow.received}) == 8)
    assert in_flight[1] == 4


@pytest.mark.parametrize(("header", "seconds"), [
    ("120", 120), ("0", 0), (" 7 ", 7), ("soon", None), ("", None), (None, None),
    ("Fri, 04 Dec 2026 12:01:00 GMT", 60), ("Fri, 04 Dec 2026 11:00:00 GMT", 0),
    ("²", None), ("9" * 5000, None), ("-5", None),
])
def test_retry_after_reads_seconds_and_http_dates(header: str | None,
                                                  seconds: int | None) -> None:
    now = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)
    assert retry_after_s(header, now) == seconds


@pytest.mark.parametrize(("address", "public"), [
    ("93.184.215.14", True), ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", True),
    ("127.0.0.1", False), ("::1", False), ("10.0.0.1", False), ("169.254.169.254", False),
    ("::ffff:127.0.0.1", False), ("fe80::1%eth0", False),
    # IPv6 that carries an IPv4 address elsewhere (NAT64, 6to4, IPv4-compatible)
    ("64:ff9b::a00:1", False), ("64:ff9b::5db8:d70e", False), ("2002:7f00:1::1", False),
    ("::127.0.0.1", False), ("::ffff:0:7f00:1", False),
])
def test_only_public_addresses_pass_the_ssrf_check(address: str, public: bool) -> None:
    assert _is_public(address) is public


async def test_a_subscriber_that_trickles_its_answer_is_cut_at_the_timeout(
        running_reactor: Reactor, reactor_database: str, nursery: trio.Nursery,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """WEBHOOK_TIMEOUT_S bounds the whole request, not each read: a 500 whose body comes
    a byte at a time is cut (the 2xx case reads no body at all)."""
    async def trickle(_: Request, n: int) -> Response:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(100):
                yield b"x"
                await trio.sleep(0.5)
        return StreamingResponse(body(), status_code=500)

    receiver = await start(nursery, trickle)
    subscribe(receiver.url, reactor_database)
    with running_reactor.bus.subscribe() as sub:
        await publish(reactor_database, "invoice.paid", {"invoice": 11})
        [event] = await wait_for_event(sub, of_type("job.retrying"), within_s=30)
    assert event["error"] == "RetryableError: 127.0.0.1 did not answer within 2s"
