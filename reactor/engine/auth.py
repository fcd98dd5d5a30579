"""Who may use the live feed and the HTTP port (`Access`); the same rules guard both.

- the `Host` header must name this machine's loopback, FEED_HOST or one of
  FEED_ALLOWED_HOSTS (a DNS-rebinding page sends its own name and is refused);
- a browser (it always sends `Origin`) needs a one-use ticket that the
  dashboard fetched from its own origin (`POST /api/ticket`), or an origin of
  FEED_ALLOWED_ORIGINS; a page of another site gets neither;
- a tool (no `Origin`, e.g. `reactor watch`) presents FEED_TOKEN in an
  `Authorization: Bearer` header when one is set. Without FEED_TOKEN only
  direct loopback connections are served: a request that came through a
  proxy (forwarding headers) or from another address is refused.
The dashboard's API also takes its sign-in cookie (`Access.issue_session`,
`Access.session_ok`), and `check_feed_exposure` refuses at start-up a
FEED_HOST off loopback without a token. The feed (reactor.engine.feed) and the
HTTP port (reactor.engine.web) apply these checks; neither decides on its own.

Signing is itsdangerous' `TimestampSigner` (HMAC-SHA256, the time of signing in the
value, `max_age` checked when read, a time in the future refused): the sign-in
cookie is signed with FEED_TOKEN (it survives a restart and dies when the token
changes; 12 hours), a ticket with a key of this process only, salted with the
page's origin (30 s). What no library does stays here: a ticket opens one
connection (`_TicketBook`, the nonces spent until they expire).

The Host check is written here, not Starlette's `TrustedHostMiddleware`, which
cannot express the rules of docs/operations.md: it guards every route of the app
it wraps, where /healthz and /webhooks/* answer any name; it refuses with a
plain-text 400 "Invalid host header", where the rule is 421 naming the fix
(FEED_ALLOWED_HOSTS); it compares the name as sent (`[::1]` with its brackets,
`localhost.` with its dot), where `host_name` normalises both; and the feed's
websocket handshake is served by trio-websocket, not Starlette, so the check
would be written twice. Starlette's `SessionMiddleware` is not the sign-in
cookie either: its Secure flag is fixed when the app is built, where the
cookie's follows each request's scheme (`https`, or `X-Forwarded-Proto` from a
proxy), and it keys every session with one secret given at build time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from itsdangerous import BadSignature, TimestampSigner

from reactor.engine.settings import ConfigError

if TYPE_CHECKING:
    from reactor.engine.settings import EngineSettings

__all__ = ["FORWARDING_HEADERS", "LOOPBACK_NAMES", "SESSION_TTL_S", "TICKET_TTL_S", "Access",
           "Refusal", "check_feed_exposure", "host_name", "is_loopback", "origin_host",
           "token_ok"]

TICKET_TTL_S = 30.0     # a dashboard ticket opens one websocket within this time
SESSION_TTL_S = 12 * 3600.0
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# Any of these means a proxy forwarded the request: "loopback" no longer means "local".
FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
                      "x-real-ip", "via")


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_feed_exposure(host: str, token: str | None) -> None:
    """Without a token the feed (and the dashboard's API) stays on loopback.

    Raises:
        ConfigError: naming FEED_HOST and FEED_TOKEN.
    """
    if not token and not is_loopback(host):
        raise ConfigError(f"FEED_HOST={host} would expose the event feed without a token: "
                          "set FEED_TOKEN, or keep FEED_HOST=127.0.0.1")


def token_ok(expected: str | None, headers: Mapping[str, str]) -> bool:
    """`Authorization: Bearer …`, compared in constant time (never from the URL)."""
    if not expected:
        return True
    auth = headers.get("authorization", "")
    given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    return hmac.compare_digest(given.encode(), expected.encode())


def host_name(host_header: str) -> str:
    """`Host: Example.org:8766` → `example.org`; `[::1]:8766` → `::1`."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def origin_host(origin: str) -> str:
    """`http://127.0.0.1:8766` → `127.0.0.1:8766` (what that page sends as Host)."""
    return urlsplit(origin).netloc.lower()


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: an HTTP status and one line naming the fix."""

    status: int
    message: str


@dataclass
class _TicketBook:
    """Used ticket nonces until they expire: a ticket opens one connection."""

    used: dict[str, float] = field(default_factory=dict)

    def spend(self, nonce: str, expires: float) -> bool:
        now = time.time()
        for key in [k for k, exp in self.used.items() if exp < now]:
            del self.used[key]
        if nonce in self.used:
            return False
        self.used[nonce] = expires
        return True


# Tickets live seconds and never leave this process: a per-process key is enough. A
# fork (a pre-forking supervisor, the test suite's warm interpreter) makes a key of its
# own, so that a ticket one process issued is refused by another, forked or not.
_TICKET_KEY = secrets.token_bytes(32)


def _new_ticket_key() -> None:
    global _TICKET_KEY
    _TICKET_KEY = secrets.token_bytes(32)


os.register_at_fork(after_in_child=_new_ticket_key)
_TICKETS = _TicketBook()
# What a sign-in cookie carries besides its time and signature (it names no one).
_SESSION_VALUE = b"dashboard"


def _ticket_signer(origin: str) -> TimestampSigner:
    """Signs tickets for pages of `origin` only (the origin is the salt)."""
    return TimestampSigner(_TICKET_KEY, salt="reactor-feed-ticket|" + origin.lower(),
                           digest_method=hashlib.sha256)


@dataclass(frozen=True)
class Access:
    """Who may use the feed and the HTTP port (see the module docstring)."""

    token: str | None = None
    hosts: frozenset[str] = LOOPBACK_NAMES
    origins: frozenset[str] = frozenset()
    max_connections: int = 100
    handshake_timeout_s: float = 5.0

    @classmethod
    def default(cls, host: str, token: str | None) -> Access:
        """Loopback names and the bound host (when it is a name, not a wildcard)."""
        return cls(token=token, hosts=LOOPBACK_NAMES | _bound_host(host))

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> Access:
        token = settings.feed_token.get_secret_value() if settings.feed_token else None
        return cls(token=token,
                   hosts=LOOPBACK_NAMES | _bound_host(settings.feed_host)
                   | frozenset(settings.feed_allowed_hosts_list),
                   origins=frozenset(settings.feed_allowed_origins_list),
                   max_connections=settings.feed_max_connections,
                   handshake_timeout_s=settings.feed_handshake_timeout_s)

    # -- the checks ------------------------------------------------------------------
    def host_refusal(self, headers: Mapping[str, str]) -> Refusal | None:
        """A Host this service does not answer to (DNS rebinding, a stray proxy)."""
        host = headers.get("host")
        if not host:
            return Refusal(400, "the request has no Host header")
        name = host_name(host)
        if name in self.hosts:
            return None
        return Refusal(421, f"Host {name!r} is not one of this reactor's names: "
                            "add it to FEED_ALLOWED_HOSTS (and set FEED_TOKEN)")

    @staticmethod
    def proxied(headers: Mapping[str, str], peer: str | None) -> bool:
        """Came through a proxy or from another machine: loopback trust does not apply."""
        if any(h in headers for h in FORWARDING_HEADERS):
            return True
        return peer is not None and not is_loopback(peer)

    def needs_token(self, headers: Mapping[str, str], peer: str | None) -> bool:
        return bool(self.token) or self.proxied(headers, peer)

    def tool_refusal(self, headers: Mapping[str, str], peer: str | None) -> Refusal | None:
        """A caller that is not a browser page: FEED_TOKEN when set, else direct loopback."""
        if self.token:
            if token_ok(self.token, headers):
                return None
            return Refusal(401, "missing or wrong token: send FEED_TOKEN as "
                                "'Authorization: Bearer <token>'")
        if self.proxied(headers, peer):
            return Refusal(403, "this request came through a proxy or from another host: "
                                "set FEED_TOKEN on the reactor and present it")
        return None

    def origin_allowed(self, origin: str) -> bool:
        return origin.rstrip("/").lower() in {o.rstrip("/").lower() for o in self.origins}

    # -- tickets (feed) and sessions (dashboard cookie) ----------------------------------
    def issue_ticket(self, origin: str) -> str:
        """A one-use pass for one websocket from a page of `origin`."""
        return _ticket_signer(origin).sign(secrets.token_urlsafe(12)).decode()

    def spend_ticket(self, ticket: str, origin: str) -> bool:
        """Valid, unexpired, issued to this origin, and not used before."""
        try:
            nonce, signed_at = _ticket_signer(origin).unsign(
                ticket, max_age=int(TICKET_TTL_S), return_timestamp=True)
        except BadSignature:  # forged, for another origin, expired, or malformed
            return False
        # itsdangerous counts the age in whole seconds and passes `age <= max_age`: the
        # signature holds until the second after the TTL, and so must the memory of its use.
        return _TICKETS.spend(nonce.decode(), signed_at.timestamp() + int(TICKET_TTL_S) + 1)

    def _session_signer(self) -> TimestampSigner:
        # Keyed by the token: sessions survive a restart and die when the token changes.
        return TimestampSigner(self.token or "", salt="reactor-dashboard-session",
                               digest_method=hashlib.sha256)

    def issue_session(self) -> str:
        return self._session_signer().sign(_SESSION_VALUE).decode()

    def session_ok(self, cookie: str | None) -> bool:
        if not cookie or not self.token:
            return False
        try:
            value = self._session_signer().unsign(cookie, max_age=int(SESSION_TTL_S))
        except BadSignature:  # forged, signed with another token, expired, or malformed
            return False
        return hmac.compare_digest(value, _SESSION_VALUE)

    # -- the feed handshake -----------------------------------------------------------------
    def feed_refusal(self, headers: Mapping[str, str], query: Mapping[str, str],
                     peer: str | None) -> Refusal | None:
        """Everything a websocket handshake on the feed port must pass."""
        if "token" in query:
            return Refusal(400, "the token does not belong in the URL: send it as "
                                "'Authorization: Bearer <token>' (reactor watch does)")
        refusal = self.host_refusal(headers)
        if refusal is not None:
            return refusal
        origin = headers.get("origin")
        if origin is None:
            return self.tool_refusal(headers, peer)
        # A browser. The dashboard's page brings a ticket bound to its own origin.
        ticket = query.get("ticket")
        if ticket is not None:
            if self.spend_ticket(ticket, origin):
                return None
            return Refusal(403, "the ticket is expired, used or not for this page: "
                                "reload the dashboard")
        if self.origin_allowed(origin) and not self.needs_token(headers, peer):
            return None
        return Refusal(403, f"pages of origin {origin!r} may not read the feed: open the "
                            "reactor's dashboard, or add the origin to FEED_ALLOWED_ORIGINS")


def _bound_host(host: str) -> frozenset[str]:
    name = host.strip("[]").lower()
    try:
        if ipaddress.ip_address(name).is_unspecified:
            return frozenset()
    except ValueError:
        pass
    return frozenset({name}) if name else frozenset()
