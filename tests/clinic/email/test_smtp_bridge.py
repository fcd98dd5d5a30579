"""Attacker's and failing-network review of the aiosmtplib-on-an-asyncio-thread bridge
(reactor/services/asyncio_thread.py, reactor/services/mailer.py).

A scripted relay (a real TCP server in the test's nursery) misbehaves at one step of
the conversation; the tests check what the mailer makes of it. Some reproduce a
defect the review found (each was fixed; they keep it fixed), the others prove what held.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import trio

from reactor.clinic.services.asyncio_thread import open_asyncio_thread
from reactor.clinic.services.mailer import DeliveryUnknown, OutgoingMail, SmtpMailer, open_mailer
from reactor.clinic.settings import load_settings
from reactor.engine.errors import PermanentError, RetryableError
from reactor.testing import settle_background_databases
from tests.conftest import SmtpServer
from tests.harness import eventually, of_type, running_reactor, send, sql, wait_for

CLOSE = b"<close>"  # the relay closes the connection instead of answering
STALL = b"<stall>"  # the relay never answers
DEFAULT = {"greeting": b"220 relay.example ESMTP\r\n",
           "EHLO": b"250-relay.example\r\n250 8BITMIME\r\n",
           "MAIL": b"250 2.1.0 ok\r\n", "RCPT": b"250 2.1.5 ok\r\n",
           "DATA": b"354 go ahead\r\n", "END": b"250 2.0.0 queued\r\n",
           "QUIT": b"221 bye\r\n", "NOOP": b"250 ok\r\n", "RSET": b"250 ok\r\n"}


@dataclass
class Relay:
    """What the scripted relay saw."""

    port: int
    messages: list[bytes] = field(default_factory=list)
    commands: list[bytes] = field(default_factory=list)
    connected: trio.Event = field(default_factory=trio.Event)
    connections: int = 0
    got_message: trio.Event = field(default_factory=trio.Event)
    # In arrival order: "QUIT" when a QUIT came in, "closed" when a stalled client hung up.
    events: list[str] = field(default_factory=list)


@asynccontextmanager
async def scripted_relay(**script: bytes) -> AsyncIterator[Relay]:
    """A relay on 127.0.0.1 that answers each step as `script` says (else normally).
    MAIL_AGAIN, when given, answers every MAIL after the first on a connection."""
    steps = DEFAULT | script
    relay = Relay(0)

    async def serve(stream: trio.SocketStream) -> None:
        buffer = bytearray()
        mails_here = 0
        relay.connected.set()
        relay.connections += 1

        async def read_until(mark: bytes) -> bytes | None:
            while mark not in buffer:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return None
                buffer.extend(chunk)
            end = buffer.index(mark) + len(mark)
            data = bytes(buffer[:end])
            del buffer[:end]
            return data

        async def answer(step: str) -> bool:
            reply = steps[step]
            if reply == CLOSE:
                await stream.aclose()
                return False
            if reply == STALL:  # never answer; note when the client gives up and hangs up
                while await stream.receive_some(65536):
                    pass
                relay.events.append("closed")
                return False
            if reply.endswith(CLOSE):  # answer, then hang up at once
                await stream.send_all(reply.removesuffix(CLOSE))
                await stream.aclose()
                return False
            await stream.send_all(reply)
            return True

        try:
            if not await answer("greeting"):
                return
            while True:
                line = await read_until(b"\r\n")
                if line is None:
                    return
                relay.commands.append(line)
                verb = line[:4].upper().decode("ascii", "replace")
                if verb == "QUIT":
                    relay.events.append("QUIT")
                step = "EHLO" if verb in ("EHLO", "HELO") else verb
                if step == "MAIL":
                    mails_here += 1
                    if mails_here > 1 and "MAIL_AGAIN" in steps:
                        step = "MAIL_AGAIN"
                if step not in steps:
                    await stream.send_all(b"502 5.5.2 unknown\r\n")
                    continue
                if not await answer(step):
                    return
                if step == "DATA" and steps["DATA"].startswith(b"354"):
                    message = await read_until(b"\r\n.\r\n")
                    if message is None:
                        return
                    relay.messages.append(message)
                    relay.got_message.set()
                    if not await answer("END"):
                        return
                if step == "QUIT":
                    await stream.aclose()
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        relay.port = listeners[0].socket.getsockname()[1]
        try:
            yield relay
        finally:
            nursery.cancel_scope.cancel()


def settings(port: int, **env: Any) -> Any:
    values: dict[str, Any] = {
        "DATABASE_URL": "postgresql://x@127.0.0.1/db", "EMAIL_PROVIDER": "smtp",
        "SMTP_HOST": "127.0.0.1", "SMTP_PORT": port, "SMTP_SECURITY": "none",
        "SMTP_FROM": "noreply@family.example", "SMTP_TIMEOUT_S": 2}
    return load_settings(_env_file=None, **(values | env))


def mail(n: int = 1) -> OutgoingMail:
    return OutgoingMail("noreply@family.example", "a@example.com", f"<{n}@family.example>",
                        f"Message-ID: <{n}@family.example>\nSubject: review\n\nbody\n".encode())


async def send_once(port: int, **env: Any) -> BaseException | str:
    """One mail through a fresh SmtpMailer: its Message-ID or the exception."""
    mailer = SmtpMailer(settings(port, **env))
    try:
        with trio.fail_after(30):  # a bound for a hung bridge, not a timing
            return await mailer.send(mail())
    except (RetryableError, PermanentError, DeliveryUnknown) as exc:
        return exc
    finally:
        await mailer.aclose()


# -- replies after the whole message went out -------------------------------------------

@pytest.mark.parametrize("reply", [CLOSE, STALL], ids=["closed", "stalled"])
async def test_no_answer_to_the_message_is_delivery_unknown(reply: bytes) -> None:
    """The relay took the whole message and then did not answer: it may have accepted it."""
    async with scripted_relay(END=reply) as relay:
        outcome = await send_once(relay.port, SMTP_TIMEOUT_S=1)
    assert len(relay.messages) == 1
    assert isinstance(outcome, DeliveryUnknown), outcome


@pytest.mark.parametrize("reply", [
    b"OK queued as 4FZ1\r\n",  # non-SMTP garbage
    b"250 " + b"x" * 9000 + b"\r\n",  # one line past aiosmtplib's 8192
    b"250-" + b"y" * 40_000,  # an endless line (aiosmtplib gives up at 32 KiB)
], ids=["garbage", "enormous-line", "endless-line"])
async def test_an_unreadable_answer_to_the_message_is_delivery_unknown(reply: bytes) -> None:
    async with scripted_relay(END=reply) as relay:
        outcome = await send_once(relay.port)
    assert len(relay.messages) == 1  # the relay has the mail
    assert isinstance(outcome, DeliveryUnknown), repr(outcome)


# -- trouble before the message: retryable, never permanent, never 'unknown' --------------

@pytest.mark.parametrize("step", ["greeting", "EHLO", "MAIL", "RCPT"])
@pytest.mark.parametrize("reply", [CLOSE, STALL, b"garbage\r\n", b"250-" + b"z" * 40_000],
                         ids=["closed", "stalled", "garbage", "endless-line"])
async def test_trouble_before_the_message_is_retryable(step: str, reply: bytes) -> None:
    async with scripted_relay(**{step: reply}) as relay:
        outcome = await send_once(relay.port, SMTP_TIMEOUT_S=1)
    assert relay.messages == []
    assert isinstance(outcome, RetryableError), repr(outcome)


async def test_a_relay_that_closes_right_after_data_is_left_to_a_person() -> None:
    """No 354, so the message never left; but aiosmtplib does not say at which step of
    DATA the connection went, so this is reported like a lost answer to the message:
    DeliveryUnknown, for a person to resolve (safe, if over-cautious: never resent)."""
    async with scripted_relay(DATA=CLOSE) as relay:
        outcome = await send_once(relay.port)
    assert relay.messages == []
    assert isinstance(outcome, DeliveryUnknown), repr(outcome)


async def test_a_quit_that_is_never_answered_ends_within_the_bound() -> None:
    """Closing the pool QUITs its idle connections; a relay that never answers QUIT
    must not hold the shutdown (the mail itself is accepted and reported sent)."""
    async with scripted_relay(QUIT=STALL) as relay:
        outcome = await send_once(relay.port, SMTP_TIMEOUT_S=1)
    assert outcome == "<1@family.example>"
    assert any(c.startswith(b"QUIT") for c in relay.commands)


# -- the asyncio thread ------------------------------------------------------------------

async def _pending_call_at_close() -> list[str]:
    """A call still running on the loop when the thread closes; then its caller is
    cancelled. What the caller saw, in order."""
    started = threading.Event()
    seen: list[str] = []
    told = trio.Event()
    cancelling = False

    async def forever() -> None:
        started.set()
        await asyncio.sleep(3600)

    async def caller(loop: Any) -> None:
        try:
            await loop.call(forever)
        except RuntimeError:
            seen.append("RuntimeError after cancel" if cancelling else "RuntimeError")
            told.set()
        except trio.Cancelled:
            seen.append("Cancelled")
            raise

    async with trio.open_nursery() as nursery:
        async with open_asyncio_thread() as loop:
            nursery.start_soon(caller, loop)
            await trio.to_thread.run_sync(started.wait, 10)
            assert started.is_set()
        with trio.move_on_after(5):  # a bound for a hung caller, not a timing
            await told.wait()
        cancelling = True
        nursery.cancel_scope.cancel()
    gc.collect()
    return seen


async def test_a_call_pending_when_the_loop_closes_fails_instead_of_hanging() -> None:
    seen = await _pending_call_at_close()
    assert seen[:1] == ["RuntimeError"], seen


async def test_a_cancelled_caller_sees_its_cancellation_even_if_the_loop_closed() -> None:
    seen = await _pending_call_at_close()
    assert "RuntimeError after cancel" not in seen, seen


def _resources() -> tuple[int, int]:
    """Open descriptors, and the mailer's asyncio threads (only ours: trio's thread cache
    starts and retires worker threads of its own at any time)."""
    ours = [t for t in threading.enumerate() if t.name.startswith("reactor-smtp")]
    settle_background_databases()  # (the clone/drop thread's connection is no leak)
    return len(os.listdir("/proc/self/fd")), len(ours)


async def test_many_mailer_lifetimes_leak_no_thread_or_descriptor(
        smtp_server: Callable[..., SmtpServer]) -> None:
    """Each open_mailer starts an asyncio thread with its selector and self-pipe, and a
    connection; all of them must be gone when it closes."""
    server = smtp_server()

    async def cycle(n: int) -> None:
        async with open_mailer(settings(server.port)) as mailer:
            await mailer.send(mail(n))

    await cycle(0)  # first use loads modules, the CA store, ...
    gc.collect()
    before = _resources()
    for n in range(1, 21):
        with trio.fail_after(30):
            await cycle(n)
    gc.collect()
    assert _resources() == before
    assert len(server.mails()) == 21


async def test_a_caller_cancelled_at_any_point_leaves_no_connection_behind(
        smtp_server: Callable[..., SmtpServer]) -> None:
    """Cancel the send after 0, 1, 2, ... scheduler steps: every cut conversation's socket
    is closed, the pool slot comes back, and the next mail goes out on the same pool."""
    server = smtp_server(delay_ms=50)
    gc.collect()
    before = _resources()
    mailer = SmtpMailer(settings(server.port, SMTP_POOL_SIZE=1))
    try:
        for steps in range(0, 60, 3):
            with trio.CancelScope() as scope:
                async def cut(scope: trio.CancelScope = scope, steps: int = steps) -> None:
                    for _ in range(steps):
                        await trio.lowlevel.checkpoint()
                    scope.cancel()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cut)
                    await mailer.send(mail(steps))
            with trio.fail_after(30):
                assert await mailer.send(mail(1000 + steps)) == f"<{1000 + steps}@family.example>"
    finally:
        await mailer.aclose()
    gc.collect()
    assert _resources() == before


# -- through the reactor: the ledger ------------------------------------------------------

MAIL_JOB = {"to": "a@example.com", "template": "checkup_completed", "locale": "en",
            "variables": {"full_name": "A", "assessment_id": "1"}}


def relay_env(port: int, **env: Any) -> dict[str, Any]:
    return {"EMAIL_PROVIDER": "smtp", "SMTP_HOST": "127.0.0.1", "SMTP_PORT": port,
            "SMTP_SECURITY": "none", "SMTP_FROM": "noreply@family.example",
            "SMTP_TIMEOUT_S": 2} | env


async def test_an_unreadable_answer_to_the_message_is_never_resent(database_url: str) -> None:
    async with scripted_relay(END=b"OK queued as 4FZ1\r\n") as relay, \
            running_reactor(database_url, **relay_env(relay.port)) as reactor:
        with reactor.bus.subscribe() as sub:
            await send(database_url, "email_queue", MAIL_JOB | {"idempotency_key": "k1"})
            [event] = await wait_for(sub, lambda e: e["type"] in (
                "job.succeeded", "job.dead_lettered"), within_s=60)
    assert len(relay.messages) == 1, f"the relay got the mail {len(relay.messages)} times"
    assert event["type"] == "job.dead_lettered", event
    assert await sql(database_url, "SELECT status FROM public.email_ledger") == [("sending",)]


async def test_stop_mid_conversation_sends_each_mail_once_and_keeps_the_ledger_true(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    """reactor.stop() while mails are mid-DATA on a slow relay: the conversations finish
    (shielded), every mail the relay has is 'sent' in the ledger, none arrives twice, and
    nothing is left 'sending'; a second reactor then sends the rest exactly once."""
    server = smtp_server(delay_ms=400)
    count = 12
    env = relay_env(server.port, SMTP_POOL_SIZE=4, SMTP_TIMEOUT_S=5)
    gc.collect()
    async with running_reactor(database_url, **env) as reactor:
        with reactor.bus.subscribe() as sub:
            for n in range(count):
                await send(database_url, "email_queue", MAIL_JOB | {"idempotency_key": f"s{n}"})
            await wait_for(sub, of_type("job.succeeded"), within_s=60)
    rows = await sql(database_url, "SELECT status, count(*) FROM public.email_ledger "
                                   "GROUP BY status ORDER BY status")
    statuses = dict(rows)
    assert "sending" not in statuses, rows
    assert statuses.get("sent") == len(server.mails()), rows
    async with running_reactor(database_url, **env):
        await eventually(lambda: len(server.mails()) >= count, within_s=60)
    ids = [m["Message-ID"] for m in server.mails()]
    assert len(ids) == count == len(set(ids))
    keys = await sql(database_url, "SELECT status, count(*) FROM public.email_ledger "
                                   "GROUP BY status")
    assert keys == [("sent", count)], keys
    assert await sql(database_url, "SELECT count(*) FROM pgmq.q_email_queue_dlq") == [(0,)]


async def test_reactor_start_stop_cycles_leak_no_smtp_thread_or_descriptor(
        database_url: str, smtp_server: Callable[..., SmtpServer]) -> None:
    server = smtp_server()
    env = relay_env(server.port)

    async def cycle(n: int) -> None:
        async with running_reactor(database_url, **env) as reactor:
            with reactor.bus.subscribe() as sub:
                await send(database_url, "email_queue", MAIL_JOB | {"idempotency_key": f"c{n}"})
                await wait_for(sub, of_type("job.succeeded"), within_s=30)

    await cycle(0)
    gc.collect()
    before = _resources()
    for n in range(1, 6):
        await cycle(n)
    gc.collect()
    assert _resources() == before
    assert not [t.name for t in threading.enumerate() if t.name == "reactor-smtp"]


# -- TLS that must never carry a mail in the clear ------------------------------------------

async def test_a_relay_that_hides_starttls_gets_no_mail() -> None:
    """SMTP_SECURITY=starttls and the relay (or a man in the middle) leaves STARTTLS out of
    its EHLO reply: the mail is not sent in the clear."""
    async with scripted_relay() as relay:
        outcome = await send_once(relay.port, SMTP_SECURITY="starttls")
    assert relay.messages == []
    assert not any(c.startswith(b"MAIL") for c in relay.commands)
    assert isinstance(outcome, RetryableError), repr(outcome)
    assert "STARTTLS" in str(outcome)


async def test_a_relay_that_says_220_to_starttls_but_speaks_plain_gets_no_mail() -> None:
    async with scripted_relay(EHLO=b"250-relay.example\r\n250 STARTTLS\r\n",
                              STARTTLS=b"220 go ahead\r\n") as relay:
        outcome = await send_once(relay.port, SMTP_SECURITY="starttls", SMTP_TIMEOUT_S=1)
    assert relay.messages == []
    assert not any(c.startswith(b"MAIL") for c in relay.commands)
    assert isinstance(outcome, RetryableError), repr(outcome)


@pytest.mark.parametrize("security", ["starttls", "ssl"])
async def test_an_untrusted_certificate_never_carries_a_mail(
        smtp_server: Callable[..., SmtpServer], security: str) -> None:
    server = smtp_server(tls=security)  # its CA is not given: the certificate does not verify
    outcome = await send_once(server.port, SMTP_SECURITY=security)
    assert isinstance(outcome, RetryableError), repr(outcome)
    assert "TLS failed" in str(outcome)
    assert server.mails() == []


# -- many at once ----------------------------------------------------------------------------

@pytest.mark.parametrize("pool", [1, 20])
async def test_many_concurrent_sends_each_arrive_once_within_the_pool(
        smtp_server: Callable[..., SmtpServer], pool: int) -> None:
    server = smtp_server()
    count = 60
    results: list[str] = []
    async with open_mailer(settings(server.port, SMTP_POOL_SIZE=pool)) as mailer:
        async def one(n: int) -> None:
            results.append(await mailer.send(mail(n)))
        with trio.fail_after(60):  # a bound for a stuck pool, not a timing
            async with trio.open_nursery() as nursery:
                for n in range(count):
                    nursery.start_soon(one, n)
    assert sorted(results) == sorted(f"<{n}@family.example>" for n in range(count))
    ids = [m["Message-ID"] for m in server.mails()]
    assert sorted(ids) == sorted(results)
    connections = sum(1 for line in server.sessions() if line.startswith("ehlo"))
    assert 1 <= connections <= pool


# -- an exception that ends the asyncio thread ----------------------------------------------

@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_an_exception_that_kills_the_loop_fails_the_callers() -> None:
    async def interrupt() -> None:
        raise KeyboardInterrupt

    async def fine() -> int:
        return 1

    seen: list[str] = []
    async with open_asyncio_thread() as loop:
        for fn in (interrupt, fine):
            with trio.move_on_after(5) as bound:  # a bound for a hung caller, not a timing
                try:
                    await loop.call(fn)
                    seen.append("returned")
                except KeyboardInterrupt:
                    seen.append("KeyboardInterrupt")
            if bound.cancelled_caught:
                seen.append("hung")
    assert seen == ["KeyboardInterrupt", "returned"], seen


# -- shutdown mid-conversation ---------------------------------------------------------------

async def test_stop_while_the_greeting_stalls_ends_within_the_grace_and_sends_nothing(
        database_url: str) -> None:
    """The relay accepts the connection and never greets (SMTP_TIMEOUT_S is long): waiting
    for a connection is cancellable, so the stop ends within the grace plus the bridge's
    bounded cancel wait; nothing was claimed, the mail stays queued for the next run."""
    env = relay_env(0, SMTP_TIMEOUT_S=60, SHUTDOWN_GRACE_S=1)
    async with scripted_relay(greeting=STALL) as relay:
        with trio.fail_after(1 + 5 + 10):  # grace + CANCEL_WAIT_S + slack: no SMTP timeout
            async with running_reactor(database_url, **env | {"SMTP_PORT": relay.port}):
                await send(database_url, "email_queue", MAIL_JOB | {"idempotency_key": "g1"})
                with trio.fail_after(30):
                    await relay.connected.wait()
    assert relay.messages == []
    assert await sql(database_url, "SELECT count(*) FROM public.email_ledger") == [(0,)]
    assert await sql(database_url, "SELECT count(*) FROM pgmq.q_email_queue") == [(1,)]
    assert await sql(database_url, "SELECT count(*) FROM pgmq.q_email_queue_dlq") == [(0,)]


async def test_stop_while_the_relay_sits_on_the_message_dead_letters_it_once(
        database_url: str) -> None:
    """Stop while the relay holds the whole message and never answers: the conversation is
    shielded, ends at SMTP_TIMEOUT_S as 'unknown', the mail is dead-lettered with the ledger
    at 'sending', and it went to the relay once."""
    env = relay_env(0, SMTP_TIMEOUT_S=2, SHUTDOWN_GRACE_S=1)
    async with scripted_relay(END=STALL) as relay:
        with trio.fail_after(1 + 10 + 4 * 2 + 10):  # grace + one conversation + slack
            async with running_reactor(database_url, **env | {"SMTP_PORT": relay.port}):
                await send(database_url, "email_queue", MAIL_JOB | {"idempotency_key": "d1"})
                with trio.fail_after(30):
                    await relay.got_message.wait()
    assert len(relay.messages) == 1
    assert await sql(database_url, "SELECT status FROM public.email_ledger") == [("sending",)]
    assert await sql(database_url, "SELECT count(*) FROM pgmq.q_email_queue_dlq") == [(1,)]
    assert await sql(database_url, "SELECT count(*) FROM pgmq.q_email_queue") == [(0,)]


async def test_a_relay_that_accepts_and_hangs_up_at_once_counts_as_sent() -> None:
    """250 for the message and the connection closed in the same breath (a relay's
    per-connection mail limit): the mail is sent, and the next one reconnects."""
    async with scripted_relay(END=b"250 2.0.0 queued\r\n" + CLOSE) as relay:
        mailer = SmtpMailer(settings(relay.port, SMTP_POOL_SIZE=1))
        try:
            with trio.fail_after(30):  # a bound for a hung bridge, not a timing
                assert await mailer.send(mail(1)) == "<1@family.example>"
                assert await mailer.send(mail(2)) == "<2@family.example>"
        finally:
            await mailer.aclose()
    assert len(relay.messages) == 2


@pytest.mark.parametrize("again", [CLOSE, b"421 4.7.0 one mail per connection\r\n" + CLOSE],
                         ids=["hang-up", "421"])
async def test_a_relay_that_drops_a_used_connection_at_the_next_mail_gets_it_on_a_new_one(
        again: bytes) -> None:
    """A per-connection limit the pool could not see coming: the relay hangs up (or says
    421 and hangs up) at the next MAIL on a connection that carried a mail. Nothing of
    that mail went out, so it goes on a new connection at once, not as a failed send."""
    async with scripted_relay(MAIL_AGAIN=again) as relay:
        mailer = SmtpMailer(settings(relay.port, SMTP_POOL_SIZE=1))
        try:
            with trio.fail_after(30):  # a bound for a hung bridge, not a timing
                for n in (1, 2, 3):
                    assert await mailer.send(mail(n)) == f"<{n}@family.example>"
        finally:
            await mailer.aclose()
    assert len(relay.messages) == 3
    assert relay.connections == 3


async def test_a_new_connection_dropped_at_its_first_mail_is_an_outage_not_a_loop() -> None:
    """Only a connection that has carried mail is replaced on the spot: a relay that hangs
    up at the first MAIL of a new connection is an outage (retried later), one connection."""
    async with scripted_relay(MAIL=CLOSE) as relay:
        outcome = await send_once(relay.port)
    assert isinstance(outcome, RetryableError), repr(outcome)
    assert outcome.outage, repr(outcome)
    assert (relay.connections, relay.messages) == (1, [])


async def test_a_tls_handshake_that_never_comes_is_retryable() -> None:
    """SMTP_SECURITY=ssl and the peer never answers the ClientHello: bounded by
    SMTP_TIMEOUT_S, retryable, nothing sent."""
    async with scripted_relay(greeting=STALL) as relay:
        outcome = await send_once(relay.port, SMTP_SECURITY="ssl", SMTP_TIMEOUT_S=1)
    assert isinstance(outcome, RetryableError), repr(outcome)
    assert relay.commands == []


async def test_closing_a_pool_whose_relay_ignores_quit_takes_one_bound_not_one_per_connection(
        ) -> None:
    pool, timeout_s = 6, 2
    async with scripted_relay(QUIT=STALL) as relay:
        async with open_mailer(settings(relay.port, SMTP_POOL_SIZE=pool,
                                        SMTP_TIMEOUT_S=timeout_s)) as mailer:
            with trio.fail_after(30):  # a bound for a stuck pool, not a timing
                async with trio.open_nursery() as nursery:
                    for n in range(pool):
                        nursery.start_soon(mailer.send, mail(n))
            assert relay.connections == pool
        # Side by side: every QUIT was out before the first connection was given up on.
        # (One after another, each would wait out its bound and close before the next.)
        await eventually(lambda: relay.events.count("closed") == pool, within_s=30)
    assert relay.events == ["QUIT"] * pool + ["closed"] * pool


@pytest.mark.parametrize("step", ["MAIL", "RCPT"])
async def test_an_unreadable_reply_before_the_message_is_an_outage(step: str) -> None:
    async with scripted_relay(**{step: b"garbage\r\n"}) as relay:
        outcome = await send_once(relay.port)
    assert relay.messages == []
    assert isinstance(outcome, RetryableError), repr(outcome)
    assert outcome.outage, repr(outcome)
