"""`reactor watch`: follow the live feed in a terminal, one line per event.

Quiet when nothing happens: a queue's depth is printed when it changes (every
tick with --depth). The token travels in an `Authorization` header.

What an event carries comes from outside (an error's text, a note, a client's
address): its control characters are printed escaped (`\\x1b`), never raw, so no
field can move the cursor, clear the screen or forge a line (`terminal_safe`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO
from urllib.parse import urlencode

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    open_websocket_url,
)

__all__ = ["feed_url", "format_event", "json_line_safe", "terminal_safe", "watch"]

# C0 (with the line breaks and tabs), DEL and C1: the characters a terminal acts on.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# In JSON text, C0 is always escaped already; DEL and C1 may be there raw.
_JSON_RAW_CONTROL = re.compile(r"[\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    """`text` with every C0/C1 control character (and DEL) escaped as `\\xNN`."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def json_line_safe(text: str) -> str:
    """A line of JSON with its raw DEL/C1 characters written `\\u00NN` (the same JSON)."""
    return _JSON_RAW_CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


_COLORS = {
    "job.succeeded": "32", "job.retrying": "33", "job.dead_lettered": "31;1",
    "job.deferred": "34",
    "listener.lost": "31", "listener.connected": "36", "reactor.started": "36",
    "reactor.stopping": "36", "job.started": "2", "wakeup": "2", "queue.depth": "2",
    "feed.dropped": "31;1", "health.degraded": "31", "health.recovered": "32",
}
QUEUE_WIDTH = 26   # the queue column grows to the longest name seen


def feed_url(host: str, port: int, *, queue: str | None = None, type_prefix: str | None = None,
             replay: int = 0) -> str:
    """The feed's URL (the token goes in a header, never here)."""
    params = {k: v for k, v in {"queue": queue, "type": type_prefix,
                                "replay": replay or None}.items() if v}
    query = f"?{urlencode(params)}" if params else ""
    host = f"[{host}]" if ":" in host else host
    return f"ws://{host}:{port}/events{query}"


def format_event(event: dict[str, Any], *, color: bool, queue_width: int = QUEUE_WIDTH) -> str:
    """`12:00:01.234  email_queue  job.succeeded  msg #42  try 1  12.3 ms  error`."""
    ts = event.get("ts")
    when = datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3] if ts else "--:--:--"
    fields = [when, f"{event.get('queue') or '-':<{queue_width}}",
              f"{event.get('type', '?'):<18}"]
    if event.get("msg_id") is not None:
        fields.append(f"msg #{event['msg_id']}")
    if event.get("attempt"):
        fields.append(f"try {event['attempt']}")
    if event.get("duration_ms") is not None:
        fields.append(f"{event['duration_ms']:.1f} ms")
    if event.get("type") == "queue.depth":
        fields.append(f"depth {event.get('depth')} oldest {event.get('oldest_age_s') or 0}s")
    if event.get("type") == "job.deferred" and event.get("requeued_as") is not None:
        fields.append(f"-> msg #{event['requeued_as']} in {event.get('retry_in_s')}s")
    if str(event.get("type", "")).startswith("dlq."):  # a person acted on dead letters
        ids = ", ".join(f"dlq #{i}" for i in event.get("dlq_ids") or [])
        note = f": {event['note']}" if event.get("note") else ""
        fields.append(f"{ids} by {event.get('client') or '?'}{note}")
    if event.get("error"):
        fields.append(str(event["error"]))
    line = terminal_safe("  ".join(fields))
    code = _COLORS.get(str(event.get("type")))
    return f"\x1b[{code}m{line}\x1b[0m" if color and code else line


@dataclass
class _Quiet:
    """Drops the depth ticks that say nothing new (the reactor sends one per queue every 5 s)."""

    every_tick: bool = False
    depths: dict[str, Any] = field(default_factory=dict)

    def wanted(self, event: dict[str, Any]) -> bool:
        if event.get("type") != "queue.depth" or self.every_tick:
            return True
        queue = str(event.get("queue"))
        if self.depths.get(queue) == event.get("depth"):
            return False
        self.depths[queue] = event.get("depth")
        return True


async def watch(url: str, *, as_json: bool, out: TextIO = sys.stdout,
                color: bool | None = None, token: str | None = None,
                depth: bool = False) -> int:
    """Print events until the feed closes; return an exit code.

    A closed stdout (`reactor watch | head`) ends it quietly with 0.
    """
    color = out.isatty() if color is None else color
    headers = [(b"Authorization", f"Bearer {token}".encode())] if token else None
    quiet = _Quiet(every_tick=depth)
    width = QUEUE_WIDTH
    try:
        async with open_websocket_url(url, extra_headers=headers) as ws:
            while True:
                raw = await ws.get_message()
                message = raw.decode() if isinstance(raw, bytes) else raw
                event = json.loads(message)
                if not quiet.wanted(event):
                    continue
                width = max(width, len(str(event.get("queue") or "")))
                try:
                    out.write((json_line_safe(message) if as_json else format_event(
                        event, color=color, queue_width=width)) + "\n")
                    out.flush()
                except BrokenPipeError:
                    _silence(out)
                    return 0
    except ConnectionRejected as exc:
        body = (exc.body or b"").decode("utf-8", "replace").strip()
        reason = body or ("missing or wrong FEED_TOKEN" if exc.status_code == 401
                          else f"HTTP {exc.status_code}")
        print(f"reactor: the feed refused the connection: {reason}", file=sys.stderr)
        return 1
    except ConnectionClosed:
        return 0
    except (OSError, HandshakeError) as exc:
        cause = exc.__cause__ or exc
        print(f"reactor: cannot reach the feed at {url.split('?')[0]}: {cause} "
              "(is `reactor run` running? check FEED_HOST and FEED_PORT)", file=sys.stderr)
        return 1


def _silence(out: TextIO) -> None:
    """stdout is gone: point it at /dev/null so the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def run_watch(url: str, as_json: bool, *, token: str | None = None, depth: bool = False) -> int:
    return trio.run(lambda: watch(url, as_json=as_json, token=token, depth=depth))
