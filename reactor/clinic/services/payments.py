"""Payment providers: YooKassa's v3 REST API over httpx.

Only the provider's API answer ever changes a payment, and only when it
agrees with our row; a webhook body is a hint to ask. With
PAYMENT_PROVIDER=manual there is no provider object at all (`open_provider`
returns None): nothing is called and nothing is decided.

Failures are classified for the failure policy: 5xx, 429, timeouts and
connection errors retry; 401/403 is a configuration error (retried, so
fixing the keys resumes the work); 404 and other 4xx are permanent.
Provider ids are checked against YooKassa's id format and URL-quoted before
they go into a path, so an id taken from a row or a notification can never
point a request at another endpoint. Text taken from a provider answer goes
into errors only through `shown` (no control characters, no lone surrogates,
bounded length).

Each refund we create carries its operation's Idempotence-Key in
`metadata.reactor_operation`, so that `find_refund` can tell, after the
provider has forgotten the key (24 h), whether that refund was ever made.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, Protocol, cast, get_args
from urllib.parse import quote

from reactor.clinic.settings import ConfigError, PaymentSettings
from reactor.engine.errors import PermanentError, RetryableError

__all__ = ["PaymentProvider", "ProviderObject", "YooKassaProvider", "check_yookassa_id",
           "open_provider", "shown"]

ProviderStatus = Literal["pending", "waiting_for_capture", "succeeded", "canceled"]
# httpx's timeouts: 15 s a request, 5 s to connect.
TIMEOUT_S, CONNECT_TIMEOUT_S = 15.0, 5.0
# YooKassa payment and refund ids: 36 characters, UUID-shaped (e.g.
# 2d8d0ecb-000f-5000-9000-1b68e7b15f3f).
YOOKASSA_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}"
                         r"-[0-9a-fA-F]{12}")
OPERATION_KEY = "reactor_operation"  # refunds' metadata: the operation's Idempotence-Key
REFUND_PAGE = 100  # GET /refunds?limit= (YooKassa's maximum)
REFUND_PAGES_MAX = 20  # a payment with more refunds than this is not one of ours


def shown(value: object, limit: int = 80) -> str:
    """A provider value as it may appear in an error, a log or a status reason:
    as is when short and printable, else quoted with escapes (so a NUL or a lone
    surrogate can never reach a jsonb or text column) and cut to `limit`."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit and text.isprintable():
        return text
    return repr(text[:limit])


@dataclass(frozen=True)
class ProviderObject:
    """The provider's view of a payment or of a refund: what we check against our row."""

    id: str
    status: ProviderStatus
    amount: Decimal | None = None
    currency: str | None = None
    reason: str | None = None
    # Payments: metadata.payment_id (our row id) when the app set it at creation.
    # Refunds: the id of the payment refunded.
    payment_ref: str | None = None
    # Refunds: metadata.reactor_operation, the Idempotence-Key of the refund we asked for.
    operation: str | None = None


class PaymentProvider(Protocol):
    name: str

    async def get(self, payment_id: str) -> ProviderObject: ...
    async def capture(self, payment_id: str, amount: Decimal, currency: str,
                      idempotence_key: str) -> ProviderObject: ...
    async def refund(self, payment_id: str, amount: Decimal, currency: str,
                     idempotence_key: str) -> ProviderObject: ...
    async def get_refund(self, refund_id: str) -> ProviderObject: ...
    async def find_refund(self, payment_id: str, idempotence_key: str) -> ProviderObject | None: ...
    async def aclose(self) -> None: ...


def check_yookassa_id(value: str, what: str = "provider_payment_id") -> str:
    """The id, if it has YooKassa's format.

    Raises:
        PermanentError: naming the value (shortened) and the expected format.
    """
    if not YOOKASSA_ID.fullmatch(value):
        raise PermanentError(f"{what} {value[:80]!r} is not a YooKassa id (expected the "
                             "36-character form 2d8d0ecb-000f-5000-9000-1b68e7b15f3f)")
    return value


def _cancellation(body: dict[str, Any]) -> str | None:
    details = body.get("cancellation_details")
    if isinstance(details, dict):
        return ": ".join(shown(details[k]) for k in ("party", "reason") if details.get(k))
    return None


def _amount(body: dict[str, Any]) -> tuple[Decimal | None, str | None]:
    amount = body.get("amount")
    if not isinstance(amount, dict):
        return None, None
    currency = amount.get("currency")
    try:
        value = Decimal(str(amount.get("value")))
    except InvalidOperation:
        value = None
    return (value if value is not None and value.is_finite() else None,
            currency if isinstance(currency, str) else None)


