"""Pure logic: retry policy, masking, settings messages, message parsing."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from reactor.clinic.analytics import AnalyticsProcessor
from reactor.clinic.settings import ConfigError, load_settings
from reactor.engine.logs import mask_email, mask_emails_in
from reactor.engine.processor import PermanentError
from reactor.engine.queues import Message
from reactor.engine.retry import RetryPolicy


def test_backoff_doubles_and_is_capped() -> None:
    policy = RetryPolicy(base_s=2, max_s=60, jitter=0)
    assert [policy.delay_s(n) for n in range(1, 8)] == [2, 4, 8, 16, 32, 60, 60]


def test_jitter_spreads_within_bounds_and_never_below_one_second() -> None:
    policy = RetryPolicy(base_s=10, max_s=1000, jitter=0.2)
    rng = random.Random(7)
    delays = {policy.delay_s(1, rng) for _ in range(200)}
    assert min(delays) >= 8
    assert max(delays) <= 12
    assert len(delays) > 1
    assert RetryPolicy(base_s=0.1, jitter=0.5).delay_s(1, rng) == 1


def test_attempts_run_out_at_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert [policy.exhausted(n) for n in (1, 2, 3, 4)] == [False, False, True, True]


@pytest.mark.parametrize(("text", "masked"), [
    ("anna@example.com", "a***@example.com"),
    ("550 5.1.1 <ivan.petrov+kids@mail.example.ru>: no such user",
     "550 5.1.1 <i***@mail.example.ru>: no such user"),
    ("two: a@x.org, bb@y.org", "two: a***@x.org, b***@y.org"),
    ("no address here", "no address here"),
])
def test_addresses_are_masked_in_text(text: str, masked: str) -> None:
    assert mask_emails_in(text) == masked


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_library_log_records_go_through_the_same_chain(fmt: str) -> None:
    """A library's stdlib log record (trio's accept loop out of files, Hypercorn) is
    written like the reactor's own: in the JSON log a JSON line, its traceback a field,
    an address in it masked; below WARNING it is not written."""
    code = textwrap.dedent(f"""
        import logging
        from reactor.engine.logs import configure_logging
        import structlog
        configure_logging("info", "{fmt}")
        structlog.get_logger("reactor").warning("own event", to="user@example.com")
        logging.getLogger("trio.serve_listeners").info("not shown")
        try:
            raise OSError(24, "Too many open files")
        except OSError:
            logging.getLogger("trio.serve_listeners").exception(
                "accept returned %s for %s", "EMFILE", "admin@example.com")
        """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    lines = done.stderr.strip().splitlines()
    assert "user@example.com" not in done.stderr
    assert "admin@example.com" not in done.stderr
    assert "not shown" not in done.stderr
    if fmt == "console":
        assert "accept returned EMFILE for a***@example.com" in done.stderr
        assert "Too many open files" in done.stderr
        return
    own, library = (json.loads(line) for line in lines)  # two lines, each JSON
    assert own["event"] == "own event"
    assert own["to"] == "u***@example.com"
    assert library["event"] == "accept returned EMFILE for a***@example.com"
    assert library["level"] == "error"
    assert library["logger"] == "trio.serve_listeners"
    assert "timestamp" in library
    assert "OSError: [Errno 24] Too many open files" in library["exception"]


def test_mask_email_keeps_the_domain() -> None:
    assert mask_email("user@example.com") == "u***@example.com"
    assert mask_email("nonsense") == "***"


def test_settings_defaults_and_derived_values() -> None:
    settings = load_settings(_env_file=None, DATABASE_URL="postgresql://u@h/db")
    assert settings.worker_interval_ms == 5000
    assert settings.poll_interval_s == 5.0
    assert settings.feed_host == "127.0.0.1"
    assert settings.smtp_security_effective == "starttls"
    assert load_settings(_env_file=None, DATABASE_URL="postgresql://u@h/db",
                         SMTP_PORT=465).smtp_security_effective == "ssl"
    assert load_settings(_env_file=None, DATABASE_URL="postgresql://u@h/db",
                         LOG_LEVEL="INFO").log_level == "info"


def test_secret_values_are_never_echoed_in_errors() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(_env_file=None, DATABASE_URL="postgresql://u@h/db",
                      FEED_TOKEN=["not", "a", "string"])
    assert "FEED_TOKEN" in str(raised.value)
    assert "not" not in str(raised.value).replace("FEED_TOKEN", "")


def test_settings_read_dotenv(tmp_path: Path, monkeypatch:
                              pytest.MonkeyPatch) -> None:
    env = tmp_path / ".env"
    env.write_text("DATABASE_URL=postgresql://u@h/fromfile\nMAX_ATTEMPTS=9\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    settings = load_settings()
    assert settings.database_url.endswith("/fromfile")
    assert settings.max_attempts == 9


def delivery(body: object) -> Message:
    return Message("analytics_queue", 1, 1, datetime.now(UTC), body)


def test_parse_reports_every_problem_of_a_message() -> None:
    processor = AnalyticsProcessor.__new__(AnalyticsProcessor)
    with pytest.raises(PermanentError, match=r"event: Field required; user_id: Input should be"):
        processor.parse(delivery({"user_id": "nope"}))
    with pytest.raises(PermanentError, match="not a JSON object"):
        processor.parse(delivery("text"))
    job = processor.parse(delivery({"event": "ok", "unknown_key": 1}))
    assert job.message.event == "ok"


def test_the_apps_event_kinds_are_counted_and_exported_before_the_first() -> None:
    """An alert rule on an app's event (payment.mismatch) has a series to read from the
    start: 0 until the first one, then counted; other kinds are not."""
    from reactor.engine.events import EventBus
    from reactor.engine.metrics import Metrics

    metrics = Metrics(app_event_kinds=("payment.mismatch",))
    bus = EventBus()
    bus.sinks.append(metrics.observe)
    assert 'reactor_app_events_total{type="payment.mismatch"} 0.0' in metrics.render().decode()
    bus.publish("payment.mismatch", "payment_processing_queue", 7, 1, None, "amount differs")
    bus.publish("something.else", "payment_processing_queue")
    text = metrics.render().decode()
    assert 'reactor_app_events_total{type="payment.mismatch"} 1.0' in text
    assert "something.else" not in text
