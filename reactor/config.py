"""Settings from the environment (and `.env` in the working directory).

The names are those of DESIGN.md and of the earlier Node worker, so an
existing `.env` keeps working. A wrong value stops the process with one line
that names the variable and the fix (`ConfigError`, exit code 2).
"""

from __future__ import annotations

import sys
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ConfigError", "Settings", "load_settings", "parse_networks"]

QUEUES = ("email_queue", "report_generation_queue", "payment_processing_queue", "analytics_queue")


# https://yookassa.ru/developers/using-api/webhooks#ip (the addresses notifications come from).
YOOKASSA_NETWORKS = ("185.71.76.0/27,185.71.77.0/27,77.75.153.0/25,77.75.156.11,77.75.156.35,"
                     "77.75.154.128/25,2a02:5180::/32")
Network = IPv4Network | IPv6Network


def parse_networks(value: str) -> tuple[Network, ...]:
    """A comma-separated list of addresses and CIDR networks (empty: none).

    Raises: ValueError naming the entry that is not an address or network.
    """
    networks = []
    for entry in (part.strip() for part in value.split(",")):
        if entry:
            try:
                networks.append(ip_network(entry, strict=False))
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network (write e.g. "
                                 "203.0.113.0/24,2001:db8::1, comma-separated)") from None
    return tuple(networks)


class ConfigError(Exception):
    """A setting is missing or wrong; str() is the one line shown to the user."""


