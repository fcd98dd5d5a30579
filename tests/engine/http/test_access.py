"""Who may read the feed, the dashboard and /metrics: Origin, Host (DNS rebinding), a
token behind a proxy, the token never in a URL, the sign-in cookie, the access
settings, and a public address refused without a token."""

from __future__ import annotations

import gc
import os
import time

import httpx
import pytest
import trio
from trio_websocket import HandshakeError, open_websocket_url

from reactor.clinic.app import build
from reactor.clinic.settings import ConfigError
from reactor.engine.feed import Access
from reactor.engine.runtime import Reactor
from tests.engine.http.feed_client import handshake, next_events, raw_request, url
from tests.harness import (
    eventually,
    running_reactor,
    settings_for,
)


async def test_the_feed_refuses_a_page_of_another_origin(database_url: str) -> None:
    async with running_reactor(database_url) as reactor, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        port = reactor.feed_port
        # Cross-site websocket hijacking: a stranger's page, opened on this machine.
        assert " 403 " in await handshake(port, extra="Origin: http://evil.example\r\n")
        # A page of this machine but another origin (another local web app) neither.
        assert " 403 " in await handshake(port, extra="Origin: http://127.0.0.1:1\r\n")
        # The dashboard's own page gets a one-use ticket bound to its origin.
        own = f"http://127.0.0.1:{reactor.http_port}"
        assert (await http.post("/api/ticket", headers={"Origin": "http://evil.example"})
                ).status_code == 403
        grant = (await http.post("/api/ticket", headers={"Origin": own})).json()
        assert grant["feed_port"] == port
        ticket = f"/events?ticket={grant['ticket']}"
        # A ticket is for its origin only...
        assert " 403 " in await handshake(port, path=ticket,
                                          extra="Origin: http://evil.example\r\n")
        assert " 101 " in await handshake(port, path=ticket, extra=f"Origin: {own}\r\n")
        # ...and opens one connection.
        assert " 403 " in await handshake(port, path=ticket, extra=f"Origin: {own}\r\n")
        # Tools send no Origin and keep working (no token set: loopback only).
        assert " 101 " in await handshake(port)


async def test_a_rebinding_host_is_refused(database_url: str) -> None:
    async with running_reactor(database_url) as reactor:
        for path in ("/api/overview", "/", "/metrics", "/api/config"):
            request = (f"GET {path} HTTP/1.1\r\nHost: rebind.attacker.example:"
                       f"{reactor.http_port}\r\nConnection: close\r\n")
            response = await trio.to_thread.run_sync(raw_request, reactor.http_port, request)
            assert response.startswith(b"HTTP/1.1 421"), (path, response)
        assert "FEED_ALLOWED_HOSTS" in response.decode()
        assert " 421 " in await handshake(reactor.feed_port,
                                          host=f"rebind.attacker.example:{reactor.feed_port}")
        # The names of this machine are fine, /healthz answers any name (containers probe it).
        async with httpx.AsyncClient(base_url=f"http://localhost:{reactor.http_port}") as http:
            assert (await http.get("/api/overview")).status_code == 200
            assert (await http.get("/healthz", headers={"Host": "pod-10-0-0-7"})
                    ).status_code == 200
        assert " 101 " in await handshake(reactor.feed_port, host=f"localhost:{reactor.feed_port}")


