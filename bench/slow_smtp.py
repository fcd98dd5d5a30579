"""An SMTP relay across a network, simulated: every reply leaves DELAY ms after
the command it answers arrived.

    python -m bench.slow_smtp [--delay-ms 40] [--no-pipelining]

Binds 127.0.0.1 on a free port and prints `READY <port>`; on SIGTERM (or end
of stdin) prints `STATS <mails> <round trips> <connections>` and exits.

The delay models latency, not a slow server: replies are scheduled
independently (in order), so commands that a client pipelines (RFC 2920:
MAIL, RCPT and DATA in one write) cost one round trip together, as they would
against a real relay. A "round trip" is counted each time the server sends a
reply and then has nothing more to say: the client had to wait for it.
Mails are accepted and dropped (only counted). Runs in its own process, as
a relay does: its CPU is not the reactor's, and the reactor sees only the wire.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from dataclasses import dataclass

__all__ = ["main"]

MAX_LINE = 4096
MAX_MESSAGE = 50 * 1024 * 1024


@dataclass
class Stats:
    mails: int = 0
    round_trips: int = 0
    connections: int = 0


class Relay(asyncio.Protocol):
    """One SMTP session; replies are delayed, never reordered."""

    def __init__(self, delay_s: float, pipelining: bool, stats: Stats) -> None:
        self.delay_s = delay_s
        self.pipelining = pipelining
        self.stats = stats
        self.buffer = b""
        self.in_data = False
        self.pending = 0
        self.last_at = 0.0
        self.closing = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.stats.connections += 1
        self.reply("220 relay.example ESMTP bench")

    def reply(self, text: str, close: bool = False) -> None:
        loop = asyncio.get_running_loop()
        at = max(loop.time() + self.delay_s, self.last_at)
        self.last_at = at
        self.pending += 1
        loop.call_at(at, self._send, text, close)

    def _send(self, text: str, close: bool) -> None:
        self.pending -= 1
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(text.encode("ascii") + b"\r\n")
        if self.pending == 0:
            self.stats.round_trips += 1
        if close:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while not self.closing:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    if len(self.buffer) > MAX_MESSAGE:
                        self.reply("552 message too large", close=True)
                        self.closing = True
                    return
                self.buffer = self.buffer[end + 5:]
                self.in_data = False
                self.stats.mails += 1
                self.reply("250 2.0.0 Ok: queued")
                continue
            line, sep, rest = self.buffer.partition(b"\r\n")
            if not sep:
                if len(self.buffer) > MAX_LINE:
                    self.reply("500 line too long", close=True)
                    self.closing = True
                return
            self.buffer = rest
            self.command(line.decode("ascii", "replace"))

    def command(self, line: str) -> None:
        verb = line[:4].upper()
        if verb == "EHLO":
            extensions = ["250-relay.example", "250-SIZE 52428800", "250-8BITMIME"]
            if self.pipelining:
                extensions.append("250-PIPELINING")
            self.reply("\r\n".join([*extensions, "250 ENHANCEDSTATUSCODES"]))
        elif verb == "HELO":
            self.reply("250 relay.example")
        elif verb in ("MAIL", "RCPT", "RSET", "NOOP"):
            self.reply("250 2.1.0 Ok")
        elif verb == "DATA":
            self.in_data = True
            self.reply("354 End data with <CR><LF>.<CR><LF>")
        elif verb == "QUIT":
            self.closing = True
            self.reply("221 2.0.0 Bye", close=True)
        else:
            self.reply("502 5.5.2 Command not recognized")


async def serve(delay_s: float, pipelining: bool) -> Stats:
    stats = Stats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Relay(delay_s, pipelining, stats),
                                      "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def on_input() -> None:
        if not sys.stdin.readline():  # end of input: the parent is done with us
            stop.set()

    loop.add_reader(sys.stdin.fileno(), on_input)
    print("READY", port, flush=True)
    async with server:
        await stop.wait()
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.slow_smtp")
    parser.add_argument("--delay-ms", type=float, default=40.0)
    parser.add_argument("--no-pipelining", action="store_true",
                        help="do not offer PIPELINING in the EHLO reply")
    args = parser.parse_args()
    stats = asyncio.run(serve(args.delay_ms / 1000, not args.no_pipelining))
    print("STATS", stats.mails, stats.round_trips, stats.connections, flush=True)


if __name__ == "__main__":
    main()
