"""A fake of the Stripe API on a real socket, for the real `stripe` SDK, and signed webhook events.

`FakeStripe` serves, on 127.0.0.1 (uvicorn in a thread, like the other fakes), what the gateway
calls, form-encoded the way the SDK sends it (``metadata[user_id]=...``, ``line_items[0][...]``)
and answered with Stripe-shaped JSON objects kept in memory::

    POST   /v1/customers                      GET /v1/customers/{id}
    POST   /v1/checkout/sessions              (mode payment or subscription)
    GET    /v1/checkout/sessions              (?payment_intent=, ?customer=, ?limit=)
    GET    /v1/checkout/sessions/{id}         POST /v1/checkout/sessions/{id}/expire
    GET    /v1/payment_intents/{id}           GET  /v1/charges/{id}
    POST   /v1/refunds                        GET  /v1/refunds/{id}
    GET    /v1/subscriptions/{id}             POST /v1/subscriptions/{id} (items[i][id|price],
           proration_behavior, cancel_at_period_end, metadata)
    DELETE /v1/subscriptions/{id}             (cancel now)
    GET    /v1/invoices/{id}                  GET  /v1/prices/{id}

`expand[]` inlines the named id fields (``payment_intent``, ``subscription``, ``invoice``,
``customer``, ``latest_invoice``, ``charge``). Errors use Stripe's body
``{"error": {"type", "code", "message", "param", "decline_code"}}`` and status (400 invalid,
401 bad key, 402 card, 404 missing, 5xx); every answer carries a ``Request-Id``. A POST's
``Idempotency-Key`` replays the first answer (``Idempotent-Replayed: true``); the same key with
other parameters is a 400 ``idempotency_error``, as at Stripe. Keys must look like Stripe keys
(``sk_``/``rk_``); objects made with a live key say ``livemode: true``.

Test-side helpers (thread-safe; each returns the object as Stripe would now show it and appends
the webhook events Stripe would send, in Stripe's order, to `events`):

    add_price(unit_amount=..., interval="month") -> price   a recurring price for subscriptions
    pay_session(id, async_payment=False)        payment mode: payment intent + charge (+ invoice
        when invoice_creation was asked), events charge.succeeded, payment_intent.succeeded,
        checkout.session.completed (payment_status "paid"), invoice.paid; with async_payment the
        session completes "unpaid" (payment_intent.processing, checkout.session.completed) until
        complete_async_payment(id) (-> ..., checkout.session.async_payment_succeeded) or
        fail_async_payment(id) (-> payment_intent.payment_failed,
        checkout.session.async_payment_failed).
        subscription mode: customer, subscription (active, one period), its first invoice
        (billing_reason subscription_create) paid by a payment intent and charge that carry no
        metadata of ours; events customer.subscription.created, charge.succeeded,
        payment_intent.succeeded, invoice.paid, checkout.session.completed.
    expire_session(id)                          checkout.session.expired
    refund(charge_id, amount=None)              what POST /v1/refunds does (charge.refunded,
                                                refund.created)
    dispute(charge_id, amount=None) / close_dispute(id, status="won"|"lost")
                                                charge.dispute.created / charge.dispute.closed
    renew_subscription(id)                      next period: invoice (subscription_cycle) paid,
                                                invoice.paid, customer.subscription.updated
    fail_subscription_payment(id)               invoice.payment_failed, subscription past_due
    make_event(type, obj, livemode=False)       an event around any object (not appended)

Knobs: ``fail(status=..., type=..., code=..., message=..., times=1, method=None, path=None)``
makes the next matching request(s) fail (e.g. 402 ``card_error``, 500 ``api_error``).
Observation: `requests` (method, path, decoded params, Idempotency-Key, API key, replayed),
`requests_to(method, path)`, `events`, `events_of(type)`, `get(id)`. `reset()` clears all.

Webhooks: ``signed_event(payload, secret, timestamp=None)`` -> (raw body, headers) with a
``Stripe-Signature`` computed as Stripe does (HMAC-SHA256 over ``"{t}.{body}"``), for POSTing
to a webhook endpoint; pass a dict (serialised once, compactly) or the exact bytes to sign.
``await post_event(client, event, path="/api/stripe/webhook")`` signs and POSTs one.

In tests: the `stripe_fake` fixture (a session-wide server, reset around each test) and
`fake.settings_overrides()` (STRIPE_SECRET_KEY, STRIPE_WEBHOOK_SECRET, STRIPE_API_BASE)::

    from tests.fakes import stripe_api

    stripe_fake_server = stripe_api.stripe_fake_server  # the fixtures, made visible to the module
    stripe_fake = stripe_api.stripe_fake

    @pytest.fixture
    def settings_overrides(stripe_fake_server: FakeStripe) -> dict[str, Any]:
        return stripe_fake_server.settings_overrides()
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from tests.fakes.live_server import LiveServer, ServedFake

__all__ = [
    "API_KEY",
    "API_VERSION",
    "WEBHOOK_SECRET",
    "FakeStripe",
    "RecordedRequest",
    "StripeFault",
    "decode_form",
    "post_event",
    "signed_event",
    "stripe_fake",
    "stripe_fake_server",
]

API_KEY = "sk_test_fake_" + "k" * 32
LIVE_API_KEY = "sk_live_fake_" + "k" * 32
WEBHOOK_SECRET = "whsec_fake_" + "w" * 32
API_VERSION = "2026-10-28.endive"
PERIOD_SECONDS = 30 * 24 * 3600
EXPANDABLE = ("payment_intent", "subscription", "invoice", "customer", "latest_invoice", "charge")
_ID_PREFIX = {
    "customer": "cus",
    "checkout.session": "cs_test",
    "payment_intent": "pi",
    "charge": "ch",
    "refund": "re",
    "subscription": "sub",
    "subscription_item": "si",
    "invoice": "in",
    "line_item": "il",
    "price": "price",
    "dispute": "dp",
    "event": "evt",
}


# -- webhooks --------------------------------------------------------------------------------


def signed_event(
    payload: dict[str, Any] | str | bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """The raw body and headers (Stripe-Signature, Content-Type) of a webhook delivery."""
    if isinstance(payload, dict):
        body = json.dumps(payload, separators=(",", ":")).encode()
    elif isinstance(payload, str):
        body = payload.encode()
    else:
        body = payload
    stamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return body, {"Stripe-Signature": f"t={stamp},v1={digest}", "Content-Type": "application/json"}


# -- form decoding ---------------------------------------------------------------------------

_SEGMENT = re.compile(r"\[([^\[\]]*)\]")


def _listify(value: Any) -> Any:
    if isinstance(value, dict):
        value = {key: _listify(item) for key, item in value.items()}
        if value and all(key.isdigit() for key in value):
            return [value[key] for key in sorted(value, key=int)]
    return value


def decode_form(text: str) -> dict[str, Any]:
    """Stripe's form encoding (``a[b][0][c]=1``) as nested dicts and lists of strings."""
    root: dict[str, Any] = {}
    for key, value in parse_qsl(text, keep_blank_values=True):
        head = key.split("[", 1)[0]
        parts = [head, *_SEGMENT.findall(key[len(head) :])]
        node = root
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    decoded: dict[str, Any] = _listify(root)
    return decoded


