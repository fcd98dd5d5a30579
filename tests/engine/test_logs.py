"""The log (reactor.engine.logs): libraries' records through structlog's chain, in a
fresh interpreter. From the review of 79be58c, which reproduced three defects kept
fixed here: an address inside a traceback was not masked (the traceback was formatted
after masking); a library's log call with wrong arguments printed logging's own raw
traceback (logs._formattable); Hypercorn's errors never reached the log (`errorlog`
was None). The masking of plain text and the chain's formats are in test_units.py."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


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


def test_internationalized_addresses_are_masked_in_the_log() -> None:
    """Issue 29: a Cyrillic local part or domain (RFC 6531, IDNA 2008), in the reactor's
    own fields, in a library's record and in a traceback. (The JSON log escapes
    non-ASCII, so the lines are read back before looking.)"""
    done = run_logged("""
        import logging, structlog
        structlog.get_logger("reactor").warning("refused", to="мама@пример.рф",
                                                error="550 <user@пример.рф>: unknown")
        try:
            raise ValueError("no SMTPUTF8 for Иван.Петров@почта.рф")
        except ValueError:
            logging.getLogger("aiosmtplib").error("send failed", exc_info=True)
        """)
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    text = json.dumps(lines, ensure_ascii=False)
    for address in ("мама@пример.рф", "user@пример.рф", "Иван.Петров@почта.рф"):
        assert address not in text
    assert lines[0]["to"] == "м***@пример.рф"
    assert lines[0]["error"] == "550 <u***@пример.рф>: unknown"
    assert "И***@почта.рф" in lines[1]["exception"]


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


def test_an_apps_own_error_handler_still_answers_and_the_error_is_logged_once() -> None:
    """LogRouteErrors logs and lets the exception go on: the app's handler for Exception
    answers (here 418), and the server's own record of the same exception is dropped."""
    done = run_logged("""
        import httpx, trio
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, PlainTextResponse
        from starlette.routing import Route
        from reactor.engine.web import serve_http

        async def boom(request):
            raise RuntimeError("a bug in a route")

        async def ok(request):
            return PlainTextResponse("ok")

        async def sorry(request, exc):
            return JSONResponse({"sorry": True}, status_code=418)

        app = Starlette(routes=[Route("/", boom), Route("/ok", ok)],
                        exception_handlers={Exception: sorry})

        async def main():
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve_http, app, "127.0.0.1", 0)
                def get(path):
                    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10).status_code
                print(await trio.to_thread.run_sync(get, "/"),
                      await trio.to_thread.run_sync(get, "/ok"))
                nursery.cancel_scope.cancel()

        trio.run(main)
        """)
    assert done.stdout.split() == ["418", "200"]
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    errors = [line for line in lines if "a bug in a route" in line.get("exception", "")]
    assert [line["event"] for line in errors] == ["http route failed"], done.stderr
