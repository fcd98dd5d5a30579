"""The clinic's settings: the engine's (reactor.engine.settings) and the
variables of mail, reports, payments and the app itself.

The names are those of DESIGN.md and of the earlier Node worker, so an
existing `.env` keeps working. A wrong value stops the process with one line
that names the variable and the fix (`ConfigError`, exit code 2).
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any, ClassVar, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from reactor.engine.settings import ConfigError, EngineSettings
from reactor.engine.settings import load_settings as _load

__all__ = ["BrandSettings", "ConfigError", "MailSettings", "PaymentSettings", "ReportSettings",
           "Settings", "load_settings", "parse_networks"]

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


class _Part(BaseSettings):
    """One feature's settings: read from the environment like the engine's."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True,
        case_sensitive=True,
    )


class BrandSettings(_Part):
    """What mails and reports share: the service's name, time zone, links, report files."""

    app_name: str = Field("Family Mind", alias="APP_NAME")
    app_timezone: str = Field("Europe/Moscow", alias="APP_TIMEZONE")
    app_base_url: str | None = Field(None, alias="APP_BASE_URL")
    reports_dir: Path = Field(Path("reports"), alias="REPORTS_DIR")

    @model_validator(mode="after")
    def _check_timezone(self) -> BrandSettings:
        try:
            ZoneInfo(self.app_timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"APP_TIMEZONE={self.app_timezone!r} is not a time zone "
                             "(e.g. Europe/Moscow)") from None
        return self


class MailSettings(BrandSettings):
    """The email processor's and the mailer's (SMTP or the file outbox)."""

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
    # A relay's 4xx to MAIL, RCPT or DATA (greylisting, a rate limit, a full mailbox) is
    # waited out on a time budget, like an MTA's queue lifetime, not on MAX_ATTEMPTS:
    # tried again after SMTP_DEFER_BACKOFF_S, doubling up to SMTP_DEFER_BACKOFF_MAX_S,
    # until SMTP_DEFER_MAX_S after the first deferral.
    smtp_defer_max_s: int = Field(86_400, alias="SMTP_DEFER_MAX_S", ge=1)
    smtp_defer_backoff_s: int = Field(60, alias="SMTP_DEFER_BACKOFF_S", ge=1)
    smtp_defer_backoff_max_s: int = Field(900, alias="SMTP_DEFER_BACKOFF_MAX_S", ge=1)

    @model_validator(mode="after")
    def _check_defer_backoff(self) -> MailSettings:
        if self.smtp_defer_backoff_max_s < self.smtp_defer_backoff_s:
            raise ValueError(f"SMTP_DEFER_BACKOFF_MAX_S={self.smtp_defer_backoff_max_s} is below "
                             f"SMTP_DEFER_BACKOFF_S={self.smtp_defer_backoff_s}: set it to at "
                             "least that (the default is 900)")
        return self

    @property
    def smtp_security_effective(self) -> Literal["starttls", "ssl", "none"]:
        """SMTP_SECURITY, else derived from the port: 465 → ssl, 587 → starttls."""
        if self.smtp_security:
            return self.smtp_security
        return "ssl" if self.smtp_port == 465 else "starttls" if self.smtp_port == 587 else "none"


class ReportSettings(BrandSettings):
    """The report processor's: fonts, and Supabase Storage where reports are uploaded."""

    report_font_dir: Path = Field(Path("/usr/share/fonts/truetype/dejavu"),
                                  alias="REPORT_FONT_DIR")
    supabase_url: str | None = Field(None, alias="SUPABASE_URL")
    supabase_service_role_key: SecretStr | None = Field(None, alias="SUPABASE_SERVICE_ROLE_KEY")
    reports_bucket: str = Field("reports", alias="REPORTS_BUCKET")


class PaymentSettings(_Part):
    """The payment processor's and the provider's (YooKassa), and its webhook's sources."""

    payment_verify_max_age_s: int = Field(86_400, alias="PAYMENT_VERIFY_MAX_AGE", ge=60)
    payment_provider: Literal["manual", "yookassa"] = Field("manual", alias="PAYMENT_PROVIDER")
    yookassa_shop_id: str | None = Field(None, alias="YOOKASSA_SHOP_ID")
    yookassa_secret_key: SecretStr | None = Field(None, alias="YOOKASSA_SECRET_KEY")
    yookassa_api_url: str = Field("https://api.yookassa.ru/v3", alias="YOOKASSA_API_URL")
    # Where YooKassa's notifications may come from (its published ranges), and which
    # direct peers (reverse proxies) may name the real source in X-Forwarded-For.
    yookassa_webhook_networks: str = Field(YOOKASSA_NETWORKS, alias="YOOKASSA_WEBHOOK_NETWORKS")
    webhook_trusted_proxies: str = Field("", alias="WEBHOOK_TRUSTED_PROXIES")

    @field_validator("yookassa_webhook_networks", "webhook_trusted_proxies")
    @classmethod
    def _networks(cls, value: str, info: ValidationInfo) -> str:
        """Checked at start; an empty YOOKASSA_WEBHOOK_NETWORKS means YooKassa's own."""
        if not value.strip() and info.field_name == "yookassa_webhook_networks":
            return YOOKASSA_NETWORKS
        parse_networks(value)
        return value


class Settings(EngineSettings, MailSettings, ReportSettings, PaymentSettings):
    """Every knob of the clinic and of its engine, by its environment variable name: the
    engine's and each processor's own class, in one object read once."""

    LOWERCASE_CHOICES: ClassVar[tuple[str, ...]] = (
        *EngineSettings.LOWERCASE_CHOICES, "EMAIL_PROVIDER", "SMTP_SECURITY", "PAYMENT_PROVIDER")


def load_settings(**overrides: Any) -> Settings:
    """Read and validate the clinic's settings.

    Raises:
        ConfigError: with a one-line message naming the variable and the fix.
    """
    return _load(Settings, **overrides)