# -- the fake --------------------------------------------------------------------------------


class StripeApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        decline_code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"type": type, "message": message}
        for name, value in (("code", code), ("param", param), ("decline_code", decline_code)):
            if value is not None:
                self.body[name] = value


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    params: dict[str, Any]
    idempotency_key: str | None
    api_key: str | None
    replayed: bool = False


@dataclass
class StripeFault:
    status: int
    type: str = "api_error"
    code: str | None = None
    message: str = "The fake Stripe is failing on purpose."
    decline_code: str | None = None
    times: int = 1
    method: str | None = None
    path: str | None = None

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method.upper() == method) and (
            self.path is None or path.startswith(self.path)
        )


def _missing(kind: str, object_id: str, param: str = "id") -> StripeApiError:
    return StripeApiError(404, f"No such {kind}: '{object_id}'", code="resource_missing", param=param)


def _int(params: dict[str, Any], name: str, *, required: bool = False, minimum: int = 0) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        if required:
            raise StripeApiError(
                400, f"Missing required param: {name}.", code="parameter_missing", param=name
            )
        return None
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise StripeApiError(
            400, f"Invalid integer: {raw}", code="parameter_invalid_integer", param=name
        ) from None
    if value < minimum:
        raise StripeApiError(
            400,
            f"This value must be greater than or equal to {minimum}.",
            code="parameter_invalid_integer",
            param=name,
        )
    return value


def _bool(value: Any) -> bool:
    return str(value).lower() == "true"


def _metadata(value: Any) -> dict[str, str]:
    if value in (None, ""):
        return {}
    if not isinstance(value, dict):
        raise StripeApiError(
            400, "Invalid metadata: must be a hash.", code="parameter_invalid", param="metadata"
        )
    return {str(k): str(v) for k, v in value.items() if v != ""}


