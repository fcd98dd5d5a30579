"""structlog set-up: JSON or console lines, email addresses masked everywhere.

Secrets never reach a logger (settings hold them as SecretStr); addresses
can arrive inside error text from a server, so every string value of every
event is masked on the way out.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

__all__ = ["configure_logging", "level_enabled", "mask_email", "mask_emails_in", "masked"]

# Internationalized addresses too (RFC 6531, IDNA 2008: `мама@пример.рф`): the local part
# is the whole run before the @ of anything but space and what cannot stand unquoted in
# one (so a Cyrillic or accented one is masked whole, never its tail alone); the domain
# is labels of letters, digits and hyphens of any script, or A-labels, with a dot.
_EMAIL_RE = re.compile(r"([^\s@<>()\[\],;:\"])[^\s@<>()\[\],;:\"]*@"
                       r"([^\W_](?:[\w\-]*[^\W_])?(?:[.\u3002\uff0e\uff61][\w\-]+)+)")


def mask_email(address: str) -> str:
    """`user@example.com` → `u***@example.com` (the domain stays: it helps debugging)."""
    local, sep, domain = address.partition("@")
    if not sep:
        return "***"
    return f"{local[:1]}***@{domain}"


def mask_emails_in(text: str) -> str:
    """Mask every email address inside free text."""
    if "@" not in text:
        return text
    return _EMAIL_RE.sub(lambda m: f"{m.group(1)}***@{m.group(2)}", text)


def masked(value: Any) -> Any:
    """Every string inside a JSON value with its email addresses masked: what the feed, the
    dashboard's API and `reactor dlq inspect` show of a message."""
    if isinstance(value, str):
        return mask_emails_in(value)
    if isinstance(value, dict):
        return {k: masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [masked(v) for v in value]
    return value


def _mask_processor(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event_dict.items():
        if isinstance(value, str) and "@" in value:
            event_dict[key] = mask_emails_in(value)
    return event_dict


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
_threshold = logging.INFO


def level_enabled(level: str) -> bool:
    """Whether a log call at `level` would be written (to skip building its fields)."""
    return _LEVELS[level] >= _threshold


def _formattable(record: logging.LogRecord) -> bool:
    """A library's log call whose message cannot be formatted (wrong arguments) is still
    one line, its text kept: otherwise logging prints its own traceback, raw, to stderr
    and drops the record."""
    try:
        record.getMessage()
    except Exception:
        record.msg = f"unformattable log call: {str(record.msg)[:500]!r} % {record.args!r:.500}"
        record.args = None
    return True


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Configure structlog (and stdlib logging, for libraries) once per process."""
    global _threshold
    numeric = _LEVELS[level.lower()]
    _threshold = numeric
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,  # before masking: a traceback has text too
            _mask_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries log through stdlib logging (trio's serve_listeners when accept() fails,
    # Hypercorn, aiosmtplib): their records go through the same chain, so a JSON log has
    # nothing but JSON lines in it (a traceback as an "exception" field) and their text
    # is masked too.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name,
                           structlog.processors.add_log_level, timestamper],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, _mask_processor, renderer]))
    handler.addFilter(_formattable)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))
