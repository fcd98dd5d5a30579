"""The engine's settings, from the environment (and `.env` in the working directory).

Only what the engine itself uses: the database, the drain loop, retries, logs,
the feed and the HTTP port. An app extends `EngineSettings` with its own
variables (the clinic: reactor.clinic.settings). A wrong value stops the
process with one line that names the variable and the fix (`ConfigError`,
exit code 2).
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ConfigError", "EngineSettings", "FeedClientSettings", "load_feed_client_settings",
           "load_settings"]


class ConfigError(Exception):
    """A setting is missing or wrong; str() is the one line shown to the user."""


class EngineSettings(BaseSettings):
    """Every knob of the engine, by its environment variable name."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True,
        case_sensitive=True,
    )
    # Variables whose value is a choice: INFO means info.
    LOWERCASE_CHOICES: ClassVar[tuple[str, ...]] = ("LOG_LEVEL", "LOG_FORMAT")

    database_url: str = Field(alias="DATABASE_URL")

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
    # Who may use the feed and the HTTP port besides loopback (reactor.engine.auth.Access).
    feed_allowed_hosts: str = Field("", alias="FEED_ALLOWED_HOSTS")
    feed_allowed_origins: str = Field("", alias="FEED_ALLOWED_ORIGINS")
    feed_max_connections: int = Field(100, alias="FEED_MAX_CONNECTIONS", ge=1, le=100_000)
    feed_handshake_timeout_s: float = Field(5.0, alias="FEED_HANDSHAKE_TIMEOUT_S", gt=0, le=120)

    @model_validator(mode="before")
    @classmethod
    def _lowercase_choices(cls, data: object) -> object:
        """LOG_LEVEL=INFO and SMTP_SECURITY=STARTTLS mean what they say."""
        if isinstance(data, dict):
            for key in cls.LOWERCASE_CHOICES:
                if isinstance(data.get(key), str):
                    data[key] = data[key].strip().lower() or None
        return data

    @field_validator("database_url")
    @classmethod
    def _url_encoding(cls, value: str) -> str:
        """Refused here, before libpq, which would quote the password in its error."""
        from reactor.engine.startup import url_problem  # local: startup imports db

        if problem := url_problem(value):
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _check_engine(self) -> EngineSettings:
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


def describe(error: ValidationError) -> str:
    """One line naming the variable and the fix; never a secret's value."""
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


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Read and validate the settings of class `cls`.

    Raises:
        ConfigError: with a one-line message naming the variable and the fix.
    """
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None


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
    return load_settings(FeedClientSettings)
