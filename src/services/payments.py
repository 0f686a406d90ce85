"""Stripe top-ups: credit packages, checkout, the purchase grant, refunds and disputes, the webhook.

A top-up, from start to end:

1. `create_checkout`: the server decides the price and the credits (a package, or a custom amount
   within STRIPE_MIN/MAX_TOPUP_CENTS: 1 credit per currency unit), writes a `payments` row, takes
   a discount coupon's use for it (the discount lowers the price, never the credits), and asks
   Stripe for a Checkout Session (payment mode, the user's customer, an invoice, metadata written
   here only: kind, user_id, payment_id). The row is keyed by the session's id from then on.
2. The purchase grant: `credits` of the row, as the grant ('purchase', <checkout session id>).
   Whatever reports the payment first grants it, in one transaction with the trial conversion
   and the referral reward: checkout.session.completed (payment_status 'paid'),
   checkout.session.async_payment_succeeded, payment_intent.succeeded or charge.succeeded of a
   payment intent this server tagged, or the owner's GET of the checkout (`reconcile_checkout`).
   UNIQUE (source, reference) of credit_grants makes every later report a no-op.
3. Claw-backs: charge.refunded (and an admin refund, through the same function) removes
   credits x refunded / paid, only the increase since the last one (once_key
   'refund:<charge>:<cumulative cents>'); a dispute removes its share once
   ('dispute:<id>') and a won dispute gives it back once (grant 'refund_reversal',
   'dispute:<id>'). A claw-back may take the balance below zero; every claw-back reverses the
   purchase's referral rewards (once, in the referrals service).

The webhook (`receive_webhook`) verifies the signature over the raw body, skips events of the
other mode (test vs live key), and handles each event in one transaction that first inserts the
event id into stripe_webhook_events: a repeat waits for, then sees, the first one's row and does
nothing; a failure rolls both back and answers non-2xx, so Stripe retries. customer.subscription.*,
invoice.* and subscription-mode checkout events go to the subscriptions service.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from urllib.parse import urlsplit
from uuid import UUID

import asyncpg
import orjson
import stripe

from src.config import Settings
from src.db import payments as payments_db
from src.db import users as users_db
from src.db.payments import Dispute, Payment
from src.errors import Conflict, GatewayError, InvalidRequest, NotFound, ServiceUnavailable
from src.security.deps import Principal, RequestMeta
from src.services import audit, coupons, grants, notifications, referrals, stripe_client, trials
from src.services.stripe_client import HasStripe

if TYPE_CHECKING:
    from src.state import AppState

logger = logging.getLogger("gatewayz.payments")

__all__ = [
    "CreditPackage",
    "Payment",
    "Refunded",
    "WebhookOutcome",
    "WebhookProcessingFailed",
    "apply_charge_refunded",
    "check_return_url",
    "create_checkout",
    "credit_packages",
    "ensure_customer",
    "get_payment",
    "handle_event",
    "list_payments",
    "receive_webhook",
    "reconcile_checkout",
    "refund_payment",
]

ACTOR = "stripe:webhook"
RECONCILE_ACTOR = "stripe:reconcile"
METADATA_KIND = "topup"
CREDIT_QUANTUM = Decimal("0.0000000001")
# Dispute statuses in which the money is (or may be) gone, and those in which it came back.
DISPUTE_CLAWBACK = frozenset({"needs_response", "under_review", "lost"})
DISPUTE_RESTORE = frozenset({"won", "warning_closed", "prevented"})
BUILTIN_PACKAGES: tuple[tuple[str, str, int, str], ...] = (
    ("credits_10", "10 credits", 1_000, "10"),
    ("credits_25", "25 credits", 2_500, "25"),
    ("credits_50", "50 credits", 5_000, "50"),
    ("credits_100", "100 credits", 10_000, "100"),
)


class WebhookProcessingFailed(GatewayError):
    """An event could not be applied now; its work was rolled back and Stripe will retry it."""

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "api_error"
    default_code: ClassVar[str | None] = "webhook_processing_failed"
    default_message: ClassVar[str] = "The event could not be processed; it will be retried."


class EventNotReady(Exception):
    """An event of ours that arrived before what it depends on; a retry will apply it."""


# -- credit packages ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CreditPackage:
    id: str
    name: str
    amount_cents: int
    credits: Decimal


def credit_packages(settings: Settings) -> list[CreditPackage]:
    """CREDIT_PACKAGES (a JSON list) or, when it is empty, the built-in set."""
    raw = settings.credit_packages.strip()
    if not raw:
        return [CreditPackage(i, n, a, Decimal(c)) for i, n, a, c in BUILTIN_PACKAGES]
    return list(_parse_packages(raw))


@lru_cache(maxsize=4)
def _parse_packages(raw: str) -> tuple[CreditPackage, ...]:
    def bad(reason: str) -> ValueError:
        return ValueError(f"CREDIT_PACKAGES: {reason}")

    try:
        items = json.loads(raw)
    except ValueError:
        raise bad("not valid JSON") from None
    if not isinstance(items, list) or not items:
        raise bad("must be a non-empty JSON list")
    packages: list[CreditPackage] = []
    for item in items:
        if not isinstance(item, dict):
            raise bad("each package must be an object")
        package_id, name, amount = item.get("id"), item.get("name"), item.get("amount_cents")
        if not isinstance(package_id, str) or not package_id or any(p.id == package_id for p in packages):
            raise bad("each package needs a unique string id")
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 50:
            raise bad(f"package {package_id}: amount_cents must be an integer of at least 50")
        try:
            credits = Decimal(str(item.get("credits")))
        except InvalidOperation:
            raise bad(f"package {package_id}: credits must be a number") from None
        if not credits.is_finite() or credits <= 0:
            raise bad(f"package {package_id}: credits must be positive")
        packages.append(CreditPackage(package_id, str(name or package_id), amount, credits))
    return tuple(packages)


# -- checkout ---------------------------------------------------------------------------------


def _origin(url: str) -> str | None:
    """scheme://host[:port] of an absolute http(s) URL without credentials, lower-cased; else None."""
    if any(ch.isspace() or ord(ch) < 32 or ch == "\\" for ch in url):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        return None
    default = 443 if scheme == "https" else 80
    suffix = f":{port}" if port is not None and port != default else ""
    return f"{scheme}://{parts.hostname.lower()}{suffix}"