class Settings(BaseSettings):
    """Every knob of the reactor, by its environment variable name."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True,
        case_sensitive=True,
    )

    database_url: str = Field(alias="DATABASE_URL")

    email_provider: Literal["smtp", "file"] = Field("smtp", alias="EMAIL_PROVIDER")
    smtp_host: str | None = Field(None, alias="SMTP_HOST")
    smtp_port: int = Field(587, alias="SMTP_PORT", ge=1, le=65535)
    smtp_security: Literal["starttls", "ssl", "none"] | None = Field(None, alias="SMTP_SECURITY")
    smtp_ca_file: Path | None = Field(None, alias="SMTP_CA_FILE")
    smtp_user: str | None = Field(None, alias="SMTP_USER")
    smtp_pass: SecretStr | None = Field(None, alias="SMTP_PASS")
    smtp_from: str | None = Field(None, alias="SMTP_FROM")
    smtp_from_name: str | None = Field(None, alias="SMTP_FROM_NAME")
    email_outbox_dir: Path = Field(Path("outbox"), alias="EMAIL_OUTBOX_DIR")
    smtp_pool_size: int = Field(3, alias="SMTP_POOL_SIZE", ge=1, le=50)
    smtp_timeout_s: float = Field(30.0, alias="SMTP_TIMEOUT_S", gt=0)
    smtp_pool_idle_s: float = Field(30.0, alias="SMTP_POOL_IDLE_S", gt=0)
    smtp_helo_name: str | None = Field(None, alias="SMTP_HELO_NAME")
    smtp_reply_to: str | None = Field(None, alias="SMTP_REPLY_TO")
    app_name: str = Field("Family Mind", alias="APP_NAME")
    app_timezone: str = Field("Europe/Moscow", alias="APP_TIMEZONE")

    worker_interval_ms: int = Field(5000, alias="WORKER_INTERVAL_MS", ge=10)
    max_tasks_per_cycle: int = Field(100, alias="MAX_TASKS_PER_CYCLE", ge=1, le=10_000)
    visibility_timeout_s: int = Field(30, alias="VISIBILITY_TIMEOUT_S", ge=1)
    max_attempts: int = Field(5, alias="MAX_ATTEMPTS", ge=1)
    outage_max_attempts: int = Field(20, alias="OUTAGE_MAX_ATTEMPTS", ge=1)
    retry_base_s: float = Field(2.0, alias="RETRY_BASE_S", gt=0)
    retry_max_s: float = Field(900.0, alias="RETRY_MAX_S", gt=0)
    shutdown_grace_s: float = Field(10.0, alias="SHUTDOWN_GRACE_S", ge=0)
    db_pool_size: int = Field(4, alias="DB_POOL_SIZE", ge=1, le=64)
    listener_probe_s: float = Field(30.0, alias="LISTENER_PROBE_S", gt=0)
    # Deliveries that ended with no outcome (the worker crashed or was killed while
    # holding the message) after which it is dead-lettered as a likely crasher.
    max_lost_deliveries: int = Field(3, alias="MAX_LOST_DELIVERIES", ge=1)
    # Client-side deadline of every statement (works through transaction poolers).
    db_statement_timeout_s: float = Field(30.0, alias="DB_STATEMENT_TIMEOUT_S", gt=0)

    log_level: Literal["debug", "info", "warning", "error"] = Field("info", alias="LOG_LEVEL")
    log_format: Literal["json", "console"] | None = Field(None, alias="LOG_FORMAT")

    feed_host: str = Field("127.0.0.1", alias="FEED_HOST")
    feed_port: int = Field(8765, alias="FEED_PORT", ge=0, le=65535)
    feed_token: SecretStr | None = Field(None, alias="FEED_TOKEN")
    metrics_port: int = Field(8766, alias="METRICS_PORT", ge=0, le=65535)
    # Who may use the feed and the HTTP port besides loopback (reactor.feed.Access).
    feed_allowed_hosts: str = Field("", alias="FEED_ALLOWED_HOSTS")
    feed_allowed_origins: str = Field("", alias="FEED_ALLOWED_ORIGINS")
    feed_max_connections: int = Field(100, alias="FEED_MAX_CONNECTIONS", ge=1, le=100_000)
    feed_handshake_timeout_s: float = Field(5.0, alias="FEED_HANDSHAKE_TIMEOUT_S", gt=0, le=120)

    reports_dir: Path = Field(Path("reports"), alias="REPORTS_DIR")
    report_font_dir: Path = Field(Path("/usr/share/fonts/truetype/dejavu"),
                                  alias="REPORT_FONT_DIR")
    supabase_url: str | None = Field(None, alias="SUPABASE_URL")
    supabase_service_role_key: SecretStr | None = Field(None, alias="SUPABASE_SERVICE_ROLE_KEY")
    reports_bucket: str = Field("reports", alias="REPORTS_BUCKET")
    payment_verify_max_age_s: int = Field(86_400, alias="PAYMENT_VERIFY_MAX_AGE", ge=60)
    payment_provider: Literal["manual", "yookassa"] = Field("manual", alias="PAYMENT_PROVIDER")
    yookassa_shop_id: str | None = Field(None, alias="YOOKASSA_SHOP_ID")
    yookassa_secret_key: SecretStr | None = Field(None, alias="YOOKASSA_SECRET_KEY")
    yookassa_api_url: str = Field("https://api.yookassa.ru/v3", alias="YOOKASSA_API_URL")
    # Where YooKassa's notifications may come from (its published ranges), and which
    # direct peers (reverse proxies) may name the real source in X-Forwarded-For.
    yookassa_webhook_networks: str = Field(YOOKASSA_NETWORKS, alias="YOOKASSA_WEBHOOK_NETWORKS")
    webhook_trusted_proxies: str = Field("", alias="WEBHOOK_TRUSTED_PROXIES")
    app_base_url: str | None = Field(None, alias="APP_BASE_URL")

    @model_validator(mode="before")
    @classmethod
    def _lowercase_choices(cls, data: object) -> object:
        """LOG_LEVEL=INFO and SMTP_SECURITY=STARTTLS mean what they say."""
        if isinstance(data, dict):
            for key in ("LOG_LEVEL", "LOG_FORMAT", "EMAIL_PROVIDER", "SMTP_SECURITY",
                        "PAYMENT_PROVIDER"):
                if isinstance(data.get(key), str):
                    data[key] = data[key].strip().lower() or None
        return data

    @field_validator("database_url")
    @classmethod
    def _url_encoding(cls, value: str) -> str:
        """Refused here, before libpq, which would quote the password in its error."""
        from reactor.startup import url_problem  # local: startup imports db

        if problem := url_problem(value):
            raise ValueError(problem)
        return value

    @field_validator("yookassa_webhook_networks", "webhook_trusted_proxies")
    @classmethod
    def _networks(cls, value: str, info: ValidationInfo) -> str:
        """Checked at start; an empty YOOKASSA_WEBHOOK_NETWORKS means YooKassa's own."""
        if not value.strip() and info.field_name == "yookassa_webhook_networks":
            return YOOKASSA_NETWORKS
        parse_networks(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        try:
            ZoneInfo(self.app_timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"APP_TIMEZONE={self.app_timezone!r} is not a time zone "
                             "(e.g. Europe/Moscow)") from None
        if not self.database_url.startswith(("postgresql://", "postgres://")) and (
            "=" not in self.database_url
        ):
            raise ValueError("DATABASE_URL must be a postgresql:// URL")
        self._check_feed_access()
        return self

    def _check_feed_access(self) -> None:
        """Names and origins other than loopback mean another host can reach the port."""
        for origin in self.feed_allowed_origins_list:
            if not origin.startswith(("http://", "https://")) or origin.count("/") != 2:
                raise ValueError(f"FEED_ALLOWED_ORIGINS entry {origin!r} is not an origin "
                                 "(scheme://host[:port], e.g. https://ops.example.com)")
        public = [h for h in self.feed_allowed_hosts_list
                  if h not in ("localhost", "127.0.0.1", "::1")]
        if public and self.feed_token is None:
            raise ValueError(f"FEED_ALLOWED_HOSTS names {public[0]}: a port reachable by that "
                             "name needs a token; set FEED_TOKEN too")

    @property
    def feed_allowed_hosts_list(self) -> list[str]:
        """FEED_ALLOWED_HOSTS, comma-separated host names (no ports), lower case."""
        return [h.strip().lower().strip("[]").rstrip(".")
                for h in self.feed_allowed_hosts.split(",") if h.strip()]

    @property
    def feed_allowed_origins_list(self) -> list[str]:
        """FEED_ALLOWED_ORIGINS, comma-separated `scheme://host[:port]`."""
        return [o.strip().rstrip("/").lower() for o in self.feed_allowed_origins.split(",")
                if o.strip()]

    @property
    def smtp_security_effective(self) -> Literal["starttls", "ssl", "none"]:
        """SMTP_SECURITY, else derived from the port: 465 → ssl, 587 → starttls."""
        if self.smtp_security:
            return self.smtp_security
        return "ssl" if self.smtp_port == 465 else "starttls" if self.smtp_port == 587 else "none"

    @property
    def log_format_effective(self) -> Literal["json", "console"]:
        """JSON unless told otherwise or writing to a terminal."""
        if self.log_format:
            return self.log_format
        return "console" if sys.stderr.isatty() else "json"

    @property
    def poll_interval_s(self) -> float:
        return self.worker_interval_ms / 1000


_FIXES = {
    "DATABASE_URL": "set it to postgresql://USER:PASSWORD@HOST:5432/DB "
    "(a direct or session-mode connection: LISTEN does not work through a transaction pooler)",
}


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    name = str(first["loc"][0]) if first["loc"] else "settings"
    if first["type"] == "missing":
        fix = _FIXES.get(name, "set it in the environment or in .env")
        return f"{name} is not set: {fix}"
    value = first.get("input")
    shown = "" if isinstance(value, dict) or _secret(name) else f"={value!r}"
    message = first["msg"].removeprefix("Value error, ")
    return f"invalid {name}{shown}: {message} (fix it in the environment or .env; see .env.example)"


def _secret(name: str) -> bool:
    return any(part in name for part in ("PASS", "SECRET", "TOKEN", "KEY", "DATABASE_URL"))


def load_settings(**overrides: object) -> Settings:
    """Read and validate the settings.

    Raises:
        ConfigError: with a one-line message naming the variable and the fix.
    """
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


class FeedClientSettings(BaseSettings):
    """What `reactor watch` needs: where the feed is (no database needed)."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8",
                                      extra="ignore", populate_by_name=True,
                                      case_sensitive=True)

    feed_host: str = Field("127.0.0.1", alias="FEED_HOST")
    feed_port: int = Field(8765, alias="FEED_PORT", ge=1, le=65535)
    feed_token: SecretStr | None = Field(None, alias="FEED_TOKEN")


def load_feed_client_settings() -> FeedClientSettings:
    """Raises: ConfigError naming the variable."""
    try:
        return FeedClientSettings()
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
