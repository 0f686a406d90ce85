"""The Stripe API, through the `stripe` SDK, configured per call from settings.

Every call builds a `StripeClient` with STRIPE_SECRET_KEY and STRIPE_API_BASE (a local fake in
tests) over the app's pooled `httpx.AsyncClient`, so a call never blocks the event loop and no
global SDK state (`stripe.api_key`, `stripe.api_base`) is read or written. Callers use the SDK's
`*_async` methods inside `call`:

    session = await stripe_client.call(
        state, lambda c: c.v1.checkout.sessions.retrieve_async(session_id)
    )

Stripe's errors become ours:

    stripe.CardError                                -> InvalidRequest 400 (Stripe's decline code)
    stripe.InvalidRequestError, 404                 -> NotFound 404 (no such object at Stripe)
    stripe.InvalidRequestError, IdempotencyError    -> InvalidRequest 400
    any other stripe.StripeError (authentication,
      permission, rate limit, connection, 5xx)      -> UpstreamError 502
    no STRIPE_SECRET_KEY                            -> ServiceUnavailable 503

The SDK retries connection errors, 409 and 5xx answers (MAX_NETWORK_RETRIES) with the same
Idempotency-Key, which it sets on every POST (callers pass their own where a retry of *our*
request must reach the same Stripe object).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NoReturn, Protocol, TypeVar

import httpx
import stripe

from src.config import Settings
from src.errors import GatewayError, InvalidRequest, NotFound, ServiceUnavailable, UpstreamError

logger = logging.getLogger("gatewayz.stripe")

T = TypeVar("T")

MAX_NETWORK_RETRIES = 2
TIMEOUT_SECONDS = 30.0

__all__ = [
    "MAX_NETWORK_RETRIES",
    "HasStripe",
    "call",
    "client",
    "is_configured",
    "key_is_live",
    "plain",
    "translate",
]


class HasStripe(Protocol):
    """What a call needs: the settings and the pooled HTTP client (the app state has both)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def http(self) -> httpx.AsyncClient: ...


class _PooledHTTPClient(stripe.HTTPClient):
    """The SDK's transport over the app's shared httpx client (the app closes it, not the SDK)."""

    name = "httpx"

    def __init__(self, http: httpx.AsyncClient, timeout: float) -> None:
        super().__init__()
        self._http = http
        self._timeout = timeout

    def request(  # type: ignore[override]
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> NoReturn:
        raise RuntimeError("Stripe is called asynchronously only")

    async def request_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> tuple[bytes, int, Mapping[str, str]]:
        try:
            response = await self._http.request(
                method.upper(), url, headers=dict(headers), content=post_data, timeout=self._timeout
            )
        except httpx.HTTPError as exc:
            raise stripe.APIConnectionError(  # type: ignore[no-untyped-call]
                f"Could not reach Stripe ({type(exc).__name__}).", should_retry=True
            ) from exc
        return response.content, response.status_code, response.headers

    def sleep_async(self, secs: float) -> Awaitable[None]:
        return asyncio.sleep(secs)

    def close(self) -> None:
        return None

    async def close_async(self) -> None:
        return None


def is_configured(settings: Settings) -> bool:
    return settings.stripe_secret_key is not None and bool(settings.stripe_secret_key.get_secret_value())


def key_is_live(settings: Settings) -> bool:
    """True for a live-mode key (sk_live_/rk_live_): events must then say livemode true."""
    if settings.stripe_secret_key is None:
        return False
    return "_live_" in settings.stripe_secret_key.get_secret_value()[:8]


def client(settings: Settings, http: httpx.AsyncClient) -> stripe.StripeClient:
    """A client for one call (or one unit of work), with the key and API base of `settings`."""
    if not is_configured(settings):
        raise ServiceUnavailable(
            "Payments are not configured on this server.", code="payments_not_configured"
        )
    assert settings.stripe_secret_key is not None
    base = settings.stripe_api_base.rstrip("/") if settings.stripe_api_base else None
    return stripe.StripeClient(
        settings.stripe_secret_key.get_secret_value(),
        base_addresses={"api": base} if base else None,
        http_client=_PooledHTTPClient(http, TIMEOUT_SECONDS),
        max_network_retries=MAX_NETWORK_RETRIES,
    )


async def call(holder: HasStripe, run: Callable[[stripe.StripeClient], Awaitable[T]]) -> T:
    """Run `run` with a configured client; Stripe's errors are raised as ours (see the module doc)."""
    sdk = client(holder.settings, holder.http)
    try:
        return await run(sdk)
    except stripe.StripeError as exc:
        raise translate(exc) from exc


def translate(exc: stripe.StripeError) -> GatewayError:
    """Our error for a Stripe error; the reason is logged, never a key or a raw body."""
    code = getattr(exc, "code", None)
    logger.warning(
        "Stripe call failed: %s (status %s, code %s, request %s)",
        type(exc).__name__,
        exc.http_status,
        code,
        exc.request_id,
    )
    if isinstance(exc, stripe.CardError):
        return InvalidRequest(
            exc.user_message or "The card was declined.", param=exc.param, code=code or "card_declined"
        )
    if isinstance(exc, stripe.InvalidRequestError):
        if exc.http_status == 404:
            return NotFound(exc.user_message or "No such object at Stripe.", code=code or "resource_missing")
        return InvalidRequest(
            exc.user_message or "Stripe refused the request.",
            param=exc.param,
            code=code or "stripe_invalid_request",
        )
    if isinstance(exc, stripe.IdempotencyError):
        return InvalidRequest(
            "Stripe refused a repeated request that differs from the first.", code="stripe_idempotency_error"
        )
    return UpstreamError("The payment provider could not be reached or failed.", code="stripe_error")


def plain(value: Any) -> dict[str, Any]:
    """A Stripe object as plain dicts and lists."""
    if isinstance(value, stripe.StripeObject):
        return value.to_dict()
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"not a Stripe object: {type(value).__name__}")