def check_return_url(settings: Settings, url: str, *, param: str) -> None:
    """Refuse a success/cancel URL that is not on one of CHECKOUT_ALLOWED_ORIGINS."""
    allowed = {_origin(origin) for origin in settings.checkout_origin_list} - {None}
    origin = _origin(url)
    if origin is None or origin not in allowed:
        raise InvalidRequest(
            f"'{param}' must be an http(s) URL on an allowed origin.", param=param, code="url_not_allowed"
        )


def _decide_price(
    settings: Settings, *, package_id: str | None, amount_cents: int | None
) -> tuple[str | None, str, int, Decimal]:
    """(package id, product name, price in cents, credits): from the package or the amount."""
    if (package_id is None) == (amount_cents is None):
        raise InvalidRequest(
            "Send exactly one of 'package_id' and 'amount_cents'.", param="package_id", code="invalid_value"
        )
    if package_id is not None:
        package = next((p for p in credit_packages(settings) if p.id == package_id), None)
        if package is None:
            raise InvalidRequest(
                f"No such credit package: '{package_id}'.", param="package_id", code="unknown_package"
            )
        return package.id, package.name, package.amount_cents, package.credits
    assert amount_cents is not None
    low, high = settings.stripe_min_topup_cents, settings.stripe_max_topup_cents
    if not low <= amount_cents <= high:
        raise InvalidRequest(
            f"'amount_cents' must be between {low} and {high}.",
            param="amount_cents",
            code="amount_out_of_range",
        )
    credits = (Decimal(amount_cents) / 100).quantize(CREDIT_QUANTUM)
    return None, f"{credits.normalize():f} credits", amount_cents, credits


async def ensure_customer(state: AppState, *, user_id: UUID) -> str:
    """The user's Stripe customer (of the configured key's mode), created once."""
    live = stripe_client.key_is_live(state.settings)
    async with state.pool.acquire() as conn:
        existing = await payments_db.get_customer(conn, user_id=user_id, livemode=live)
        user = None if existing else await users_db.get_user(conn, user_id=user_id)
    if existing:
        return existing
    params: Any = {"metadata": {"user_id": str(user_id)}}
    if user is not None and user.email:
        params["email"] = user.email
    # Concurrent first checkouts of one user reach the same customer through Stripe's idempotency.
    key = f"gatewayz-customer:{user_id}:{'live' if live else 'test'}"
    customer = await stripe_client.call(
        state, lambda c: c.v1.customers.create_async(params, {"idempotency_key": key})
    )
    async with state.pool.acquire() as conn:
        return await payments_db.save_customer(conn, user_id=user_id, livemode=live, customer_id=customer.id)


def _metadata(payment: Payment) -> dict[str, str]:
    return {"kind": METADATA_KIND, "user_id": str(payment.user_id), "payment_id": str(payment.id)}