async def test_behind_a_proxy_a_token_is_required(database_url: str) -> None:
    forwarded = {"X-Forwarded-For": "203.0.113.9"}
    async with running_reactor(database_url) as reactor, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        # No FEED_TOKEN: every request of a proxy comes from 127.0.0.1, but says so.
        refused = await http.get("/api/overview", headers=forwarded)
        assert refused.status_code == 403
        assert "set FEED_TOKEN" in refused.json()["error"]
        assert (await http.get("/", headers={"Forwarded": "for=203.0.113.9"})).status_code == 403
        assert " 403 " in await handshake(reactor.feed_port,
                                          extra="X-Forwarded-For: 203.0.113.9\r\n")
        assert (await http.get("/api/overview")).status_code == 200  # direct: fine
    async with running_reactor(database_url, FEED_TOKEN="t0ken-123") as reactor, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        assert (await http.get("/api/overview", headers=forwarded)).status_code == 401
        bearer = {**forwarded, "Authorization": "Bearer t0ken-123"}
        assert (await http.get("/api/overview", headers=bearer)).status_code == 200
        assert (await http.get("/metrics", headers=forwarded)).status_code == 401
        assert (await http.get("/metrics", headers=bearer)).status_code == 200
        assert (await http.get("/metrics")).status_code == 200  # a direct scrape
        assert " 101 " in await handshake(
            reactor.feed_port, extra="X-Forwarded-For: 203.0.113.9\r\n"
                                     "Authorization: Bearer t0ken-123\r\n")


# trio-websocket's client leaves its socket to the GC when the server rejects the handshake.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_token_is_required_when_set_and_never_in_a_url(database_url: str) -> None:
    async with running_reactor(database_url, FEED_TOKEN="t0ken-123") as reactor:
        for query in ("", "?token=wrong", "?token=t0ken-123"):
            with pytest.raises(HandshakeError):
                async with open_websocket_url(url(reactor, query)):
                    pass
        gc.collect()  # those sockets are in cycles: collected here, under this test's filter
        assert " 400 " in await handshake(reactor.feed_port, path="/events?token=t0ken-123",
                                          extra="Authorization: Bearer t0ken-123\r\n")
        headers = [(b"Authorization", b"Bearer t0ken-123")]
        # Jobs only, once the feed has subscribed: the reactor's own depth ticks come from
        # another task and may reach the client first (or be all it gets, had this event
        # been published before the subscription).
        async with open_websocket_url(url(reactor, "?type=job."),
                                      extra_headers=headers) as ws:
            await eventually(lambda: reactor.bus.subscriber_count >= 1)
            reactor.bus.publish("job.succeeded", "email_queue", 7, 1, 1.0)
            [event] = await next_events(ws, 1)
            assert event["queue"] == "email_queue"
        own = f"http://127.0.0.1:{reactor.http_port}"
        async with httpx.AsyncClient(base_url=own) as http:
            assert (await http.get("/api/overview")).status_code == 401
            assert (await http.get("/api/overview?token=t0ken-123")).status_code == 401
            assert (await http.post("/api/ticket", headers={"Origin": own})).status_code == 401
            assert (await http.get("/api/config")).json()["signed_in"] is False
            # The dashboard signs in once: an HttpOnly, SameSite=Strict cookie, no token in URLs.
            wrong = await http.post("/api/session", json={"token": "nope"},
                                    headers={"Origin": own})
            assert wrong.status_code == 401
            assert (await http.post("/api/session", json={"token": "t0ken-123"},
                                    headers={"Origin": "http://evil.example"})).status_code == 403
            ok = await http.post("/api/session", json={"token": "t0ken-123"},
                                 headers={"Origin": own})
            assert ok.status_code == 200
            cookie = ok.headers["set-cookie"]
            assert "HttpOnly" in cookie
            assert "SameSite=strict" in cookie
            assert "t0ken-123" not in cookie
            assert (await http.get("/api/config")).json()["signed_in"] is True
            assert (await http.get("/api/overview")).status_code == 200
            grant = (await http.post("/api/ticket", headers={"Origin": own})).json()
        assert " 101 " in await handshake(reactor.feed_port,
                                          path=f"/events?ticket={grant['ticket']}",
                                          extra=f"Origin: {own}\r\n")


