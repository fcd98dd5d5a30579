"""`reactor watch`: follow the live feed in a terminal, one line per event."""

from __future__ import annotations

import json
import sys
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

__all__ = ["feed_url", "format_event", "watch"]

_COLORS = {
    "job.succeeded": "32", "job.retrying": "33", "job.dead_lettered": "31;1",
    "listener.lost": "31", "listener.connected": "36", "reactor.started": "36",
    "reactor.stopping": "36", "job.started": "2", "wakeup": "2", "queue.depth": "2",
    "feed.dropped": "31;1",
}


def feed_url(host: str, port: int, *, queue: str | None = None, type_prefix: str | None = None,
             replay: int = 0, token: str | None = None) -> str:
    params = {k: v for k, v in {"queue": queue, "type": type_prefix,
                                "replay": replay or None, "token": token}.items() if v}
    query = f"?{urlencode(params)}" if params else ""
    return f"ws://{host}:{port}/events{query}"


def format_event(event: dict[str, Any], *, color: bool) -> str:
    """`12:00:01.234  email_queue  job.succeeded  #42  try 1  12.3 ms  error`."""
    ts = event.get("ts")
    when = datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3] if ts else "--:--:--"
    fields = [when, f"{event.get('queue') or '-':<26}", f"{event.get('type', '?'):<18}"]
    if event.get("msg_id") is not None:
        fields.append(f"#{event['msg_id']}")
    if event.get("attempt"):
        fields.append(f"try {event['attempt']}")
    if event.get("duration_ms") is not None:
        fields.append(f"{event['duration_ms']:.1f} ms")
    if event.get("type") == "queue.depth":
        fields.append(f"depth {event.get('depth')} oldest {event.get('oldest_age_s') or 0}s")
    if event.get("error"):
        fields.append(str(event["error"]))
    line = "  ".join(fields)
    code = _COLORS.get(str(event.get("type")))
    return f"\x1b[{code}m{line}\x1b[0m" if color and code else line


async def watch(url: str, *, as_json: bool, out: TextIO = sys.stdout,
                color: bool | None = None) -> int:
    """Print events until the feed closes; return an exit code."""
    color = out.isatty() if color is None else color
    try:
        async with open_websocket_url(url) as ws:
            while True:
                raw = await ws.get_message()
                message = raw.decode() if isinstance(raw, bytes) else raw
                event = json.loads(message)
                out.write((message if as_json else format_event(event, color=color)) + "\n")
                out.flush()
    except ConnectionRejected as exc:
        reason = "missing or wrong FEED_TOKEN" if exc.status_code == 401 \
            else f"HTTP {exc.status_code}"
        print(f"reactor: the feed refused the connection: {reason}", file=sys.stderr)
        return 1
    except ConnectionClosed:
        return 0
    except (OSError, HandshakeError) as exc:
        cause = exc.__cause__ or exc
        print(f"reactor: cannot reach the feed at {url.split('?')[0]}: {cause} "
              "(is `reactor run` running? check FEED_HOST and FEED_PORT)", file=sys.stderr)
        return 1


def run_watch(url: str, as_json: bool) -> int:
    return trio.run(lambda: watch(url, as_json=as_json))
