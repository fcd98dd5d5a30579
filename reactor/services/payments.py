"""Payment providers: YooKassa (v3 REST API over httpx) and `manual` (no calls).

Only the provider's API answer ever changes a payment; a webhook body is a
hint to ask. Failures are classified for the failure policy: 5xx, timeouts
and connection errors retry; 401/403 is a configuration error (retried, so
fixing the keys resumes the work); 404 is permanent.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, Protocol

import httpx

from reactor.config import ConfigError, Settings
from reactor.errors import PermanentError, RetryableError

__all__ = ["ManualProvider", "PaymentProvider", "ProviderPayment", "YooKassaProvider",
           "open_provider"]

ProviderStatus = Literal["pending", "waiting_for_capture", "succeeded", "canceled"]
TIMEOUT = httpx.Timeout(15.0, connect=5.0)


@dataclass(frozen=True)
class ProviderPayment:
    """The provider's view of a payment (or of a refund)."""

    id: str
    status: ProviderStatus
    reason: str | None = None


class PaymentProvider(Protocol):
    async def get(self, payment_id: str) -> ProviderPayment: ...
    async def capture(self, payment_id: str, amount: Decimal, currency: str,
                      idempotence_key: str) -> ProviderPayment: ...
    async def refund(self, payment_id: str, amount: Decimal, currency: str,
                     idempotence_key: str) -> ProviderPayment: ...
    async def aclose(self) -> None: ...


class ManualProvider:
    """For the dev stack and demos: payments are confirmed by hand, nothing is called."""

    async def get(self, payment_id: str) -> ProviderPayment:
        return ProviderPayment(payment_id, "succeeded")

    async def capture(self, payment_id: str, amount: Decimal, currency: str,
                      idempotence_key: str) -> ProviderPayment:
        return ProviderPayment(payment_id, "succeeded")

    async def refund(self, payment_id: str, amount: Decimal, currency: str,
                     idempotence_key: str) -> ProviderPayment:
        return ProviderPayment(f"refund-{payment_id}", "succeeded")

    async def aclose(self) -> None:
        return None


def _cancellation(body: dict[str, Any]) -> str | None:
    details = body.get("cancellation_details")
    if isinstance(details, dict):
        return ": ".join(str(details[k]) for k in ("party", "reason") if details.get(k))
    return None


class YooKassaProvider:
    """https://yookassa.ru/developers/api — GET /payments/{id}, POST capture, POST /refunds."""

    def __init__(self, settings: Settings) -> None:
        if not settings.yookassa_shop_id or settings.yookassa_secret_key is None:
            raise ConfigError("PAYMENT_PROVIDER=yookassa needs YOOKASSA_SHOP_ID and "
                              "YOOKASSA_SECRET_KEY: set both, or PAYMENT_PROVIDER=manual")
        self.client = httpx.AsyncClient(
            base_url=settings.yookassa_api_url.rstrip("/"), timeout=TIMEOUT,
            auth=(settings.yookassa_shop_id, settings.yookassa_secret_key.get_secret_value()))

    async def _call(self, method: str, path: str, *, json: dict[str, Any] | None = None,
                    idempotence_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotence-Key": idempotence_key} if idempotence_key else {}
        try:
            response = await self.client.request(method, path, json=json, headers=headers)
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
                                 f"{response.text[:300]}")
        body = response.json()
        if not isinstance(body, dict) or "status" not in body:
            raise RetryableError("YooKassa answered without a status")
        return body

    def _payment(self, body: dict[str, Any]) -> ProviderPayment:
        return ProviderPayment(str(body.get("id")), body["status"], _cancellation(body))

    async def get(self, payment_id: str) -> ProviderPayment:
        return self._payment(await self._call("GET", f"/payments/{payment_id}"))

    async def capture(self, payment_id: str, amount: Decimal, currency: str,
                      idempotence_key: str) -> ProviderPayment:
        body = await self._call("POST", f"/payments/{payment_id}/capture", json={
            "amount": {"value": f"{amount:.2f}", "currency": currency}},
            idempotence_key=idempotence_key)
        return self._payment(body)

    async def refund(self, payment_id: str, amount: Decimal, currency: str,
                     idempotence_key: str) -> ProviderPayment:
        body = await self._call("POST", "/refunds", json={
            "payment_id": payment_id, "amount": {"value": f"{amount:.2f}", "currency": currency}},
            idempotence_key=idempotence_key)
        return self._payment(body)

    async def aclose(self) -> None:
        await self.client.aclose()


def open_provider(settings: Settings) -> PaymentProvider:
    """Raises: ConfigError when the chosen provider lacks its settings."""
    if settings.payment_provider == "yookassa":
        return YooKassaProvider(settings)
    return ManualProvider()