def test_access_settings_reach_the_rules(database_url: str) -> None:
    with pytest.raises(ConfigError, match=r"FEED_ALLOWED_HOSTS names ops\.example\.com"):
        settings_for(database_url, FEED_ALLOWED_HOSTS="ops.example.com")
    with pytest.raises(ConfigError, match="FEED_ALLOWED_ORIGINS entry"):
        settings_for(database_url, FEED_ALLOWED_ORIGINS="ops.example.com")
    access = Access.from_settings(settings_for(
        database_url, FEED_TOKEN="x" * 32, FEED_ALLOWED_HOSTS="Ops.Example.com, 10.0.0.5",
        FEED_ALLOWED_ORIGINS="https://ops.example.com", FEED_MAX_CONNECTIONS=7))
    assert access.host_refusal({"host": "ops.example.com:443"}) is None
    assert access.host_refusal({"host": "10.0.0.5:8766"}) is None
    assert access.host_refusal({"host": "[::1]:8766"}) is None
    refusal = access.host_refusal({"host": "evil.example"})
    assert refusal is not None
    assert refusal.status == 421
    assert access.origin_allowed("https://ops.example.com/")
    assert not access.origin_allowed("http://ops.example.com")
    assert access.max_connections == 7


def test_feed_refuses_a_public_address_without_a_token(database_url: str) -> None:
    with pytest.raises(ConfigError, match=r"FEED_HOST=0\.0\.0\.0 would expose"):
        Reactor(build(settings_for(database_url, FEED_HOST="0.0.0.0")))
    Reactor(build(settings_for(database_url, FEED_HOST="0.0.0.0", FEED_TOKEN="x" * 32)))


def test_tickets_and_sign_in_cookies_refuse_forgery_replay_and_age(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Signed with itsdangerous since issue 26, by the same rules: a ticket opens one
    connection, from its own origin, for 30 s; a cookie lasts 12 hours, for the token it
    was issued under; a changed byte, a time in the future or a malformed value is no
    pass."""
    own, other = "http://127.0.0.1:8766", "http://evil.example"
    access = Access(token="t0ken-123")
    now = time.time()
    ticket, cookie = access.issue_ticket(own), access.issue_session()
    tampered = ticket[:-2] + ("A" if ticket[-2] != "A" else "B") + ticket[-1]
    for forged in ["", "x", "a.b.c", "ж.ж.ж", tampered, access.issue_ticket(other)]:
        assert not access.spend_ticket(forged, own), forged
    assert access.spend_ticket(ticket, own)
    assert not access.spend_ticket(ticket, own)  # replayed
    assert access.session_ok(cookie)
    assert not Access(token="another").session_ok(cookie)
    assert not Access().session_ok(cookie)
    for forged in ["", "dashboard", "1.2", cookie + "x", "admin" + cookie[9:]]:
        assert not access.session_ok(forged), forged
    # A spent ticket stays spent to the last moment its signature passes (review: it was
    # forgotten a second early, and could be replayed at will in that second).
    spent = access.issue_ticket(own)
    signed = float(int(time.time()))
    assert access.spend_ticket(spent, own)
    for after_s in (29.5, 30.0, 30.5, 30.99):
        monkeypatch.setattr(time, "time", lambda after_s=after_s: signed + after_s)
        assert not access.spend_ticket(spent, own), after_s
    monkeypatch.setattr(time, "time", lambda: now)
    late = access.issue_ticket(own)
    monkeypatch.setattr(time, "time", lambda: now + 31)
    assert not access.spend_ticket(late, own)  # expired
    assert access.session_ok(cookie)
    future = access.issue_session()
    monkeypatch.setattr(time, "time", lambda: now + 12 * 3600 + 1)
    assert not access.session_ok(cookie)  # expired
    monkeypatch.setattr(time, "time", lambda: now)
    assert not access.session_ok(future)  # signed in the future


def test_a_ticket_issued_by_a_forked_process_is_refused_by_its_parent() -> None:
    """The ticket key is per process, forked or not (a pre-forking supervisor, the suite's
    warm interpreter): a ticket passes only the process that issued it."""
    own = "http://127.0.0.1:8766"
    access = Access()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        os.close(read)
        os.write(write, access.issue_ticket(own).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as child:
        ticket = child.read().decode()
    os.waitpid(pid, 0)
    assert ticket
    assert not access.spend_ticket(ticket, own)
    assert access.spend_ticket(access.issue_ticket(own), own)