async def _open_payment(
    state: AppState,
    *,
    user_id: UUID,
    package_id: str | None,
    price: int,
    credits: Decimal,
    coupon_code: str | None,
    customer: str,
) -> Payment:
    """The pending payment row, with the coupon's use taken for it (both commit together)."""
    settings = state.settings
    async with state.pool.acquire() as conn, conn.transaction():
        payment = await payments_db.insert_payment(
            conn,
            user_id=user_id,
            kind="topup",
            package_id=package_id,
            amount_cents=price,
            currency=settings.stripe_currency.lower(),
            credits=credits,
            coupon_code=None,
            livemode=stripe_client.key_is_live(settings),
            stripe_customer_id=customer,
        )
        if coupon_code is None:
            return payment
        applied = await coupons.apply_discount(
            conn, user_id=user_id, code=coupon_code, amount_cents=price, reference=str(payment.id)
        )
        updated = await payments_db.set_discount(
            conn, payment_id=payment.id, discount_cents=applied.discount_cents, coupon_code=applied.code
        )
    assert updated is not None
    return updated


def _session_params(payment: Payment, *, name: str, success_url: str, cancel_url: str) -> dict[str, Any]:
    metadata = _metadata(payment)
    return {
        "mode": "payment",
        "customer": payment.stripe_customer_id,
        "client_reference_id": str(payment.user_id),
        "line_items": [
            {
                "quantity": 1,
                "price_data": {
                    "currency": payment.currency,
                    "unit_amount": payment.amount_paid_cents,
                    "product_data": {"name": f"Gatewayz {name}"},
                },
            }
        ],
        # Written here only: the session, its payment intent (and so its charge) and its invoice
        # carry what the webhook needs to find the payment.
        "metadata": metadata,
        "payment_intent_data": {"metadata": metadata},
        "invoice_creation": {"enabled": True, "invoice_data": {"metadata": metadata}},
        "success_url": success_url,
        "cancel_url": cancel_url,
    }


async def create_checkout(
    state: AppState,
    *,
    user_id: UUID,
    package_id: str | None,
    amount_cents: int | None,
    coupon_code: str | None,
    success_url: str,
    cancel_url: str,
) -> Payment:
    """A Checkout Session for a top-up; the payment row (with the session's id and URL)."""
    settings = state.settings
    package, name, price, credits = _decide_price(settings, package_id=package_id, amount_cents=amount_cents)
    check_return_url(settings, success_url, param="success_url")
    check_return_url(settings, cancel_url, param="cancel_url")
    if not stripe_client.is_configured(settings):
        raise ServiceUnavailable(
            "Payments are not configured on this server.", code="payments_not_configured"
        )
    customer = await ensure_customer(state, user_id=user_id)
    payment = await _open_payment(
        state,
        user_id=user_id,
        package_id=package,
        price=price,
        credits=credits,
        coupon_code=coupon_code,
        customer=customer,
    )
    params: Any = _session_params(payment, name=name, success_url=success_url, cancel_url=cancel_url)
    try:
        session = stripe_client.plain(
            await stripe_client.call(
                state,
                lambda c: c.v1.checkout.sessions.create_async(
                    params, {"idempotency_key": f"gatewayz-checkout:{payment.id}"}
                ),
            )
        )
    except BaseException:
        async with state.pool.acquire() as conn, conn.transaction():
            await _close_checkout(conn, payment.id, status="failed")
        raise
    session_id, expires_at = str(session["id"]), session.get("expires_at")
    expires = datetime.fromtimestamp(expires_at, UTC) if isinstance(expires_at, int) else None
    async with state.pool.acquire() as conn:
        attached = await payments_db.attach_checkout(
            conn, payment_id=payment.id, session_id=session_id, url=session.get("url"), expires_at=expires
        )
    if attached is None:
        raise Conflict("The checkout could not be recorded.", code="checkout_conflict")
    logger.info("checkout %s created for payment %s (%s credits)", session_id, payment.id, credits)
    return attached


async def _close_checkout(conn: asyncpg.Connection, payment_id: UUID, *, status: str) -> bool:
    """End an unpaid checkout (expired, failed) and give its coupon's use back; run in a transaction."""
    payment = await payments_db.get_payment(conn, payment_id=payment_id, for_update=True)
    if payment is None or payment.granted_at is not None:
        return False
    changed = await payments_db.set_status(conn, payment_id=payment_id, status=status, only_from=("pending",))
    if changed and payment.coupon_code is not None:
        await coupons.release_discount(conn, reference=str(payment_id))
    return changed


# -- the purchase grant -----------------------------------------------------------------------


def _derived_status(payment: Payment, *, paid: bool, refunded_cents: int, credits_disputed: Decimal) -> str:
    if credits_disputed > 0:
        return "disputed"
    if refunded_cents > 0:
        return "refunded" if refunded_cents >= payment.amount_paid_cents else "partially_refunded"
    return "paid" if paid else payment.status


