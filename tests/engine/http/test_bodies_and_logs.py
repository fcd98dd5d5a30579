"""Review of be2d1f7 (request bodies read bounded: 413/408) and 79be58c (libraries' log
records through structlog's chain), against a real reactor and real Hypercorn/h11.

Four defects were reproduced here and fixed: a body the route does not read held its
connection for ever (Hypercorn's app queue and the last send waited on each other:
web.DrainUnreadBody); an address inside a traceback was not masked (the traceback was
formatted after masking); a library's log call with wrong arguments printed logging's
own raw traceback (logs._formattable); Hypercorn's errors never reached the log
(`errorlog` was None; a client gone mid-body is now a quiet BodyRefused)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import trio

from tests.harness import running_reactor

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
        # The clients have gone; past the keep-alive (5 s) and body deadline (10 s):
        await trio.sleep(13)
        assert held(port) == [], "connections the server never closed"


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


def run_logged(code: str, fmt: str = "json") -> subprocess.CompletedProcess[str]:
    """`code` in a fresh interpreter after configure_logging("info", fmt); stderr captured."""
    prelude = ("from reactor.engine.logs import configure_logging\n"
               f"configure_logging('info', '{fmt}')\n")
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=60, check=True)


def test_an_address_inside_a_traceback_is_masked() -> None:
    """DEFECT. An exception's text often holds the recipient (aiosmtplib's
    SMTPRecipientRefused, a server's reply); the `exception` field is made by
    format_exc_info, which runs after _mask_processor in both chains, so it is written
    unmasked — from a library's record and from the reactor's own events alike."""
    done = run_logged("""
        import logging, structlog
        try:
            raise ValueError("550 mailbox unavailable: anna@example.com")
        except ValueError:
            logging.getLogger("aiosmtplib").error("send failed", exc_info=True)
        structlog.get_logger("reactor").error("own", exc_info=ValueError("to carl@example.com"))
        """)
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [line["event"] for line in lines] == ["send failed", "own"]
    assert "anna@example.com" not in done.stderr
    assert "carl@example.com" not in done.stderr
    assert "a***@example.com" in lines[0]["exception"]


def test_a_library_record_that_cannot_be_formatted_is_still_one_json_line() -> None:
    """DEFECT. A library's log call whose arguments do not fit its format string (a
    bug in any dependency, at WARNING) makes ProcessorFormatter's getMessage() raise:
    logging's handleError then writes a 20-line '--- Logging error ---' traceback, with
    the raw message and arguments unmasked, into the JSON log, and the record is lost.
    Records of other odd shapes (a dict or bytes as the message, an exception whose
    str() raises, one from a thread) held: each is one JSON line."""
    done = run_logged("""
        import logging, threading
        lib = logging.getLogger("psycopg")
        lib.warning("error ignored in rollback on %s: %s", "dora@example.com")
        lib.warning({"a": 1})
        lib.warning(b"\\xff\\xfe")
        class Bad(Exception):
            def __str__(self):
                raise RuntimeError("no str")
        try:
            raise Bad()
        except Bad:
            lib.error("bad str", exc_info=True)
        def in_thread():
            try:
                1 / 0
            except ZeroDivisionError:
                logging.getLogger("asyncio").exception("in a thread")
        thread = threading.Thread(target=in_thread)
        thread.start()
        thread.join()
        """)
    assert "Logging error" not in done.stderr
    assert "dora@example.com" not in done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]  # every line JSON
    assert len(lines) == 5
    assert "ZeroDivisionError" in lines[-1]["exception"]


def test_an_error_in_a_route_reaches_the_log() -> None:
    """docs/operations.md §7: a route that raises leaves its traceback in the log, once,
    and *before* the client has its 500: the child here dies abruptly the moment the
    answer arrives (no shutdown, no flush of anything pending), and the line is there.
    (Starlette's own path sends the 500 first and the server logs after: a shutdown in
    between lost the line under load.)"""
    done = run_logged("""
        import os, sys, httpx, trio
        from starlette.applications import Starlette
        from starlette.routing import Route
        from reactor.engine.web import serve_http

        async def boom(request):
            raise RuntimeError("a bug in a route")

        async def main():
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve_http, Starlette(routes=[Route("/", boom)]),
                                           "127.0.0.1", 0)
                def get():
                    return httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code
                print(await trio.to_thread.run_sync(get))
                sys.stdout.flush()
                os._exit(0)

        trio.run(main)
        """)
    assert done.stdout.strip() == "500"
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    errors = [line for line in lines if "a bug in a route" in line.get("exception", "")]
    assert len(errors) == 1, done.stderr
    assert (errors[0]["event"], errors[0]["path"]) == ("http route failed", "/")
