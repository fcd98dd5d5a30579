"""Delivers one webhook: a signed POST to the subscriber, on the delivery rules of the
README (Standard Webhooks signing, a stable webhook-id, Retry-After, SSRF refusal,
a bound per endpoint).

The target's host is resolved once per delivery, every address is checked, and the
request goes to the address that was checked (the Host header and TLS name stay the
subscriber's): a name that resolves to a public address at the check and a private
one at the connect (DNS rebinding) cannot slip through.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import SplitResult, urlsplit

import httpx
import trio
from pydantic import Field
from standardwebhooks import Webhook

from reactor.engine import Context, Job, MessageModel, PermanentError, Processor, RetryableError
from reactor.engine.errors import Deferred
from webhooks.settings import WebhookSettings

__all__ = ["Delivery", "WebhookSender", "retry_after_s"]

# Statuses that say "not now" rather than "never" (RFC 9110: 408, 429; 5xx).
RETRIED = frozenset({408, 429})
# What of a refusal's body goes into the dead letter.
BODY_SHOWN = 200
# What is read of any answer at most (a subscriber's body is untrusted input).
BODY_READ_MAX = 64 * 1024
# Seconds before a delivery whose endpoint is at its bound is tried again.
BUSY_RETRY_S = 1


class Delivery(MessageModel):
    subscription_id: int
    webhook_id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.-]+$")
    type: str = Field(min_length=1, max_length=200)
    timestamp: str
    data: Any = None


def retry_after_s(value: str | None, now: datetime | None = None) -> int | None:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP-date); None if
    absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,9}", value):
        return int(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0, int((when - (now or datetime.now(UTC))).total_seconds()))


# IPv6 prefixes that carry an IPv4 address to somewhere else (NAT64, 6to4, IPv4-compatible
# and -translated): behind a NAT64 gateway 64:ff9b::a00:1 reaches 10.0.0.1.
_EMBEDS_IPV4 = tuple(ipaddress.ip_network(n) for n in (
    "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "::/96", "::ffff:0:0:0/96"))


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif any(ip in net for net in _EMBEDS_IPV4):
            return False
    return ip.is_global and not ip.is_multicast


def _why(exc: BaseException) -> str:
    """An httpx error's text, or its cause's (a failed TLS check says nothing itself)."""
    return str(exc) or repr(exc.__cause__ or exc.__context__ or exc)


class WebhookSender(Processor[Delivery]):
    """POSTs each delivery, signed, to its subscription's URL."""

    model = Delivery

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.hooks: WebhookSettings = ctx.settings  # type: ignore[assignment]
        self._endpoints: dict[tuple[str, str, int], trio.Semaphore] = {}
        self._clients: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        # No redirects (a 3xx could lead anywhere, past the address check); no proxies from
        # the environment. Connections go to the checked address, so httpx pools them by
        # address: over https a pooled connection, its certificate checked for one name,
        # would carry another name's deliveries unchecked. https keeps none (a new TLS
        # session, checked for its own name, each time); plain http has no name to check.
        timeout = httpx.Timeout(self.hooks.webhook_timeout_s)
        async with (httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                      timeout=timeout) as http_client,
                    httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=timeout,
                                      limits=httpx.Limits(max_keepalive_connections=0)
                                      ) as https_client):
            self._clients = {"http": http_client, "https": https_client}
            try:
                yield
            finally:
                self._clients = {}

    async def handle(self, job: Job[Delivery]) -> None:
        delivery = job.message
        url, secret = await self._subscription(delivery.subscription_id)
        target = urlsplit(url)
        try:
            port = target.port or (443 if target.scheme == "https" else 80)
            signer = Webhook(secret)
        except ValueError as exc:  # a port out of range, a secret that is not base64
            raise PermanentError(f"subscription {delivery.subscription_id} cannot be used: "
                                 f"{type(exc).__name__}: {exc}") from None
        endpoint = (target.scheme, (target.hostname or "").rstrip(".").lower(), port)
        bound = self._endpoints.setdefault(endpoint,
                                           trio.Semaphore(self.hooks.webhook_per_endpoint))
        try:
            bound.acquire_nowait()
        except trio.WouldBlock:
            # The endpoint has its share in flight: give the slot back to other endpoints.
            # Deferred: not a failure and not done (deleted, not archived; job.deferred).
            raise Deferred(f"{endpoint[1]}:{endpoint[2]} is at its bound of "
                           f"{self.hooks.webhook_per_endpoint} deliveries", BUSY_RETRY_S) \
                from None
        try:
            addresses = await self._checked_addresses(target)
            await self._post(delivery, target, addresses, signer)
        finally:
            bound.release()

    async def _subscription(self, subscription_id: int) -> tuple[str, str]:
        rows = await self.db.run(lambda c: c.execute(
            "SELECT url, secret, active FROM webhooks.subscriptions WHERE id = %s",
            (subscription_id,)).fetchall())
        if not rows:
            raise PermanentError(f"subscription {subscription_id} does not exist")
        url, secret, active = rows[0]
        if not active:
            raise PermanentError(f"subscription {subscription_id} is disabled")
        return str(url), str(secret)

    async def _checked_addresses(self, target: SplitResult) -> list[str]:
        """The addresses to connect to, in the resolver's order (RFC 6724's preference),
        every one of them checked (SSRF)."""
        if target.scheme not in ("http", "https") or not target.hostname:
            raise PermanentError(f"not an http(s) URL: {target.geturl()[:200]}")
        try:
            infos = await trio.socket.getaddrinfo(target.hostname, target.port or None,
                                                  type=socket.SOCK_STREAM)
        except OSError as exc:
            raise RetryableError(f"cannot resolve {target.hostname}: {exc}",
                                 outage=True) from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise RetryableError(f"{target.hostname} has no address", outage=True)
        private = [a for a in addresses if not _is_public(a)]
        if private and not self.hooks.webhook_allow_private:
            raise PermanentError(f"{target.hostname} resolves to a non-public address "
                                 f"({', '.join(private)}): refused (set "
                                 "WEBHOOK_ALLOW_PRIVATE=true for a subscriber inside your "
                                 "network)")
        return addresses

    async def _post(self, delivery: Delivery, target: SplitResult, addresses: list[str],
                    signer: Webhook) -> None:
        """POST to the first address that takes the connection (a dual-stack name on a
        host without IPv6 route falls back to IPv4), all of it within WEBHOOK_TIMEOUT_S."""
        client = self._clients.get(target.scheme)
        assert client is not None, "used outside running()"
        body = json.dumps({"type": delivery.type, "timestamp": delivery.timestamp,
                           "data": delivery.data}, ensure_ascii=False,
                          separators=(",", ":")).encode()
        now = datetime.now(UTC)
        headers = {
            "content-type": "application/json",
            "webhook-id": delivery.webhook_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signer.sign(delivery.webhook_id, now, body),
            "host": target.netloc.rpartition("@")[2],
            "user-agent": "reactor-webhooks",
        }
        limit = self.hooks.webhook_timeout_s
        last: Exception | None = None
        with trio.move_on_after(limit) as whole:
            for address in addresses:
                host = f"[{address}]" if ":" in address else address
                pinned = target._replace(netloc=f"{host}:{target.port}" if target.port
                                         else host)
                try:
                    async with client.stream(
                            "POST", pinned.geturl(), content=body, headers=headers,
                            extensions={"sni_hostname": target.hostname}) as response:
                        # A 2xx is all we need to know: its body is not read.
                        answer = b"" if response.is_success else \
                            await self._read_capped(response)
                except httpx.ConnectError as exc:
                    last = exc
                    continue  # the next address of the name, if any
                except httpx.TimeoutException:
                    break
                except httpx.HTTPError as exc:
                    raise RetryableError(f"{target.hostname}: {type(exc).__name__}: "
                                         f"{_why(exc)}", outage=True) from None
                if response.status_code == 410:  # Gone: the subscriber asks for no more
                    await self._disable(delivery.subscription_id,
                                        f"{target.hostname} answered 410")
                self._settle(response, answer, target)
                return
            if last is not None and not whole.cancelled_caught:
                raise RetryableError(f"{target.hostname}: cannot connect "
                                     f"({', '.join(addresses)}): {_why(last)}",
                                     outage=True)
        raise RetryableError(f"{target.hostname} did not answer within {limit:g}s",
                             outage=True)

    async def _disable(self, subscription_id: int, reason: str) -> None:
        await self.db.run(lambda c: c.execute(
            "UPDATE webhooks.subscriptions SET active = false, disabled_reason = %s "
            "WHERE id = %s", (reason, subscription_id)))

    @staticmethod
    async def _read_capped(response: httpx.Response) -> bytes:
        kept = bytearray()
        async for chunk in response.aiter_raw():
            kept += chunk[:BODY_READ_MAX - len(kept)]
            if len(kept) >= BODY_READ_MAX:
                break
        return bytes(kept)

    def _settle(self, response: httpx.Response, answer: bytes, target: SplitResult) -> None:
        code = response.status_code
        if 200 <= code < 300:
            return
        shown = answer[:BODY_SHOWN].decode("utf-8", "replace")
        if code in RETRIED or code >= 500:
            wait = retry_after_s(response.headers.get("retry-after"))
            if wait is not None:
                wait = min(max(wait, 1), self.hooks.webhook_retry_after_max_s)
            raise RetryableError(f"{target.hostname} answered HTTP {code}"
                                 + (f" (Retry-After {wait}s)" if wait is not None else ""),
                                 delay_s=wait)
        if 300 <= code < 400:
            raise PermanentError(f"{target.hostname} answered HTTP {code} (redirects are not "
                                 f"followed: subscribe the final URL) {shown!r}")
        raise PermanentError(f"{target.hostname} refused the delivery: HTTP {code} {shown!r}")