async def _fulfil(
    conn: asyncpg.Connection,
    state: AppState,
    payment_id: UUID,
    *,
    payment_intent_id: str | None,
    charge_id: str | None,
    customer_id: str | None,
    invoice_id: str | None,
    actor: str,
) -> bool:
    """Grant a paid top-up's credits, once; True when this call granted them."""
    async with conn.transaction():
        payment = await payments_db.get_payment(conn, payment_id=payment_id, for_update=True)
        if payment is None or payment.kind != "topup":
            return False
        session_id = payment.stripe_checkout_session_id
        if session_id is None:
            raise EventNotReady(f"payment {payment_id}: its checkout session is not recorded yet")
        await payments_db.record_stripe_ids(
            conn,
            payment_id=payment_id,
            payment_intent_id=payment_intent_id,
            charge_id=charge_id,
            customer_id=customer_id,
            invoice_id=invoice_id,
        )
        granted = await grants.grant(
            conn,
            user_id=payment.user_id,
            amount=payment.credits,
            source="purchase",
            reference=session_id,
            actor=actor,
            reason=f"top-up {payment.package_id or 'custom amount'}",
        )
        if granted is None:
            return False
        await payments_db.mark_granted(
            conn,
            payment_id=payment_id,
            status=_derived_status(
                payment,
                paid=True,
                refunded_cents=payment.refunded_cents,
                credits_disputed=payment.credits_disputed,
            ),
        )
        await trials.record_conversion(conn, user_id=payment.user_id, payment_reference=session_id)
        await notifications.payment_confirmed(
            conn,
            user_id=payment.user_id,
            payment_reference=session_id,
            amount_cents=payment.amount_paid_cents,
            currency=payment.currency,
            credits=payment.credits,
            description=f"Credit top-up ({payment.package_id or 'custom amount'})",
        )
        # A purchase already refunded or disputed (its events came first) earns no referral reward.
        if payment.credits_refunded == 0 and payment.credits_disputed == 0:
            await referrals.reward_on_purchase(
                conn,
                state.settings,
                user_id=payment.user_id,
                amount=payment.credits,
                payment_reference=session_id,
                stripe_customer_id=customer_id or payment.stripe_customer_id,
            )
    logger.info("payment %s: %s credits granted (%s)", payment_id, payment.credits, actor)
    return True


def _id_of(value: Any) -> str | None:
    """An id field, whether Stripe sent the id or the expanded object."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, Mapping) and isinstance(value.get("id"), str):
        return str(value["id"])
    return None


async def _tagged_payment(conn: asyncpg.Connection, metadata: Any) -> Payment | None:
    """The top-up this server tagged in an object's metadata (kind, user_id and payment_id agree)."""
    if not isinstance(metadata, Mapping) or metadata.get("kind") != METADATA_KIND:
        return None
    try:
        payment_id = UUID(str(metadata.get("payment_id")))
    except ValueError:
        return None
    payment = await payments_db.get_payment(conn, payment_id=payment_id)
    if payment is None or str(payment.user_id) != metadata.get("user_id") or payment.kind != "topup":
        return None
    return payment


async def _payment_for_session(conn: asyncpg.Connection, session: Mapping[str, Any]) -> Payment | None:
    session_id = session.get("id")
    if not isinstance(session_id, str):
        return None
    payment = await payments_db.get_by_session(conn, session_id=session_id)
    if payment is not None:
        return payment
    # The session was created but its id not yet recorded (or the recording failed): the metadata
    # this server wrote names the payment.
    tagged = await _tagged_payment(conn, session.get("metadata"))
    if tagged is None:
        return None
    return await payments_db.attach_checkout(
        conn, payment_id=tagged.id, session_id=session_id, url=None, expires_at=None
    )


async def reconcile_checkout(state: AppState, *, user_id: UUID, session_id: str) -> Payment:
    """The caller's checkout; if Stripe says it is paid and nothing granted it yet, grant it now."""
    async with state.pool.acquire() as conn:
        payment = await payments_db.get_by_session(conn, session_id=session_id)
    if payment is None or payment.user_id != user_id:
        raise NotFound("No such checkout session.", param="session_id", code="checkout_session_not_found")
    if payment.kind != "topup" or payment.granted_at is not None or payment.status != "pending":
        return payment
    session = stripe_client.plain(
        await stripe_client.call(state, lambda c: c.v1.checkout.sessions.retrieve_async(session_id))
    )
    async with state.pool.acquire() as conn:
        if session.get("payment_status") == "paid":
            await _fulfil(
                conn,
                state,
                payment.id,
                payment_intent_id=_id_of(session.get("payment_intent")),
                charge_id=None,
                customer_id=_id_of(session.get("customer")),
                invoice_id=_id_of(session.get("invoice")),
                actor=RECONCILE_ACTOR,
            )
        elif session.get("status") == "expired":
            async with conn.transaction():
                await _close_checkout(conn, payment.id, status="expired")
        fresh = await payments_db.get_payment(conn, payment_id=payment.id)
    assert fresh is not None
    return fresh


