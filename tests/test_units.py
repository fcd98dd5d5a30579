"""Pure logic: retry policy, masking, settings messages, message parsing."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path

import pytest

from reactor.config import ConfigError, load_settings
from reactor.core.retry import RetryPolicy
from reactor.logs import mask_email, mask_emails_in
from reactor.processors.analytics import AnalyticsProcessor
from reactor.processors.base import PermanentError
from reactor.queues import Message


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
