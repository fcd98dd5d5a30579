"""A real SMTP server (aiosmtpd) for the tests, run as a subprocess.

It runs in its own process, as a relay does: its event loop and CPU stay
apart from the reactor's under test, and the test sees only the wire.

    python -m tests.smtp_server (--port P | --fd N) --maildir DIR
        [--tls starttls|ssl --cert C --key K]
        [--user U --password PW] [--reject ADDR ...] [--defer ADDR ...]
        [--defer-once ADDR ...] [--greylist ADDR=S ...] [--greylist-data ADDR=S ...]
        [--delay-ms MS]
        [--idle-timeout-s S] [--pipelining] [--smtputf8]

`--greylist ADDR=S` answers RCPT TO:<ADDR> with 451 4.7.1 until S seconds after the
first time it saw ADDR (a greylist with a delay, as postgrey's); `--greylist-data
ADDR=S` does the same at the end of DATA (452 4.3.1), after the message was sent.
Every such deferral is one line `deferred ADDR` in DIR/deferrals.log.

`--smtputf8` offers SMTPUTF8 (RFC 6531: UTF-8 addresses and headers); without it the
server reads commands as strict ASCII, as a relay without SMTPUTF8 does.

`--pipelining` adds PIPELINING (RFC 2920) to the EHLO reply; aiosmtpd reads
commands one at a time from its stream, so it answers pipelined ones in order.

Each accepted mail is written to DIR/NNNN.eml (atomically), its envelope, TLS,
AUTH, EHLO name, SMTPUTF8 flag and MAIL parameters to DIR/NNNN.meta (UTF-8).
DIR/sessions.log gets one line per session event: `ehlo NAME`, `quit` (the client
said goodbye) and `closed` (the connection ended, by either side; `--idle-timeout-s`
makes the server drop an idle client like a real relay). Prints `READY <port>` when it listens;
stops on SIGTERM. `--fd` is a socket the parent bound to port 0 and passed on: the port
is the parent's from the start, so no other process can take it between the choice
and the listen (and before the listen, a connection to it is refused, as to a relay
that is down). `--port 0` lets the kernel choose.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


class Handler:
    def __init__(self, maildir: Path, reject: set[str], defer: set[str],
                 delay_s: float = 0.0, defer_once: set[str] | None = None,
                 pipelining: bool = False, greylist: dict[str, float] | None = None,
                 greylist_data: dict[str, float] | None = None) -> None:
        self.pipelining = pipelining
        self.greylist = dict(greylist or {})  # address → seconds it stays greylisted
        self.greylist_data = dict(greylist_data or {})
        self.first_seen: dict[tuple[str, str], float] = {}
        self.maildir = maildir
        self.reject = reject
        self.defer = defer
        self.defer_once = set(defer_once or ())  # greylisting: 451 the first time only
        self.delay_s = delay_s  # a slow relay: each DATA is answered this much later
        self.counter = itertools.count(1)

    def session_event(self, line: str) -> None:
        with (self.maildir / "sessions.log").open("a") as out:
            out.write(line + "\n")

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        self.session_event(f"ehlo {hostname}")
        if self.pipelining:
            return [*responses[:-1], "250-PIPELINING", responses[-1]]
        return responses

    def greylisted(self, stage: str, address: str, delays: dict[str, float]) -> bool:
        """Still within the greylist delay of `address` (the clock starts when first seen)."""
        if address not in delays:
            return False
        first = self.first_seen.setdefault((stage, address), time.monotonic())
        if time.monotonic() - first >= delays[address]:
            return False
        with (self.maildir / "deferrals.log").open("a") as out:
            out.write(f"deferred {address}\n")
        return True

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        self.session_event("quit")
        return "221 Bye"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: Any) -> str:
        if address in self.reject:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        if address in self.defer or address in self.defer_once:
            self.defer_once.discard(address)
            return f"451 4.7.1 <{address}>: Greylisted, try again later"
        if self.greylisted("rcpt", address, self.greylist):
            return f"451 4.7.1 <{address}>: Recipient address rejected: Greylisted, see " \
                   "http://postgrey.schweikert.ch/help/example.html"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if any(self.greylisted("data", a, self.greylist_data) for a in envelope.rcpt_tos):
            return "452 4.3.1 Insufficient system storage, try again later"
        n = next(self.counter)
        temp = self.maildir / f".{n:04d}.tmp"
        temp.write_bytes(envelope.original_content or envelope.content)
        (self.maildir / f"{n:04d}.meta").write_text(
            f"{envelope.mail_from}\n{','.join(envelope.rcpt_tos)}\n"
            f"tls={server.transport.get_extra_info('ssl_object') is not None}\n"
            f"auth={session.authenticated}\n"
            f"helo={session.host_name}\n"
            f"smtputf8={envelope.smtp_utf8}\n"
            f"mail_options={' '.join(envelope.mail_options)}\n", encoding="utf-8")
        os.replace(temp, self.maildir / f"{n:04d}.eml")
        return "250 OK: queued"


def _delays(items: list[str]) -> dict[str, float]:
    """ADDR=SECONDS pairs."""
    return {address: float(seconds)
            for address, _, seconds in (item.rpartition("=") for item in items)}


def main() -> None:
    parser = argparse.ArgumentParser()
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int)
    where.add_argument("--fd", type=int)
    parser.add_argument("--maildir", type=Path, required=True)
    parser.add_argument("--tls", choices=["none", "starttls", "ssl"], default="none")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--reject", nargs="*", default=[])
    parser.add_argument("--defer", nargs="*", default=[])
    parser.add_argument("--defer-once", nargs="*", default=[])
    parser.add_argument("--greylist", nargs="*", default=[])
    parser.add_argument("--greylist-data", nargs="*", default=[])
    parser.add_argument("--delay-ms", type=int, default=0)
    parser.add_argument("--idle-timeout-s", type=float, default=300.0)
    parser.add_argument("--pipelining", action="store_true")
    parser.add_argument("--smtputf8", action="store_true")
    args = parser.parse_args()
    args.maildir.mkdir(parents=True, exist_ok=True)

    context = None
    if args.tls != "none":
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str,
                     data: Any) -> AuthResult:
        ok = (isinstance(data, LoginPassword) and data.login.decode() == args.user
              and data.password.decode() == args.password)
        return AuthResult(success=ok, handled=False)

    kwargs: dict[str, Any] = {}
    if args.user:
        kwargs |= {"authenticator": authenticate, "auth_required": True,
                   "auth_require_tls": args.tls != "none"}
    if args.tls == "starttls":
        kwargs |= {"tls_context": context, "require_starttls": True}
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    handler = Handler(args.maildir, set(args.reject), set(args.defer), args.delay_ms / 1000,
                      set(args.defer_once), args.pipelining,
                      _delays(args.greylist), _delays(args.greylist_data))

    class RecordingSMTP(SMTP):
        def connection_lost(self, error: Exception | None) -> None:
            handler.session_event("closed")
            super().connection_lost(error)

    kwargs["timeout"] = args.idle_timeout_s
    kwargs["enable_SMTPUTF8"] = args.smtputf8
    if args.fd is not None:
        sock = socket.socket(fileno=args.fd)
    else:
        sock = socket.create_server(("127.0.0.1", args.port))
    sock.listen()
    server = loop.run_until_complete(loop.create_server(
        lambda: RecordingSMTP(handler, **kwargs), sock=sock,
        ssl=context if args.tls == "ssl" else None))
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    print(f"READY {sock.getsockname()[1]}", flush=True)
    try:
        loop.run_forever()
    finally:
        server.close()


if __name__ == "__main__":
    main()