# -- claw-backs -------------------------------------------------------------------------------


def _share(payment: Payment, cents: int, of_cents: int) -> Decimal:
    """The credits that `cents` of a charge of `of_cents` paid for (all of them for the whole)."""
    if of_cents <= 0 or cents >= of_cents:
        return payment.credits
    return (payment.credits * cents / of_cents).quantize(CREDIT_QUANTUM, rounding=ROUND_HALF_UP)


async def _payment_for_charge(
    conn: asyncpg.Connection,
    holder: HasStripe,
    *,
    charge_id: str | None,
    payment_intent_id: str | None,
    metadata: Any,
) -> Payment | None:
    """A charge's top-up: from its metadata, its recorded ids, or (without metadata) Stripe's charge."""
    tagged = await _tagged_payment(conn, metadata)
    if tagged is not None:
        return tagged
    found = await payments_db.get_by_charge(conn, charge_id=charge_id, payment_intent_id=payment_intent_id)
    if found is not None or metadata is not None or charge_id is None:
        return found
    # A dispute carries no metadata: the charge it is about does (this server wrote it).
    charge = stripe_client.plain(
        await stripe_client.call(holder, lambda c: c.v1.charges.retrieve_async(charge_id))
    )
    return await _tagged_payment(conn, charge.get("metadata"))


async def apply_charge_refunded(
    conn: asyncpg.Connection, state: AppState, charge: Mapping[str, Any], *, actor: str
) -> bool:
    """Claw back the refunded share of a top-up's credits, once per new refunded amount.

    `charge` is Stripe's charge (from charge.refunded, or fetched after an admin refund); its
    amount_refunded is cumulative, so only the increase since the last claw-back is removed.
    False when the charge is not one of our top-ups.
    """
    charge_id = _id_of(charge.get("id"))
    payment = await _payment_for_charge(
        conn,
        state,
        charge_id=charge_id,
        payment_intent_id=_id_of(charge.get("payment_intent")),
        metadata=charge.get("metadata") or {},
    )
    if payment is None or charge_id is None:
        return False
    refunded, amount = int(charge.get("amount_refunded") or 0), int(charge.get("amount") or 0)
    async with conn.transaction():
        payment = await payments_db.get_payment(conn, payment_id=payment.id, for_update=True)
        assert payment is not None
        await payments_db.record_stripe_ids(
            conn,
            payment_id=payment.id,
            payment_intent_id=_id_of(charge.get("payment_intent")),
            charge_id=charge_id,
            customer_id=_id_of(charge.get("customer")),
            invoice_id=None,
        )
        if refunded <= payment.refunded_cents:
            return True  # this refunded amount (or a later one) was applied already
        room = payment.credits - payment.credits_refunded - payment.credits_disputed
        take = min(
            _share(payment, refunded, amount or payment.amount_paid_cents) - payment.credits_refunded, room
        )
        if take > 0:
            await _claw_back(
                conn,
                payment,
                amount=take,
                type="refund",
                once_key=f"refund:{charge_id}:{refunded}",
                reference=charge_id,
                actor=actor,
            )
        await payments_db.record_refund(
            conn,
            payment_id=payment.id,
            refunded_cents=refunded,
            credits_refunded=payment.credits_refunded + max(take, Decimal(0)),
            status=_derived_status(
                payment, paid=True, refunded_cents=refunded, credits_disputed=payment.credits_disputed
            ),
        )
    logger.info("payment %s: %s cents refunded, %s credits clawed back", payment.id, refunded, take)
    return True


async def _claw_back(
    conn: asyncpg.Connection,
    payment: Payment,
    *,
    amount: Decimal,
    type: str,
    once_key: str,
    reference: str,
    actor: str,
) -> bool:
    session_id = payment.stripe_checkout_session_id
    debited = await grants.debit(
        conn,
        user_id=payment.user_id,
        amount=amount,
        type=type,
        once_key=once_key,
        actor=actor,
        reason=f"Stripe {type} of payment {payment.id}",
        reference=reference,
        from_grant=("purchase", session_id) if session_id else None,
    )
    if debited is None:
        return False
    if session_id is not None:
        await referrals.reverse_on_refund(conn, payment_reference=session_id, actor=actor)
    return True