@dataclass
class FakeStripe(ServedFake):
    api_key: str = API_KEY
    webhook_secret: str = WEBHOOK_SECRET
    _objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    # What Stripe keeps but does not show: a session's payment_intent_data and subscription_data.
    _private: dict[str, dict[str, Any]] = field(default_factory=dict)
    _requests: list[RecordedRequest] = field(default_factory=list)
    _events: list[dict[str, Any]] = field(default_factory=list)
    _idempotent: dict[tuple[str, str], tuple[str, str, dict[str, Any], int, Any]] = field(
        default_factory=dict
    )
    _faults: list[StripeFault] = field(default_factory=list)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _server: LiveServer | None = None

    # -- configuration -----------------------------------------------------------------------

    def settings_overrides(self, **extra: Any) -> dict[str, Any]:
        """The gateway settings that point it at this fake (plus any `extra`)."""
        return {
            "stripe_secret_key": self.api_key,
            "stripe_webhook_secret": self.webhook_secret,
            "stripe_api_base": self.url,
            **extra,
        }

    def reset(self) -> None:
        with self._lock:
            self._objects.clear()
            self._private.clear()
            self._requests.clear()
            self._events.clear()
            self._idempotent.clear()
            self._faults.clear()

    # -- observation -------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_to(self, method: str, path: str) -> list[RecordedRequest]:
        """Requests with this method whose path is `path` or starts with it followed by '/'."""
        return [
            r
            for r in self.requests
            if r.method == method.upper() and (r.path == path or r.path.startswith(path.rstrip("/") + "/"))
        ]

    @property
    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._events)

    def events_of(self, type: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["type"] == type]

    def get(self, object_id: str) -> dict[str, Any]:
        with self._lock:
            if object_id not in self._objects:
                raise KeyError(object_id)
            return copy.deepcopy(self._objects[object_id])

    def objects_of(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [copy.deepcopy(o) for o in self._objects.values() if o["object"] == kind]

    # -- knobs -------------------------------------------------------------------------------

    def fail(
        self,
        *,
        status: int,
        type: str = "api_error",
        code: str | None = None,
        message: str = "The fake Stripe is failing on purpose.",
        decline_code: str | None = None,
        times: int = 1,
        method: str | None = None,
        path: str | None = None,
    ) -> None:
        """The next `times` requests matching `method` and `path` (a prefix) fail with this error."""
        with self._lock:
            self._faults.append(StripeFault(status, type, code, message, decline_code, times, method, path))

    # -- building objects --------------------------------------------------------------------

    def _id(self, kind: str) -> str:
        return f"{_ID_PREFIX[kind]}_{secrets.token_hex(12)}"

    def _store(self, obj: dict[str, Any]) -> dict[str, Any]:
        self._objects[obj["id"]] = obj
        return obj

    def _find(self, object_id: str, kind: str, param: str = "id") -> dict[str, Any]:
        obj = self._objects.get(object_id)
        if obj is None or obj["object"] != kind:
            raise _missing(
                kind.replace("_", " ").replace("checkout.session", "checkout session"), object_id, param
            )
        return obj

    def make_event(
        self, type: str, obj: dict[str, Any], *, livemode: bool | None = None, **extra: Any
    ) -> dict[str, Any]:
        """An event around a snapshot of `obj`, as Stripe would deliver it."""
        return {
            "id": self._id("event"),
            "object": "event",
            "api_version": API_VERSION,
            "created": int(time.time()),
            "data": {"object": copy.deepcopy(obj), **extra},
            "livemode": obj.get("livemode", False) if livemode is None else livemode,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": type,
        }

    def _emit(self, type: str, obj: dict[str, Any], **extra: Any) -> None:
        self._events.append(self.make_event(type, obj, **extra))

    def add_price(
        self,
        *,
        unit_amount: int,
        currency: str = "usd",
        interval: str | None = "month",
        price_id: str | None = None,
        product: str = "prod_fake",
    ) -> dict[str, Any]:
        """A price (recurring unless `interval` is None) that checkout and subscriptions may use."""
        with self._lock:
            price = {
                "id": price_id or self._id("price"),
                "object": "price",
                "active": True,
                "currency": currency,
                "unit_amount": unit_amount,
                "product": product,
                "recurring": {"interval": interval, "interval_count": 1} if interval else None,
                "type": "recurring" if interval else "one_time",
                "livemode": False,
                "created": int(time.time()),
            }
            return copy.deepcopy(self._store(price))

    def _customer(self, params: dict[str, Any], livemode: bool) -> dict[str, Any]:
        return self._store(
            {
                "id": self._id("customer"),
                "object": "customer",
                "email": params.get("email") or None,
                "name": params.get("name") or None,
                "metadata": _metadata(params.get("metadata")),
                "created": int(time.time()),
                "livemode": livemode,
            }
        )

    def _line_amount(
        self, item: dict[str, Any], index: int, mode: str
    ) -> tuple[int, str, dict[str, Any] | None]:
        """(amount of the line, currency, the recurring price for subscription mode)."""
        param = f"line_items[{index}]"
        quantity = _int(item, "quantity", required=True, minimum=1) or 1
        if item.get("price"):
            price = self._objects.get(item["price"])
            if price is None or price["object"] != "price":
                raise _missing("price", item["price"], f"{param}[price]")
            if mode == "subscription" and not price["recurring"]:
                raise StripeApiError(
                    400, "A subscription needs at least one recurring price.", param=f"{param}[price]"
                )
            if mode == "payment" and price["recurring"]:
                raise StripeApiError(
                    400, "You must be in subscription mode to use a recurring price.", param=f"{param}[price]"
                )
            return (
                price["unit_amount"] * quantity,
                price["currency"],
                price if mode == "subscription" else None,
            )
        data = item.get("price_data")
        if not isinstance(data, dict):
            raise StripeApiError(400, "Each line item needs a price or price_data.", param=param)
        currency = data.get("currency")
        if not currency:
            raise StripeApiError(
                400,
                "Missing required param: currency.",
                code="parameter_missing",
                param=f"{param}[price_data][currency]",
            )
        if not (data.get("product") or isinstance(data.get("product_data"), dict)):
            raise StripeApiError(
                400, "You must specify either product or product_data.", param=f"{param}[price_data]"
            )
        unit = _int(data, "unit_amount", required=True, minimum=0) or 0
        if mode == "subscription":
            raise StripeApiError(
                400, "Use a recurring price for subscription mode.", param=f"{param}[price_data]"
            )
        return unit * quantity, currency, None

    def _create_session(self, params: dict[str, Any], livemode: bool, base: str) -> dict[str, Any]:
        mode = params.get("mode")
        if mode not in ("payment", "subscription"):
            raise StripeApiError(
                400,
                "Missing required param: mode." if not mode else f"Invalid mode: {mode}",
                code="parameter_missing" if not mode else "parameter_invalid_string",
                param="mode",
            )
        if not params.get("success_url"):
            raise StripeApiError(
                400, "Missing required param: success_url.", code="parameter_missing", param="success_url"
            )
        items = params.get("line_items")
        if not isinstance(items, list) or not items:
            raise StripeApiError(
                400, "Missing required param: line_items.", code="parameter_missing", param="line_items"
            )
        if params.get("customer") and params.get("customer_email"):
            raise StripeApiError(
                400,
                "You may only specify one of these parameters: customer, customer_email.",
                param="customer",
            )
        if params.get("customer"):
            self._find(params["customer"], "customer", "customer")
        invoice_creation = params.get("invoice_creation") or {}
        if invoice_creation and mode != "payment":
            raise StripeApiError(
                400, "invoice_creation can only be used in payment mode.", param="invoice_creation"
            )
        total, currencies, prices = 0, set(), []
        for index, item in enumerate(items):
            amount, currency, price = self._line_amount(item, index, mode)
            total += amount
            currencies.add(currency)
            if price is not None:
                prices.append(price)
        if len(currencies) != 1:
            raise StripeApiError(400, "All line items must use the same currency.", param="line_items")
        if mode == "payment" and total < 50:
            raise StripeApiError(
                400,
                "The Checkout Session's total amount due must add up to at least $0.50 usd",
                code="amount_too_small",
            )
        session_id = f"cs_{'live' if livemode else 'test'}_{secrets.token_hex(24)}"
        now = int(time.time())
        session = {
            "id": session_id,
            "object": "checkout.session",
            "mode": mode,
            "status": "open",
            "payment_status": "unpaid",
            "amount_subtotal": total,
            "amount_total": total,
            "currency": currencies.pop(),
            "customer": params.get("customer") or None,
            "customer_email": params.get("customer_email") or None,
            "client_reference_id": params.get("client_reference_id") or None,
            "metadata": _metadata(params.get("metadata")),
            "success_url": params["success_url"],
            "cancel_url": params.get("cancel_url") or None,
            "url": f"{base}/c/pay/{session_id}",
            "payment_intent": None,
            "subscription": None,
            "invoice": None,
            "invoice_creation": (
                {
                    "enabled": _bool(invoice_creation.get("enabled")),
                    "invoice_data": invoice_creation.get("invoice_data") or {},
                }
                if mode == "payment"
                else None
            ),
            "created": now,
            "expires_at": _int(params, "expires_at") or now + 24 * 3600,
            "livemode": livemode,
        }
        pi_data = params.get("payment_intent_data") or {}
        sub_data = params.get("subscription_data") or {}
        self._private[session_id] = {
            "payment_intent_metadata": _metadata(pi_data.get("metadata")),
            "payment_intent_description": pi_data.get("description"),
            "subscription_metadata": _metadata(sub_data.get("metadata")),
            "prices": [p["id"] for p in prices],
            "line_items": items,
        }
        return self._store(session)

    # -- payments (test helpers) -------------------------------------------------------------

    def _payment_intent(
        self,
        *,
        amount: int,
        currency: str,
        customer: str | None,
        metadata: dict[str, str],
        status: str,
        livemode: bool,
    ) -> dict[str, Any]:
        return self._store(
            {
                "id": self._id("payment_intent"),
                "object": "payment_intent",
                "amount": amount,
                "amount_received": amount if status == "succeeded" else 0,
                "currency": currency,
                "customer": customer,
                "metadata": dict(metadata),
                "status": status,
                "latest_charge": None,
                "created": int(time.time()),
                "livemode": livemode,
            }
        )

    def _charge(self, intent: dict[str, Any], status: str) -> dict[str, Any]:
        # Stripe copies the payment intent's metadata onto the charges it makes.
        charge = self._store(
            {
                "id": self._id("charge"),
                "object": "charge",
                "amount": intent["amount"],
                "amount_captured": intent["amount"] if status == "succeeded" else 0,
                "amount_refunded": 0,
                "currency": intent["currency"],
                "customer": intent["customer"],
                "payment_intent": intent["id"],
                "metadata": dict(intent["metadata"]),
                "paid": status == "succeeded",
                "captured": status == "succeeded",
                "refunded": False,
                "disputed": False,
                "status": status,
                "created": int(time.time()),
                "livemode": intent["livemode"],
            }
        )
        intent["latest_charge"] = charge["id"]
        return charge

    def _invoice(
        self,
        *,
        customer: str | None,
        amount: int,
        currency: str,
        billing_reason: str,
        livemode: bool,
        subscription: dict[str, Any] | None = None,
        price: dict[str, Any] | None = None,
        period: tuple[int, int] | None = None,
        proration: bool = False,
        status: str = "paid",
    ) -> dict[str, Any]:
        now = int(time.time())
        start, end = period or (now, now)
        line: dict[str, Any] = {
            "id": self._id("line_item"),
            "object": "line_item",
            "amount": amount,
            "currency": currency,
            "description": None,
            "period": {"start": start, "end": end},
            "pricing": (
                {
                    "type": "price_details",
                    "price_details": {"price": price["id"], "product": price["product"]},
                }
                if price
                else None
            ),
            "parent": (
                {
                    "type": "subscription_item_details",
                    "subscription_item_details": {
                        "subscription": subscription["id"],
                        "subscription_item": subscription["items"]["data"][0]["id"],
                        "proration": proration,
                    },
                }
                if subscription
                else None
            ),
        }
        invoice = {
            "id": self._id("invoice"),
            "object": "invoice",
            "customer": customer,
            "status": status,
            "billing_reason": billing_reason,
            "amount_due": amount,
            "amount_paid": amount if status == "paid" else 0,
            "amount_remaining": 0 if status == "paid" else amount,
            "currency": currency,
            "parent": (
                {
                    "type": "subscription_details",
                    "subscription_details": {
                        "subscription": subscription["id"],
                        "metadata": dict(subscription["metadata"]),
                    },
                }
                if subscription
                else None
            ),
            "lines": {"object": "list", "data": [line], "has_more": False},
            "period_start": start,
            "period_end": end,
            "metadata": {},
            "created": now,
            "livemode": livemode,
        }
        return self._store(invoice)

    def _pay_invoice(self, invoice: dict[str, Any]) -> dict[str, Any]:
        intent = self._payment_intent(
            amount=invoice["amount_due"],
            currency=invoice["currency"],
            customer=invoice["customer"],
            metadata={},
            status="succeeded",
            livemode=invoice["livemode"],
        )
        charge = self._charge(intent, "succeeded")
        self._emit("charge.succeeded", charge)
        self._emit("payment_intent.succeeded", intent)
        return intent

    def pay_session(self, session_id: str, *, async_payment: bool = False) -> dict[str, Any]:
        """The customer completes the checkout (see the module doc for the events)."""
        with self._lock:
            session = self._find(session_id, "checkout.session")
            if session["status"] != "open":
                raise ValueError(f"session {session_id} is {session['status']}")
            private = self._private[session_id]
            if session["mode"] == "subscription":
                return copy.deepcopy(self._pay_subscription_session(session, private))
            intent = self._payment_intent(
                amount=session["amount_total"],
                currency=session["currency"],
                customer=session["customer"],
                metadata=private["payment_intent_metadata"],
                status="processing" if async_payment else "succeeded",
                livemode=session["livemode"],
            )
            session["payment_intent"] = intent["id"]
            session["status"] = "complete"
            if async_payment:
                self._charge(intent, "pending")
                self._emit("payment_intent.processing", intent)
                self._emit("checkout.session.completed", session)
                return copy.deepcopy(session)
            charge = self._charge(intent, "succeeded")
            session["payment_status"] = "paid"
            invoice = self._session_invoice(session)
            self._emit("charge.succeeded", charge)
            self._emit("payment_intent.succeeded", intent)
            self._emit("checkout.session.completed", session)
            if invoice is not None:
                self._emit("invoice.paid", invoice)
            return copy.deepcopy(session)

    def _session_invoice(self, session: dict[str, Any]) -> dict[str, Any] | None:
        if not (session.get("invoice_creation") or {}).get("enabled"):
            return None
        invoice = self._invoice(
            customer=session["customer"],
            amount=session["amount_total"],
            currency=session["currency"],
            billing_reason="manual",
            livemode=session["livemode"],
        )
        session["invoice"] = invoice["id"]
        return invoice

    def complete_async_payment(self, session_id: str) -> dict[str, Any]:
        """A delayed payment (bank debit) of a completed, unpaid session succeeds."""
        with self._lock:
            session = self._find(session_id, "checkout.session")
            intent = self._objects[session["payment_intent"]]
            charge = self._objects[intent["latest_charge"]]
            intent.update(status="succeeded", amount_received=intent["amount"])
            charge.update(status="succeeded", paid=True, captured=True, amount_captured=charge["amount"])
            session["payment_status"] = "paid"
            invoice = self._session_invoice(session)
            self._emit("charge.succeeded", charge)
            self._emit("payment_intent.succeeded", intent)
            self._emit("checkout.session.async_payment_succeeded", session)
            if invoice is not None:
                self._emit("invoice.paid", invoice)
            return copy.deepcopy(session)

    def fail_async_payment(self, session_id: str) -> dict[str, Any]:
        """A delayed payment of a completed, unpaid session fails."""
        with self._lock:
            session = self._find(session_id, "checkout.session")
            intent = self._objects[session["payment_intent"]]
            charge = self._objects[intent["latest_charge"]]
            intent["status"] = "requires_payment_method"
            charge["status"] = "failed"
            self._emit("charge.failed", charge)
            self._emit("payment_intent.payment_failed", intent)
            self._emit("checkout.session.async_payment_failed", session)
            return copy.deepcopy(session)

    def expire_session(self, session_id: str) -> dict[str, Any]:
        """An open session reaches its expiry (what POST .../expire does, plus the event)."""
        with self._lock:
            session = self._find(session_id, "checkout.session")
            self._expire(session)
            return copy.deepcopy(session)

    def _expire(self, session: dict[str, Any]) -> None:
        if session["status"] != "open":
            raise StripeApiError(
                400,
                "Only Checkout Sessions with a status of 'open' can be expired;"
                f" this one is '{session['status']}'.",
            )
        session["status"] = "expired"
        self._emit("checkout.session.expired", session)

    # -- refunds and disputes ----------------------------------------------------------------

    def _create_refund(self, params: dict[str, Any], livemode: bool) -> dict[str, Any]:
        if params.get("charge"):
            charge = self._find(params["charge"], "charge", "charge")
        elif params.get("payment_intent"):
            intent = self._find(params["payment_intent"], "payment_intent", "payment_intent")
            if not intent.get("latest_charge"):
                raise StripeApiError(
                    400, "This PaymentIntent has no successful charge to refund.", param="payment_intent"
                )
            charge = self._objects[intent["latest_charge"]]
        else:
            raise StripeApiError(
                400, "One of charge or payment_intent is required.", code="parameter_missing", param="charge"
            )
        if charge["status"] != "succeeded":
            raise StripeApiError(400, f"Charge {charge['id']} has not succeeded.", param="charge")
        if charge["disputed"]:
            raise StripeApiError(
                400, f"Charge {charge['id']} has been disputed.", code="charge_disputed", param="charge"
            )
        remaining = charge["amount"] - charge["amount_refunded"]
        if remaining <= 0:
            raise StripeApiError(
                400,
                f"Charge {charge['id']} has already been refunded.",
                code="charge_already_refunded",
                param="charge",
            )
        amount = _int(params, "amount", minimum=1)
        amount = remaining if amount is None else amount
        if amount > remaining:
            raise StripeApiError(
                400,
                f"Refund amount ({amount}) is greater than unrefunded amount on charge ({remaining})",
                code="amount_too_large",
                param="amount",
            )
        refund = self._store(
            {
                "id": self._id("refund"),
                "object": "refund",
                "amount": amount,
                "charge": charge["id"],
                "payment_intent": charge["payment_intent"],
                "currency": charge["currency"],
                "metadata": _metadata(params.get("metadata")),
                "reason": params.get("reason") or None,
                "status": "succeeded",
                "created": int(time.time()),
                "livemode": livemode,
            }
        )
        charge["amount_refunded"] += amount
        charge["refunded"] = charge["amount_refunded"] >= charge["amount"]
        self._emit("refund.created", refund)
        self._emit("charge.refunded", charge)
        return refund

    def refund(self, charge_id: str, amount: int | None = None) -> dict[str, Any]:
        """A refund made in Stripe's dashboard (the same as POST /v1/refunds)."""
        with self._lock:
            params: dict[str, Any] = {"charge": charge_id}
            if amount is not None:
                params["amount"] = str(amount)
            return copy.deepcopy(self._create_refund(params, self._objects[charge_id]["livemode"]))

    def dispute(
        self, charge_id: str, amount: int | None = None, reason: str = "fraudulent"
    ) -> dict[str, Any]:
        """The cardholder disputes a charge: charge.dispute.created."""
        with self._lock:
            charge = self._find(charge_id, "charge")
            charge["disputed"] = True
            dispute = self._store(
                {
                    "id": self._id("dispute"),
                    "object": "dispute",
                    "amount": charge["amount"] if amount is None else amount,
                    "charge": charge_id,
                    "payment_intent": charge["payment_intent"],
                    "currency": charge["currency"],
                    "reason": reason,
                    "status": "needs_response",
                    "created": int(time.time()),
                    "livemode": charge["livemode"],
                }
            )
            self._emit("charge.dispute.created", dispute)
            return copy.deepcopy(dispute)

    def close_dispute(self, dispute_id: str, status: str = "won") -> dict[str, Any]:
        """The dispute is decided ("won" or "lost"): charge.dispute.closed."""
        with self._lock:
            dispute = self._find(dispute_id, "dispute")
            dispute["status"] = status
            self._emit("charge.dispute.closed", dispute)
            return copy.deepcopy(dispute)

    # -- subscriptions -----------------------------------------------------------------------

    def _pay_subscription_session(self, session: dict[str, Any], private: dict[str, Any]) -> dict[str, Any]:
        if session["customer"] is None:
            customer = self._customer({"email": session["customer_email"]}, session["livemode"])
            session["customer"] = customer["id"]
        now = int(time.time())
        price = self._objects[private["prices"][0]]
        subscription = self._store(
            {
                "id": self._id("subscription"),
                "object": "subscription",
                "customer": session["customer"],
                "status": "active",
                "items": {
                    "object": "list",
                    "data": [
                        {
                            "id": self._id("subscription_item"),
                            "object": "subscription_item",
                            "price": copy.deepcopy(price),
                            "quantity": 1,
                            "current_period_start": now,
                            "current_period_end": now + PERIOD_SECONDS,
                        }
                    ],
                    "has_more": False,
                },
                "metadata": dict(private["subscription_metadata"]),
                "cancel_at_period_end": False,
                "cancel_at": None,
                "canceled_at": None,
                "ended_at": None,
                "latest_invoice": None,
                "start_date": now,
                "billing_cycle_anchor": now,
                "created": now,
                "livemode": session["livemode"],
            }
        )
        invoice = self._invoice(
            customer=session["customer"],
            amount=price["unit_amount"],
            currency=price["currency"],
            billing_reason="subscription_create",
            livemode=session["livemode"],
            subscription=subscription,
            price=price,
            period=(now, now + PERIOD_SECONDS),
        )
        subscription["latest_invoice"] = invoice["id"]
        session.update(
            subscription=subscription["id"], invoice=invoice["id"], status="complete", payment_status="paid"
        )
        self._emit("customer.subscription.created", subscription)
        self._pay_invoice(invoice)
        self._emit("invoice.paid", invoice)
        self._emit("invoice.payment_succeeded", invoice)
        self._emit("checkout.session.completed", session)
        return session

    def renew_subscription(self, subscription_id: str) -> dict[str, Any]:
        """The next period starts and its invoice (subscription_cycle) is paid; returns the invoice."""
        with self._lock:
            subscription = self._find(subscription_id, "subscription")
            item = subscription["items"]["data"][0]
            previous = {"items": copy.deepcopy(subscription["items"])}
            start = item["current_period_end"]
            item.update(current_period_start=start, current_period_end=start + PERIOD_SECONDS)
            invoice = self._invoice(
                customer=subscription["customer"],
                amount=item["price"]["unit_amount"],
                currency=item["price"]["currency"],
                billing_reason="subscription_cycle",
                livemode=subscription["livemode"],
                subscription=subscription,
                price=item["price"],
                period=(start, start + PERIOD_SECONDS),
            )
            subscription["latest_invoice"] = invoice["id"]
            self._pay_invoice(invoice)
            self._emit("invoice.paid", invoice)
            self._emit("customer.subscription.updated", subscription, previous_attributes=previous)
            return copy.deepcopy(invoice)

    def fail_subscription_payment(self, subscription_id: str) -> dict[str, Any]:
        """The renewal payment fails: an open invoice, the subscription past_due; returns the invoice."""
        with self._lock:
            subscription = self._find(subscription_id, "subscription")
            item = subscription["items"]["data"][0]
            start = item["current_period_end"]
            invoice = self._invoice(
                customer=subscription["customer"],
                amount=item["price"]["unit_amount"],
                currency=item["price"]["currency"],
                billing_reason="subscription_cycle",
                livemode=subscription["livemode"],
                subscription=subscription,
                price=item["price"],
                period=(start, start + PERIOD_SECONDS),
                status="open",
            )
            previous = {"status": subscription["status"]}
            subscription.update(status="past_due", latest_invoice=invoice["id"])
            self._emit("invoice.payment_failed", invoice)
            self._emit("customer.subscription.updated", subscription, previous_attributes=previous)
            return copy.deepcopy(invoice)

    def _update_subscription(self, subscription: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        if subscription["status"] == "canceled":
            raise StripeApiError(
                400,
                "A canceled subscription can only update its cancellation_details and metadata.",
                param="items",
            )
        previous: dict[str, Any] = {}
        if "metadata" in params:
            previous["metadata"] = dict(subscription["metadata"])
            subscription["metadata"] = {**subscription["metadata"], **_metadata(params["metadata"])}
            for key, value in (params["metadata"] or {}).items():
                if value == "":
                    subscription["metadata"].pop(key, None)
        if "cancel_at_period_end" in params:
            previous["cancel_at_period_end"] = subscription["cancel_at_period_end"]
            subscription["cancel_at_period_end"] = _bool(params["cancel_at_period_end"])
            subscription["cancel_at"] = (
                subscription["items"]["data"][0]["current_period_end"]
                if subscription["cancel_at_period_end"]
                else None
            )
        behavior = params.get("proration_behavior") or "create_prorations"
        if behavior not in ("create_prorations", "always_invoice", "none"):
            raise StripeApiError(400, f"Invalid proration_behavior: {behavior}", param="proration_behavior")
        invoice = None
        for index, change in enumerate(params.get("items") or []):
            item = next((i for i in subscription["items"]["data"] if i["id"] == change.get("id")), None)
            if item is None:
                raise _missing("subscription item", str(change.get("id")), f"items[{index}][id]")
            if change.get("price"):
                price = self._objects.get(change["price"])
                if price is None or price["object"] != "price":
                    raise _missing("price", change["price"], f"items[{index}][price]")
                previous.setdefault("items", copy.deepcopy(subscription["items"]))
                old = item["price"]
                item["price"] = copy.deepcopy(price)
                if behavior == "always_invoice":
                    invoice = self._invoice(
                        customer=subscription["customer"],
                        amount=max(price["unit_amount"] - old["unit_amount"], 0),
                        currency=price["currency"],
                        billing_reason="subscription_update",
                        livemode=subscription["livemode"],
                        subscription=subscription,
                        price=price,
                        period=(int(time.time()), item["current_period_end"]),
                        proration=True,
                    )
        self._emit("customer.subscription.updated", subscription, previous_attributes=previous)
        if invoice is not None:
            subscription["latest_invoice"] = invoice["id"]
            if invoice["amount_due"] > 0:
                self._pay_invoice(invoice)
            self._emit("invoice.paid", invoice)
        return subscription

    def _cancel_subscription(self, subscription: dict[str, Any]) -> dict[str, Any]:
        if subscription["status"] == "canceled":
            raise StripeApiError(
                400,
                f"No such subscription: '{subscription['id']}' (it is already canceled).",
                code="resource_missing",
            )
        now = int(time.time())
        subscription.update(status="canceled", canceled_at=now, ended_at=now)
        self._emit("customer.subscription.deleted", subscription)
        return subscription

    # -- HTTP --------------------------------------------------------------------------------

    def _expand(self, obj: dict[str, Any], paths: list[str]) -> dict[str, Any]:
        result = copy.deepcopy(obj)
        for name in paths:
            if name in EXPANDABLE and isinstance(result.get(name), str) and result[name] in self._objects:
                result[name] = copy.deepcopy(self._objects[result[name]])
        return result

    def _route(
        self, method: str, path: str, params: dict[str, Any], livemode: bool, base: str
    ) -> dict[str, Any]:
        parts = path.strip("/").split("/")[1:]  # after "v1"
        expand = params.get("expand") or []
        expand = expand if isinstance(expand, list) else [expand]
        match method, parts:
            case "POST", ["customers"]:
                return self._customer(params, livemode)
            case "GET", ["customers", object_id]:
                return self._find(object_id, "customer")
            case "POST", ["checkout", "sessions"]:
                return self._create_session(params, livemode, base)
            case "GET", ["checkout", "sessions"]:
                sessions = [
                    o
                    for o in self._objects.values()
                    if o["object"] == "checkout.session"
                    and all(o.get(k) == params[k] for k in ("payment_intent", "customer") if params.get(k))
                ]
                limit = _int(params, "limit") or 10
                return {
                    "object": "list",
                    "data": sessions[-limit:][::-1],
                    "has_more": len(sessions) > limit,
                    "url": path,
                }
            case "GET", ["checkout", "sessions", object_id]:
                return self._expand(self._find(object_id, "checkout.session"), expand)
            case "POST", ["checkout", "sessions", object_id, "expire"]:
                session = self._find(object_id, "checkout.session")
                self._expire(session)
                return session
            case "GET", ["payment_intents", object_id]:
                return self._expand(self._find(object_id, "payment_intent"), expand)
            case "GET", ["charges", object_id]:
                return self._expand(self._find(object_id, "charge"), expand)
            case "POST", ["refunds"]:
                return self._create_refund(params, livemode)
            case "GET", ["refunds", object_id]:
                return self._find(object_id, "refund")
            case "GET", ["subscriptions", object_id]:
                return self._expand(self._find(object_id, "subscription"), expand)
            case "POST", ["subscriptions", object_id]:
                return self._update_subscription(self._find(object_id, "subscription"), params)
            case "DELETE", ["subscriptions", object_id]:
                return self._cancel_subscription(self._find(object_id, "subscription"))
            case "GET", ["invoices", object_id]:
                return self._expand(self._find(object_id, "invoice"), expand)
            case "GET", ["prices", object_id]:
                return self._find(object_id, "price")
        raise StripeApiError(404, f"Unrecognized request URL ({method}: {path}).")

    def _take_fault(self, method: str, path: str) -> StripeFault | None:
        for fault in self._faults:
            if fault.matches(method, path):
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    async def _handle(self, request: Request) -> Response:
        method, path = request.method, request.url.path
        raw = (await request.body()).decode() if method == "POST" else request.url.query
        params = decode_form(raw)
        key = request.headers.get("idempotency-key")
        auth = request.headers.get("authorization", "")
        api_key = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        headers = {"Request-Id": "req_" + secrets.token_hex(8), "Stripe-Version": API_VERSION}
        with self._lock:
            replay = self._idempotent.get((api_key or "", key)) if key and method == "POST" else None
            self._requests.append(RecordedRequest(method, path, params, key, api_key, replay is not None))
            try:
                if api_key is None or not api_key.startswith(
                    ("sk_test_", "sk_live_", "rk_test_", "rk_live_")
                ):
                    raise StripeApiError(401, "Invalid API Key provided.")
                if replay is not None:
                    first_method, first_path, first_params, status, body = replay
                    if (first_method, first_path, first_params) != (method, path, params):
                        raise StripeApiError(
                            400,
                            "Keys for idempotent requests can only be used with the same parameters they were"
                            " first used with. Try using a key other than"
                            f" '{key}' if you meant to execute a different request.",
                            type="idempotency_error",
                        )
                    return JSONResponse(
                        body, status_code=status, headers={**headers, "Idempotent-Replayed": "true"}
                    )
                fault = self._take_fault(method, path)
                if fault is not None:
                    raise StripeApiError(
                        fault.status,
                        fault.message,
                        type=fault.type,
                        code=fault.code,
                        decline_code=fault.decline_code,
                    )
                result = copy.deepcopy(
                    self._route(method, path, params, api_key.startswith(("sk_live_", "rk_live_")), self.url)
                )
                status = 200
            except StripeApiError as exc:
                result, status = {"error": exc.body}, exc.status
            # Stripe keeps the answer to a keyed POST, errors included (but not 5xx or 429).
            if key and method == "POST" and api_key is not None and status < 500 and status != 429:
                self._idempotent[(api_key, key)] = (method, path, params, status, result)
        return JSONResponse(result, status_code=status, headers=headers)

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.api_route("/v1/{path:path}", methods=["GET", "POST", "DELETE"])
        async def handle(path: str, request: Request) -> Response:
            return await self._handle(request)

        return app


@pytest.fixture(scope="session")
def stripe_fake_server() -> Iterator[FakeStripe]:
    """The fake Stripe API, one server for the session."""
    with FakeStripe() as server:
        yield server


@pytest.fixture
def stripe_fake(stripe_fake_server: FakeStripe) -> Iterator[FakeStripe]:
    """The fake Stripe API, with objects, events, requests and faults cleared for this test."""
    stripe_fake_server.reset()
    yield stripe_fake_server
    stripe_fake_server.reset()


async def post_event(
    client: httpx.AsyncClient,
    event: dict[str, Any] | str | bytes,
    *,
    path: str = "/api/stripe/webhook",
    secret: str = WEBHOOK_SECRET,
    timestamp: int | None = None,
) -> httpx.Response:
    """Deliver one event to a webhook endpoint as Stripe does: the signed raw body, POSTed."""
    body, headers = signed_event(event, secret, timestamp)
    return await client.post(path, content=body, headers=headers)
