"""What the HTTP port does with a request: a body read bounded (413 over its limit, 408
when trickled), a body the route does not read never holding the connection,
framing tricks refused with nothing smuggled after a 413, and unfinished requests
closed. Against a real reactor and real Hypercorn/h11.

From the review of be2d1f7 (request bodies read bounded), which reproduced a defect
kept fixed here: a body the route does not read held its connection for ever
(Hypercorn's app queue and the last send waited on each other: web.DrainUnreadBody)."""

from __future__ import annotations

import socket

import httpx
import pytest
import trio

from reactor.testing import patience
from tests.harness import (
    eventually,
    post_raw,
    running_reactor,
)

TOKEN = "t0ken-123"


async def exchange(port: int, parts: list[bytes], *, within_s: float) -> tuple[bytes, bool]:
    """Send `parts` over one raw connection; what the server sent until it closed the
    connection (True) or `within_s` passed (False)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    got, closed = b"", False
    async with stream:
        async def send() -> None:
            for part in parts:
                try:
                    await stream.send_all(part)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            with trio.move_on_after(within_s):
                while True:
                    try:
                        chunk = await stream.receive_some()
                    except trio.BrokenResourceError:
                        chunk = b""
                    if not chunk:
                        closed = True
                        break
                    got += chunk
            nursery.cancel_scope.cancel()
    return got, closed


def held(port: int) -> list[str]:
    """The TCP states of the server's accepted connections on `port` (/proc/net/tcp)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in rows.readlines()[1:]:
                fields = row.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] != "0A":
                    found.append(fields[3])
    return found


def sign_in_head(port: int, extra: str) -> bytes:
    return (f"POST /api/session HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Origin: http://127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"{extra}\r\n").encode()


async def test_a_body_too_big_or_too_slow_is_refused_before_it_is_read(
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sign-in route reads a body, so anyone who can reach the HTTP port can send one:
    a body declared or sent over its limit is refused at once (413), without waiting for
    the rest (a 10 GB body was read, into memory, to its end); one trickled a byte at a
    time is refused at the deadline (408) instead of holding the connection for ever."""
    monkeypatch.setattr("reactor.engine.web.BODY_DEADLINE_S", 1.0)
    async with running_reactor(database_url, FEED_TOKEN="t0ken-123") as reactor:
        port = reactor.http_port
        own = f"Origin: http://127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        with trio.fail_after(patience(15)):
            declared = await post_raw(port, "/api/session",
                                       own + "Content-Length: 10000000000\r\n",
                                       [b"x" * 65536] * 4)
            assert " 413 " in declared
            chunked = await post_raw(port, "/api/session",
                                      own + "Transfer-Encoding: chunked\r\n",
                                      [b"400\r\n" + b"x" * 1024 + b"\r\n"] * 1000)
            assert " 413 " in chunked
            trickled = await post_raw(port, "/api/session", own + "Content-Length: 40\r\n",
                                       [b"{"] + [b" "] * 38 + [b"}"], gap_s=0.2)
            assert " 408 " in trickled
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            ok = await http.post("/api/session", json={"token": "t0ken-123"},
                                 headers={"Origin": f"http://127.0.0.1:{port}"})
            assert ok.status_code == 200


async def test_a_body_the_route_does_not_read_does_not_hold_the_connection_for_ever(
        database_url: str) -> None:
    """DEFECT. A GET of the dashboard page (no token needed) or of /api/overview with a
    declared 100 MB body sent at full speed: Hypercorn queues at most 10 body chunks for the
    app (max_app_queue_size); the route answers without reading them, so Hypercorn's reader
    blocks putting the 11th, and its StreamClosed blocks putting http.disconnect into the
    same full queue: the connection is never closed, not even after the client has gone
    (neither the 5 s keep-alive nor the 10 s body deadline applies). Each try leaks a
    descriptor and ~1 MB for good: the flood docs/operations.md says cannot happen."""
    async with running_reactor(database_url, FEED_TOKEN=TOKEN) as reactor:
        port = reactor.http_port
        for path, auth in [("/", ""), ("/", ""), ("/", ""),
                           ("/api/overview", f"Authorization: Bearer {TOKEN}\r\n"),
                           ("/api/overview", f"Authorization: Bearer {TOKEN}\r\n")]:
            request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}"
                       "Content-Length: 100000000\r\n\r\n").encode()
            got, _ = await exchange(port, [request] + [b"x" * 65536] * 200, within_s=2)
            assert got.startswith(b"HTTP/1.1 200 ")
        # The clients have gone: the server closes every connection (at the latest past the
        # keep-alive, 5 s, and the body deadline, 10 s); the defect held them for ever.
        await eventually(lambda: held(port) == [], within_s=20)


async def test_framing_tricks_are_refused_and_nothing_is_smuggled_after_a_413(
        database_url: str) -> None:
    """HELD. h11 refuses a signed, hex or conflicting Content-Length (400) and a repeated or
    non-chunked Transfer-Encoding (501), closing the connection; Content-Length with
    chunked is framed as chunked (a declared size over the limit still gets 413); a request
    hidden in the unread rest of a refused body is never answered (the connection is
    closed after the 413, not reused)."""
    async with running_reactor(database_url, FEED_TOKEN=TOKEN) as reactor:
        port = reactor.http_port
        body = f'{{"token": "{TOKEN}"}}'.encode()
        for header, status in [("Content-Length: +22\r\n", 400),
                               ("Content-Length: 0x16\r\n", 400),
                               ("Content-Length: 22\r\nContent-Length: 5000\r\n", 400),
                               ("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                                501),
                               ("Transfer-Encoding: gzip, chunked\r\n", 501)]:
            got, closed = await exchange(port, [sign_in_head(port, header) + body], within_s=5)
            assert got.startswith(f"HTTP/1.1 {status} ".encode()), header
            assert closed, header
        chunked = b"16\r\n" + body + b"\r\n0\r\n\r\n"
        got, _ = await exchange(port, [sign_in_head(
            port, "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n") + chunked], within_s=1)
        assert got.startswith(b"HTTP/1.1 200 ")
        got, _ = await exchange(port, [sign_in_head(
            port, "Content-Length: 5000\r\nTransfer-Encoding: chunked\r\n") + chunked],
            within_s=1)
        assert got.startswith(b"HTTP/1.1 413 ")
        smuggled = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        got, closed = await exchange(port, [sign_in_head(port, "Content-Length: 9000\r\n")
                                            + smuggled * 10], within_s=5)
        assert got.startswith(b"HTTP/1.1 413 ")
        assert closed
        assert got.count(b"HTTP/1.1") == 1, got


async def test_the_http_port_closes_unfinished_requests(database_url: str) -> None:
    async with running_reactor(database_url) as reactor:
        def unfinished(data: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", reactor.http_port), timeout=60) as sock:
                sock.sendall(data)
                return sock.recv(100)  # EOF when the server gives up on it

        answers: dict[str, bytes] = {}

        async def probe(name: str, data: bytes) -> None:
            answers[name] = await trio.to_thread.run_sync(unfinished, data)

        async with trio.open_nursery() as nursery:  # both at once: one timeout's wait
            nursery.start_soon(probe, "silent", b"")
            nursery.start_soon(probe, "partial", b"GET / HTTP/1.1\r\nHost: x\r\n")
        assert answers == {"silent": b"", "partial": b""}