async def apply_dispute(conn: asyncpg.Connection, state: AppState, dispute: Mapping[str, Any]) -> bool:
    """Claw back a disputed share once while the money is gone; give it back once if the dispute is won."""
    dispute_id, charge_id = _id_of(dispute.get("id")), _id_of(dispute.get("charge"))
    if dispute_id is None:
        return False
    payment = await _payment_for_charge(
        conn,
        state,
        charge_id=charge_id,
        payment_intent_id=_id_of(dispute.get("payment_intent")),
        metadata=None,
    )
    if payment is None:
        return False
    async with conn.transaction():
        payment = await payments_db.get_payment(conn, payment_id=payment.id, for_update=True)
        assert payment is not None
        await payments_db.record_stripe_ids(
            conn,
            payment_id=payment.id,
            payment_intent_id=_id_of(dispute.get("payment_intent")),
            charge_id=charge_id,
            customer_id=None,
            invoice_id=None,
        )
        row = await payments_db.lock_dispute(
            conn,
            dispute_id=dispute_id,
            payment_id=payment.id,
            amount_cents=int(dispute.get("amount") or 0),
            status=str(dispute.get("status") or "needs_response"),
        )
        if row.status in DISPUTE_RESTORE:
            await _restore_dispute(conn, payment, row)
        elif row.status in DISPUTE_CLAWBACK and row.clawed_back_at is None:
            await _claw_back_dispute(conn, payment, row)
    return True


async def _claw_back_dispute(conn: asyncpg.Connection, payment: Payment, row: Dispute) -> None:
    room = payment.credits - payment.credits_refunded - payment.credits_disputed
    take = min(_share(payment, row.amount_cents, payment.amount_paid_cents), room)
    if take > 0:
        await _claw_back(
            conn,
            payment,
            amount=take,
            type="dispute",
            once_key=f"dispute:{row.dispute_id}",
            reference=row.dispute_id,
            actor=ACTOR,
        )
    taken = max(take, Decimal(0))
    await payments_db.record_dispute_clawback(conn, dispute_id=row.dispute_id, credits=taken)
    await _set_disputed(conn, payment, payment.credits_disputed + taken)
    logger.info("payment %s: dispute %s clawed back %s credits", payment.id, row.dispute_id, taken)


async def _set_disputed(conn: asyncpg.Connection, payment: Payment, disputed: Decimal) -> None:
    """Record the credits a payment's disputes hold back now, and the status that follows."""
    await payments_db.record_disputed(
        conn,
        payment_id=payment.id,
        credits_disputed=disputed,
        status=_derived_status(
            payment,
            paid=payment.granted_at is not None,
            refunded_cents=payment.refunded_cents,
            credits_disputed=disputed,
        ),
    )


async def _restore_dispute(conn: asyncpg.Connection, payment: Payment, row: Dispute) -> None:
    if row.restored_at is not None:
        return
    await payments_db.record_dispute_restored(conn, dispute_id=row.dispute_id)
    if row.credits_clawed_back <= 0:
        return  # decided before anything was clawed back: nothing to give back, and nothing will be taken
    await grants.grant(
        conn,
        user_id=payment.user_id,
        amount=row.credits_clawed_back,
        source="refund_reversal",
        reference=f"dispute:{row.dispute_id}",
        actor=ACTOR,
        reason=f"dispute {row.dispute_id} won",
    )
    await _set_disputed(conn, payment, max(payment.credits_disputed - row.credits_clawed_back, Decimal(0)))
    logger.info(
        "payment %s: dispute %s won, %s credits restored", payment.id, row.dispute_id, row.credits_clawed_back
    )


# -- webhook events ---------------------------------------------------------------------------


async def _on_checkout_session(
    conn: asyncpg.Connection, state: AppState, kind: str, session: Mapping[str, Any]
) -> bool:
    payment = await _payment_for_session(conn, session)
    if payment is None or payment.kind != "topup":
        return False
    if kind in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
        ids = {
            "payment_intent_id": _id_of(session.get("payment_intent")),
            "charge_id": None,
            "customer_id": _id_of(session.get("customer")),
            "invoice_id": _id_of(session.get("invoice")),
        }
        if kind == "checkout.session.async_payment_succeeded" or session.get("payment_status") == "paid":
            await _fulfil(conn, state, payment.id, actor=ACTOR, **ids)
        else:  # completed, but a delayed payment method has not paid yet
            await payments_db.record_stripe_ids(conn, payment_id=payment.id, **ids)
        return True
    status = "failed" if kind == "checkout.session.async_payment_failed" else "expired"
    async with conn.transaction():
        await _close_checkout(conn, payment.id, status=status)
    return True