class YooKassaProvider:
    """https://yookassa.ru/developers/api — payments, capture, refunds."""

    name = "yookassa"

    def __init__(self, settings: PaymentSettings) -> None:
        if not settings.yookassa_shop_id or settings.yookassa_secret_key is None:
            raise ConfigError("PAYMENT_PROVIDER=yookassa needs YOOKASSA_SHOP_ID and "
                              "YOOKASSA_SECRET_KEY: set both, or PAYMENT_PROVIDER=manual")
        # httpx is imported by the provider that uses it, not at start: ~0.1 s of CPU
        # that the default PAYMENT_PROVIDER=manual, and every command, would pay.
        import httpx

        self.client = httpx.AsyncClient(
            base_url=settings.yookassa_api_url.rstrip("/"),
            timeout=httpx.Timeout(TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            auth=(settings.yookassa_shop_id, settings.yookassa_secret_key.get_secret_value()))

    async def _call(self, method: str, path: str, *, json: dict[str, Any] | None = None,
                    idempotence_key: str | None = None, params: dict[str, str] | None = None,
                    listing: bool = False) -> dict[str, Any]:
        import httpx  # loaded by __init__ already

        headers = {"Idempotence-Key": idempotence_key} if idempotence_key else {}
        try:
            response = await self.client.request(method, path, json=json, headers=headers,
                                                 params=params)
        except httpx.TimeoutException as exc:
            raise RetryableError(f"YooKassa timed out: {type(exc).__name__}", outage=True) from None
        except httpx.HTTPError as exc:
            raise RetryableError(f"YooKassa unreachable: {exc}", outage=True) from None
        code = response.status_code
        if code in (401, 403):
            raise RetryableError(f"YooKassa refused our credentials (HTTP {code}): check "
                                 "YOOKASSA_SHOP_ID and YOOKASSA_SECRET_KEY", outage=True)
        if code == 404:
            raise PermanentError(f"YooKassa does not know {path} (HTTP 404)")
        if code == 429 or code >= 500:
            raise RetryableError(f"YooKassa answered HTTP {code}", outage=True)
        if code >= 400:
            raise PermanentError(f"YooKassa rejected {method} {path}: HTTP {code} "
                                 f"{shown(response.text, 300)}")
        try:
            body = response.json()
        except ValueError:
            raise RetryableError(f"YooKassa answered HTTP {code} without JSON") from None
        if not isinstance(body, dict):
            raise RetryableError("YooKassa answered without a JSON object")
        if listing:
            return body
        if body.get("status") not in get_args(ProviderStatus):
            raise RetryableError("YooKassa answered without a known status")
        return body

    def _object(self, body: dict[str, Any], payment_ref: str | None,
                operation: str | None = None) -> ProviderObject:
        amount, currency = _amount(body)
        return ProviderObject(str(body.get("id")), cast(ProviderStatus, body["status"]),
                              amount, currency, _cancellation(body), payment_ref, operation)

    def _refund(self, body: dict[str, Any]) -> ProviderObject:
        ref = body.get("payment_id")
        metadata = body.get("metadata")
        operation = metadata.get(OPERATION_KEY) if isinstance(metadata, dict) else None
        return self._object(body, ref if isinstance(ref, str) else None,
                            operation if isinstance(operation, str) else None)

    def _payment(self, body: dict[str, Any]) -> ProviderObject:
        metadata = body.get("metadata")
        ref = metadata.get("payment_id") if isinstance(metadata, dict) else None
        return self._object(body, str(ref) if ref is not None else None)

    async def get(self, payment_id: str) -> ProviderObject:
        pid = quote(check_yookassa_id(payment_id), safe="")
        return self._payment(await self._call("GET", f"/payments/{pid}"))

    async def capture(self, payment_id: str, amount: Decimal, currency: str,
                      idempotence_key: str) -> ProviderObject:
        pid = quote(check_yookassa_id(payment_id), safe="")
        body = await self._call("POST", f"/payments/{pid}/capture", json={
            "amount": {"value": f"{amount:.2f}", "currency": currency}},
            idempotence_key=idempotence_key)
        return self._payment(body)

    async def refund(self, payment_id: str, amount: Decimal, currency: str,
                     idempotence_key: str) -> ProviderObject:
        body = await self._call("POST", "/refunds", json={
            "payment_id": check_yookassa_id(payment_id),
            "amount": {"value": f"{amount:.2f}", "currency": currency},
            "metadata": {OPERATION_KEY: idempotence_key}},
            idempotence_key=idempotence_key)
        return self._refund(body)

    async def get_refund(self, refund_id: str) -> ProviderObject:
        rid = quote(check_yookassa_id(refund_id, "refund id"), safe="")
        return self._refund(await self._call("GET", f"/refunds/{rid}"))

    async def find_refund(self, payment_id: str, idempotence_key: str) -> ProviderObject | None:
        """The refund of `payment_id` that we created with `idempotence_key`, if any.

        Raises:
            RetryableError: a page could not be read, or our refund came back without
                a known status (never "none" then: that would post it again).
            PermanentError: too many refunds to read them all.
        """
        params = {"payment_id": check_yookassa_id(payment_id), "limit": str(REFUND_PAGE)}
        for _ in range(REFUND_PAGES_MAX):
            page = await self._call("GET", "/refunds", params=params, listing=True)
            items = page.get("items")
            if not isinstance(items, list):
                raise RetryableError("YooKassa listed refunds without `items`")
            for item in items:
                if not isinstance(item, dict):
                    continue
                metadata = item.get("metadata")
                if isinstance(metadata, dict) and metadata.get(OPERATION_KEY) == idempotence_key:
                    if item.get("status") not in get_args(ProviderStatus):
                        raise RetryableError("YooKassa listed our refund without a known status")
                    return self._refund(item)
            cursor = page.get("next_cursor")
            if not isinstance(cursor, str) or not cursor:
                return None
            params = {**params, "cursor": cursor}
        raise PermanentError(f"YooKassa lists more than {REFUND_PAGE * REFUND_PAGES_MAX} "
                             f"refunds of payment {payment_id}: look for the one with "
                             f"metadata.{OPERATION_KEY}={idempotence_key} by hand")

    async def aclose(self) -> None:
        await self.client.aclose()


def open_provider(settings: PaymentSettings) -> PaymentProvider | None:
    """The configured provider; None for `manual` (staff decide, nothing is called).

    Raises: ConfigError when the chosen provider lacks its settings.
    """
    if settings.payment_provider == "yookassa":
        return YooKassaProvider(settings)
    return None
