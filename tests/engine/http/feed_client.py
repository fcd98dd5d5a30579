"""Clients of the feed and the HTTP port that a browser or a library would not be: raw
requests and websocket handshakes with headers of the test's choosing."""

from __future__ import annotations

import json
import socket
from typing import Any

import trio

from reactor.engine.runtime import Reactor
from reactor.testing import patience


def url(reactor: Reactor, query: str = "") -> str:
    return f"ws://127.0.0.1:{reactor.feed_port}/events{query}"


async def next_events(ws: Any, count: int, within_s: float = 5) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    with trio.fail_after(patience(within_s)):
        while len(events) < count:
            events.append(json.loads(await ws.get_message()))
    return events


def raw_request(port: int, head: str) -> bytes:
    """Send a raw HTTP request head (any Host, any header) and return the response head."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        response_head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in response_head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length and (chunk := sock.recv(4096)):
            body += chunk
        return response_head + b"\r\n\r\n" + body


def ws_handshake(port: int, *, host: str = "127.0.0.1", path: str = "/events",
                 extra: str = "") -> str:
    """A websocket handshake with headers of our choosing; returns the status line."""
    head = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}")
    return raw_request(port, head).split(b"\r\n", 1)[0].decode()


async def handshake(port: int, **kwargs: Any) -> str:
    return await trio.to_thread.run_sync(lambda: ws_handshake(port, **kwargs))


def stalled_client(port: int) -> socket.socket:
    """A websocket client that completes the handshake and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)  # every read here has a deadline
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 101")
    return sock