async def _on_payment(
    conn: asyncpg.Connection,
    state: AppState,
    *,
    payment_intent_id: str | None,
    charge_id: str | None,
    obj: Mapping[str, Any],
) -> bool:
    """payment_intent.succeeded / charge.succeeded: grant only a top-up this server tagged."""
    payment = await _tagged_payment(conn, obj.get("metadata"))
    if payment is None:
        return False  # a subscription's invoice payment, or nothing of ours
    await _fulfil(
        conn,
        state,
        payment.id,
        payment_intent_id=payment_intent_id,
        charge_id=charge_id,
        customer_id=_id_of(obj.get("customer")),
        invoice_id=None,
        actor=ACTOR,
    )
    return True


def _is_subscription_event(kind: str, obj: Mapping[str, Any]) -> bool:
    if kind.startswith(("customer.subscription.", "invoice.")):
        return True
    return kind.startswith("checkout.session.") and obj.get("mode") == "subscription"


async def handle_event(
    conn: asyncpg.Connection, state: AppState, event: stripe.Event, body: Mapping[str, Any]
) -> bool:
    """Apply one verified event inside its transaction; False when it is deliberately ignored."""
    kind = str(body["type"])
    obj: Mapping[str, Any] = body["data"]["object"]
    if _is_subscription_event(kind, obj):
        # Imported here: the subscriptions service uses this module (customers, the Stripe client).
        from src.services import subscriptions

        return await subscriptions.handle_event(conn, state, event)
    match kind:
        case (
            "checkout.session.completed"
            | "checkout.session.async_payment_succeeded"
            | "checkout.session.async_payment_failed"
            | "checkout.session.expired"
        ):
            return await _on_checkout_session(conn, state, kind, obj)
        case "payment_intent.succeeded":
            return await _on_payment(
                conn,
                state,
                payment_intent_id=_id_of(obj.get("id")),
                charge_id=_id_of(obj.get("latest_charge")),
                obj=obj,
            )
        case "charge.succeeded":
            if obj.get("status") != "succeeded" or not obj.get("paid"):
                return False
            return await _on_payment(
                conn,
                state,
                payment_intent_id=_id_of(obj.get("payment_intent")),
                charge_id=_id_of(obj.get("id")),
                obj=obj,
            )
        case "charge.refunded":
            return await apply_charge_refunded(conn, state, obj, actor=ACTOR)
        case "charge.dispute.created" | "charge.dispute.updated" | "charge.dispute.closed":
            return await apply_dispute(conn, state, obj)
    return False


@dataclass(frozen=True)
class WebhookOutcome:
    event_id: str | None
    type: str | None
    outcome: Literal["handled", "ignored", "duplicate"]


def _verify(settings: Settings, payload: bytes, signature: str | None) -> tuple[stripe.Event, dict[str, Any]]:
    secret = settings.stripe_webhook_secret
    if secret is None or not secret.get_secret_value():
        # 503: Stripe keeps retrying until the server is configured.
        raise ServiceUnavailable(
            "Stripe webhooks are not configured on this server.", code="webhooks_not_configured"
        )
    key = settings.stripe_secret_key.get_secret_value() if settings.stripe_secret_key else None
    try:
        event = stripe.Webhook.construct_event(
            payload,
            signature,
            secret.get_secret_value(),
            settings.stripe_webhook_tolerance_seconds,
            api_key=key,
        )
        body = orjson.loads(payload)
    except stripe.SignatureVerificationError:
        raise InvalidRequest(
            "The Stripe-Signature header is missing, invalid or too old.",
            param="Stripe-Signature",
            code="invalid_signature",
        ) from None
    except (ValueError, TypeError, AttributeError, KeyError):
        # Signed by Stripe's secret, but not an event (not JSON, or not an object).
        raise InvalidRequest("The event is not a Stripe event.", code="invalid_payload") from None
    data = body.get("data") if isinstance(body, dict) else None
    if (
        not isinstance(body, dict)
        or not isinstance(body.get("id"), str)
        or not isinstance(body.get("type"), str)
        or not isinstance(body.get("livemode"), bool)
        or not isinstance(data, dict)
        or not isinstance(data.get("object"), dict)
    ):
        raise InvalidRequest("The event is not a Stripe event.", code="invalid_payload")
    return event, body


