"""A real SMTP server (aiosmtpd) for the tests, run as a subprocess.

It runs in its own process because trio-asyncio (used by the reactor's
mailer) changes asyncio for the whole process, and aiosmtpd's threaded
Controller then fails with "Cannot switch to a different thread".

    python -m tests.smtp_server --port P --maildir DIR [--tls starttls|ssl --cert C --key K]
        [--user U --password PW] [--reject ADDR ...] [--defer ADDR ...] [--delay-ms MS]
        [--idle-timeout-s S]

Each accepted mail is written to DIR/NNNN.eml (atomically), its envelope, TLS,
AUTH and EHLO name to DIR/NNNN.meta. DIR/sessions.log gets one line per
session event: `ehlo NAME`, `quit` (the client said goodbye) and `closed`
(the connection ended, by either side; `--idle-timeout-s` makes the server
drop an idle client like a real relay). Prints READY when it listens; stops
on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import ssl
from pathlib import Path
from typing import Any

from aiosmtpd.controller import UnthreadedController
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


class Handler:
    def __init__(self, maildir: Path, reject: set[str], defer: set[str],
                 delay_s: float = 0.0) -> None:
        self.maildir = maildir
        self.reject = reject
        self.defer = defer
        self.delay_s = delay_s  # a slow relay: each DATA is answered this much later
        self.counter = itertools.count(1)

    def session_event(self, line: str) -> None:
        with (self.maildir / "sessions.log").open("a") as out:
            out.write(line + "\n")

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        self.session_event(f"ehlo {hostname}")
        return responses

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        self.session_event("quit")
        return "221 Bye"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: Any) -> str:
        if address in self.reject:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        if address in self.defer:
            return f"451 4.7.1 <{address}>: Greylisted, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        n = next(self.counter)
        temp = self.maildir / f".{n:04d}.tmp"
        temp.write_bytes(envelope.original_content or envelope.content)
        (self.maildir / f"{n:04d}.meta").write_text(
            f"{envelope.mail_from}\n{','.join(envelope.rcpt_tos)}\n"
            f"tls={server.transport.get_extra_info('ssl_object') is not None}\n"
            f"auth={session.authenticated}\n"
            f"helo={session.host_name}\n")
        os.replace(temp, self.maildir / f"{n:04d}.eml")
        return "250 OK: queued"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--maildir", type=Path, required=True)
    parser.add_argument("--tls", choices=["none", "starttls", "ssl"], default="none")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--reject", nargs="*", default=[])
    parser.add_argument("--defer", nargs="*", default=[])
    parser.add_argument("--delay-ms", type=int, default=0)
    parser.add_argument("--idle-timeout-s", type=float, default=300.0)
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
    handler = Handler(args.maildir, set(args.reject), set(args.defer), args.delay_ms / 1000)

    class RecordingSMTP(SMTP):
        def connection_lost(self, error: Exception | None) -> None:
            handler.session_event("closed")
            super().connection_lost(error)

    class RecordingController(UnthreadedController):
        def factory(self) -> SMTP:
            return RecordingSMTP(self.handler, **self.SMTP_kwargs)

    kwargs["timeout"] = args.idle_timeout_s
    controller = RecordingController(
        handler, hostname="127.0.0.1",
        port=args.port, loop=loop, ssl_context=context if args.tls == "ssl" else None,
        **kwargs)
    controller.begin()  # type: ignore[no-untyped-call]
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    print("READY", flush=True)
    try:
        loop.run_forever()
    finally:
        controller.end()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