async def receive_webhook(state: AppState, *, payload: bytes, signature: str | None) -> WebhookOutcome:
    """Verify and apply one webhook delivery (see the module doc); raises 400 before writing anything."""
    event, body = _verify(state.settings, payload, signature)
    event_id, kind = str(body["id"]), str(body["type"])
    if body["livemode"] != stripe_client.key_is_live(state.settings):
        logger.warning("Stripe event %s (%s) is of the other mode than the key; ignored", event_id, kind)
        return WebhookOutcome(event_id, kind, "ignored")
    created = body.get("created")
    try:
        async with state.pool.acquire() as conn, conn.transaction():
            claimed = await payments_db.claim_event(
                conn,
                event_id=event_id,
                type=kind,
                livemode=bool(body["livemode"]),
                object_id=_id_of(body["data"]["object"].get("id")),
                created_at=datetime.fromtimestamp(created, UTC) if isinstance(created, int) else None,
            )
            if not claimed:
                return WebhookOutcome(event_id, kind, "duplicate")
            handled = await handle_event(conn, state, event, body)
            await payments_db.finish_event(
                conn, event_id=event_id, outcome="handled" if handled else "ignored"
            )
    except Exception as exc:
        logger.error("Stripe event %s (%s) failed and will be retried", event_id, kind, exc_info=exc)
        raise WebhookProcessingFailed() from exc
    logger.info("Stripe event %s (%s) %s", event_id, kind, "handled" if handled else "ignored")
    return WebhookOutcome(event_id, kind, "handled" if handled else "ignored")


# -- reading and refunding --------------------------------------------------------------------


async def get_payment(conn: asyncpg.Connection, *, payment_id: UUID, user_id: UUID | None = None) -> Payment:
    """A payment (only the user's own when `user_id` is given); 404 otherwise."""
    payment = await payments_db.get_payment(conn, payment_id=payment_id)
    if payment is None or (user_id is not None and payment.user_id != user_id):
        raise NotFound("No such payment.", param="payment_id", code="payment_not_found")
    return payment


async def list_payments(
    conn: asyncpg.Connection, *, user_id: UUID | None, status: str | None, limit: int, offset: int
) -> tuple[list[Payment], int]:
    return await payments_db.list_payments(conn, user_id=user_id, status=status, limit=limit, offset=offset)


@dataclass(frozen=True)
class Refunded:
    refund_id: str
    amount_cents: int
    status: str
    payment: Payment


def _refundable(payment: Payment, amount_cents: int | None) -> int:
    """The cents to refund (default: all that is left); 409/400 when that cannot be done."""
    if payment.kind != "topup":
        raise Conflict("Only top-ups are refunded here.", code="payment_not_refundable")
    if payment.stripe_payment_intent_id is None and payment.stripe_charge_id is None:
        raise Conflict("This payment has not been paid.", code="payment_not_refundable")
    remaining = payment.amount_paid_cents - payment.refunded_cents
    if remaining <= 0:
        raise Conflict("This payment is already fully refunded.", code="payment_already_refunded")
    amount = remaining if amount_cents is None else amount_cents
    if amount > remaining:
        raise InvalidRequest(
            f"'amount_cents' must be at most {remaining}, what is left to refund.",
            param="amount_cents",
            code="amount_out_of_range",
        )
    return amount


async def refund_payment(
    state: AppState,
    *,
    payment_id: UUID,
    amount_cents: int | None,
    reason: str | None,
    actor: Principal,
    meta: RequestMeta,
) -> Refunded:
    """Refund a top-up through Stripe and claw back its share as charge.refunded would (audited)."""
    async with state.pool.acquire() as conn:
        payment = await get_payment(conn, payment_id=payment_id)
    amount = _refundable(payment, amount_cents)
    params: Any = {"amount": amount, "metadata": {"payment_id": str(payment.id), "actor": actor.actor}}
    if payment.stripe_charge_id is not None:
        params["charge"] = payment.stripe_charge_id
    else:
        params["payment_intent"] = payment.stripe_payment_intent_id
    if reason is not None:
        params["reason"] = reason
    # The same refund asked twice before the first is recorded (a double click) reaches Stripe once.
    key = f"gatewayz-refund:{payment.id}:{payment.refunded_cents}:{amount}"
    refund = stripe_client.plain(
        await stripe_client.call(state, lambda c: c.v1.refunds.create_async(params, {"idempotency_key": key}))
    )
    charge_id = _id_of(refund.get("charge"))
    if charge_id is None:
        raise Conflict("Stripe did not say which charge it refunded.", code="refund_without_charge")
    charge = stripe_client.plain(
        await stripe_client.call(state, lambda c: c.v1.charges.retrieve_async(charge_id))
    )
    async with state.pool.acquire() as conn:
        async with conn.transaction():
            await apply_charge_refunded(conn, state, charge, actor=actor.actor)
            await audit.record(
                conn,
                action="payment.refund",
                actor=actor,
                meta=meta,
                user_id=payment.user_id,
                subject_type="payment",
                subject_id=payment.id,
                before={"refunded_cents": payment.refunded_cents, "status": payment.status},
                metadata={"refund_id": refund.get("id"), "amount_cents": amount, "reason": reason},
            )
        fresh = await get_payment(conn, payment_id=payment.id)
    return Refunded(
        refund_id=str(refund.get("id")),
        amount_cents=int(refund.get("amount") or amount),
        status=str(refund.get("status") or "pending"),
        payment=fresh,
    )
