"""Subscriptions to plans through Stripe: checkout, plan changes, cancellation, and the webhook events.

Stripe is the source of truth for a subscription; its webhook events drive the user's plan:

    customer.subscription.created/updated/deleted (and paused/resumed/pending_update_*)
        -> user_plans through plans.apply_subscription, with Stripe's status mapped:
           active, trialing -> active; past_due, unpaid -> past_due; canceled -> cancelled;
           incomplete_expired, paused -> expired; incomplete -> nothing yet (no plan before the
           first payment). The plan is the one whose stripe_price_id is the item's price.
    invoice.paid (billing_reason subscription_create or subscription_cycle only)
        -> the period's allowance (plan.credits_included) as a 'subscription' grant referenced by
           the invoice id, expiring at the end of the invoice line's period; UNIQUE (source,
           reference) of credit_grants makes it once per invoice. The previous period's allowance
           ends when the new one arrives (no carry-over). A first paid invoice converts a trial.
           A proration invoice (billing_reason subscription_update) grants nothing.
    invoice.payment_failed -> the subscription's plan is past_due (it keeps its limits while
           Stripe retries).

Events arrive late, repeated and out of order: `stripe_subscriptions` keeps the newest event
applied per subscription, so an older one is skipped and a cancelled subscription stays
cancelled. Each event runs inside the webhook's transaction for that event; raising makes the
webhook answer non-2xx, so Stripe retries (used when a retry can succeed: an event for one of our
plans whose subscriber is not known yet, a price no plan has any more).

Subscription-mode checkout.session.* events are ignored: the subscription's own events carry
everything. The routes ask Stripe for changes (checkout, plan change, cancellation) and answer with what
Stripe returned; user_plans changes only through the events.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

import asyncpg
from stripe import RequestOptions

from src.db import plans as plans_db
from src.db import subscriptions as subscriptions_db
from src.db import users as users_db
from src.errors import Conflict, InvalidRequest, NotFound, UpstreamError
from src.services import grants, notifications, payments, stripe_client, trials
from src.services import plans as plans_service
from src.services.grants import Grant
from src.services.plans import Plan, UserPlan

if TYPE_CHECKING:
    from src.state import AppState

logger = logging.getLogger("gatewayz.subscriptions")

# Metadata the server writes on the checkout session and the subscription it creates.
METADATA_KIND = "subscription"
# Stripe's subscription statuses, as user_plans statuses; a status not here changes nothing.
STATUS_MAP: dict[str, str] = {
    "active": "active",
    "trialing": "active",
    "past_due": "past_due",
    "unpaid": "past_due",
    "canceled": "cancelled",
    "incomplete_expired": "expired",
    "paused": "expired",
}
# The invoices that pay for a period; a proration invoice (subscription_update) is not one.
ALLOWANCE_REASONS = frozenset({"subscription_create", "subscription_cycle"})
# customer.subscription.* events that say nothing about the subscription's state.
NOTICE_EVENTS = frozenset({"customer.subscription.trial_will_end"})
ACTOR = "stripe:webhook"


class SubscriptionEventError(Exception):
    """An event of ours that cannot be applied now; the webhook answers non-2xx so Stripe retries."""


# -- reading Stripe objects ------------------------------------------------------------------


def _dig(value: Any, *path: str) -> Any:
    for name in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(name)
    return value


def _object_id(value: Any) -> str | None:
    """An id field, whether Stripe sent the id or the expanded object."""
    if isinstance(value, str) and value:
        return value
    found = _dig(value, "id")
    return found if isinstance(found, str) and found else None


def _time(value: Any) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return datetime.fromtimestamp(value, UTC)


def _metadata_user(metadata: Any) -> UUID | None:
    """The user our checkout wrote into a subscription's metadata; None for anything else."""
    if not isinstance(metadata, Mapping) or metadata.get("kind") != METADATA_KIND:
        return None
    try:
        return UUID(str(metadata.get("user_id")))
    except ValueError:
        return None


def _items(subscription: Mapping[str, Any]) -> list[dict[str, Any]]:
    data = _dig(subscription, "items", "data")
    return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []


def _subscription_price(subscription: Mapping[str, Any]) -> str | None:
    for item in _items(subscription):
        price = _object_id(item.get("price"))
        if price:
            return price
    return None


def _subscription_period(subscription: Mapping[str, Any]) -> tuple[datetime | None, datetime | None]:
    """The current period: on the item (current API versions) or on the subscription (older ones)."""
    for item in _items(subscription):
        start, end = _time(item.get("current_period_start")), _time(item.get("current_period_end"))
        if start or end:
            return start, end
    return _time(subscription.get("current_period_start")), _time(subscription.get("current_period_end"))


def _invoice_subscription(invoice: Mapping[str, Any]) -> str | None:
    return _object_id(_dig(invoice, "parent", "subscription_details", "subscription")) or _object_id(
        invoice.get("subscription")
    )


def _invoice_metadata(invoice: Mapping[str, Any]) -> Any:
    """The subscription's metadata as it was when the invoice was made."""
    return _dig(invoice, "parent", "subscription_details", "metadata") or _dig(
        invoice, "subscription_details", "metadata"
    )


def _line_price(line: Mapping[str, Any]) -> str | None:
    return _object_id(_dig(line, "pricing", "price_details", "price")) or _object_id(line.get("price"))


def _is_proration(line: Mapping[str, Any]) -> bool:
    parent = line.get("parent")
    if isinstance(parent, Mapping):
        for details in ("subscription_item_details", "invoice_item_details"):
            if _dig(parent, details, "proration") is True:
                return True
    return line.get("proration") is True


def _allowance_line(invoice: Mapping[str, Any]) -> dict[str, Any] | None:
    """The invoice's line for the subscription's price over the period it pays for."""
    lines = _dig(invoice, "lines", "data")
    for line in lines if isinstance(lines, list) else []:
        if isinstance(line, dict) and not _is_proration(line) and _line_price(line):
            return line
    return None


# -- webhook events --------------------------------------------------------------------------


async def handle_event(conn: asyncpg.Connection, state: AppState, event: Any) -> bool:
    """Apply one customer.subscription.* or invoice.* event; False when it is deliberately ignored.

    Runs inside the event's transaction; raises SubscriptionEventError when a retry may succeed.
    """
    body = stripe_client.plain(event)
    kind = body.get("type")
    obj = _dig(body, "data", "object")
    if not isinstance(kind, str) or not isinstance(obj, dict):
        return False
    event_at = _time(body.get("created")) or datetime.now(UTC)
    if kind.startswith("customer.subscription.") and kind not in NOTICE_EVENTS:
        return await _on_subscription(
            conn, state, obj, event_at=event_at, deleted=kind == "customer.subscription.deleted"
        )
    if kind == "invoice.paid":
        return await _on_invoice_paid(conn, obj)
    if kind == "invoice.payment_failed":
        return await _on_payment_failed(conn, state, obj, event_at=event_at)
    return False


async def _subscriber(conn: asyncpg.Connection, *, stripe_subscription_id: str, metadata: Any) -> UUID | None:
    """Whose subscription it is: as recorded, else as our checkout wrote it (an existing user)."""
    row = await plans_db.get_subscription(conn, stripe_subscription_id=stripe_subscription_id)
    if row is not None:
        return row.user_id
    owner = await subscriptions_db.subscription_owner(conn, stripe_subscription_id=stripe_subscription_id)
    if owner is not None:
        return owner
    user_id = _metadata_user(metadata)
    if user_id is None or await users_db.get_user(conn, user_id=user_id) is None:
        return None
    return user_id


async def _plan_for_price(conn: asyncpg.Connection, price_id: str | None) -> Plan | None:
    if price_id is None:
        return None
    return await plans_service.plan_for_stripe_price(conn, price_id=price_id)


async def _on_subscription(
    conn: asyncpg.Connection,
    state: AppState,
    subscription: dict[str, Any],
    *,
    event_at: datetime,
    deleted: bool,
) -> bool:
    subscription_id, stripe_status = subscription.get("id"), subscription.get("status")
    if not isinstance(subscription_id, str) or not isinstance(stripe_status, str):
        return False
    user_id = await _subscriber(
        conn, stripe_subscription_id=subscription_id, metadata=subscription.get("metadata")
    )
    if user_id is None:
        logger.warning("subscription %s is not one of ours; ignored", subscription_id)
        return False
    status = STATUS_MAP.get(stripe_status)
    if deleted and status in plans_db.CURRENT_STATUSES:
        status = "cancelled"
    plan = await _plan_for_price(conn, _subscription_price(subscription))
    if plan is None and status in plans_db.CURRENT_STATUSES:
        raise SubscriptionEventError(f"subscription {subscription_id}: its price is no plan's")
    owner = await subscriptions_db.record_event(
        conn,
        stripe_subscription_id=subscription_id,
        user_id=user_id,
        stripe_status="canceled" if deleted else stripe_status,
        event_at=event_at,
    )
    if owner is None:
        logger.info("subscription %s: a stale event (%s) skipped", subscription_id, stripe_status)
        return False
    if status is None:  # incomplete: the plan starts when the first payment succeeds
        return False
    if plan is None:  # ended, on a price no plan has any more: end the row, if there is one
        ended = await plans_service.set_status(
            conn, state, stripe_subscription_id=subscription_id, status=status
        )
        return ended is not None
    start, end = _subscription_period(subscription)
    renews = not subscription.get("cancel_at_period_end") and subscription.get("cancel_at") is None
    await plans_service.apply_subscription(
        conn,
        state,
        user_id=owner,
        plan_id=plan.id,
        status=status,
        period_start=start,
        period_end=end,
        stripe_subscription_id=subscription_id,
        stripe_customer_id=_object_id(subscription.get("customer")),
        auto_renew=renews and status in plans_db.CURRENT_STATUSES,
    )
    return True


async def _on_invoice_paid(conn: asyncpg.Connection, invoice: dict[str, Any]) -> bool:
    invoice_id, subscription_id = invoice.get("id"), _invoice_subscription(invoice)
    if not isinstance(invoice_id, str) or subscription_id is None:
        return False  # not a subscription's invoice (a top-up's, for one)
    reason = invoice.get("billing_reason")
    if reason not in ALLOWANCE_REASONS:
        logger.info("invoice %s (%s) pays for no new period; no allowance", invoice_id, reason)
        return False
    line = _allowance_line(invoice)
    plan = await _plan_for_price(conn, _line_price(line) if line else None)
    user_id = await _subscriber(
        conn, stripe_subscription_id=subscription_id, metadata=_invoice_metadata(invoice)
    )
    if plan is None or line is None:
        if user_id is None:
            return False
        raise SubscriptionEventError(f"invoice {invoice_id}: no line for a plan's price")
    if user_id is None:
        raise SubscriptionEventError(f"invoice {invoice_id}: subscription {subscription_id} not known yet")
    period_start, period_end = _time(_dig(line, "period", "start")), _time(_dig(line, "period", "end"))
    if period_end is None:
        raise SubscriptionEventError(f"invoice {invoice_id}: its line has no period")
    # The receipt and the conversion are keyed by the invoice: a replayed event adds neither.
    amount_paid = invoice.get("amount_paid")
    if isinstance(amount_paid, int) and amount_paid > 0:
        await trials.record_conversion(conn, user_id=user_id, payment_reference=invoice_id)
        await notifications.payment_confirmed(
            conn,
            user_id=user_id,
            payment_reference=invoice_id,
            amount_cents=amount_paid,
            currency=str(invoice.get("currency") or "usd"),
            credits=plan.credits_included,
            description=f"{plan.name} plan subscription",
        )
    if plan.credits_included <= 0:
        return True
    granted = await grants.grant(
        conn,
        user_id=user_id,
        amount=plan.credits_included,
        source="subscription",
        reference=invoice_id,
        actor=ACTOR,
        expires_at=period_end,
        reason=f"{plan.name} plan allowance",
    )
    if granted is None:
        return True  # this invoice's allowance was granted before
    # No carry-over: what is left of earlier periods' allowances ends with the new one.
    for reference in await subscriptions_db.earlier_allowances(
        conn, user_id=user_id, ending_by=period_start or period_end, except_reference=invoice_id
    ):
        await grants.expire_now(
            conn, user_id=user_id, source="subscription", reference=reference, actor=ACTOR
        )
    return True


async def _on_payment_failed(
    conn: asyncpg.Connection, state: AppState, invoice: dict[str, Any], *, event_at: datetime
) -> bool:
    subscription_id = _invoice_subscription(invoice)
    if subscription_id is None:
        return False
    owner = await subscriptions_db.record_payment_failure(
        conn, stripe_subscription_id=subscription_id, event_at=event_at
    )
    row = await plans_db.get_subscription(conn, stripe_subscription_id=subscription_id)
    # Only a live plan falls behind: a failed first payment has no plan yet, an ended one stays ended.
    if owner is None or row is None or row.status != "active":
        return False
    await plans_service.set_status(conn, state, stripe_subscription_id=subscription_id, status="past_due")
    return True


# -- subscribing, changing, cancelling -------------------------------------------------------


@dataclass(frozen=True)
class CheckoutStarted:
    id: str
    url: str | None
    plan_id: int


@dataclass(frozen=True)
class SubscriptionView:
    id: str
    plan: Plan
    status: str
    current_period_start: datetime | None
    current_period_end: datetime | None
    cancel_at_period_end: bool
    allowances: list[Grant]


async def _subscribable(conn: asyncpg.Connection, plan_id: int) -> Plan:
    plan = await plans_service.get_public_plan(conn, plan_id=plan_id)
    if plan.is_default or not plan.stripe_price_id:
        raise InvalidRequest(
            "This plan is not sold as a subscription.", param="plan_id", code="plan_not_subscribable"
        )
    return plan


async def _current_subscription(conn: asyncpg.Connection, user_id: UUID) -> UserPlan:
    for row in await plans_db.current_rows(conn, user_id=user_id):
        if row.stripe_subscription_id:
            return row
    raise NotFound("You have no subscription.", code="no_subscription")


def _stripe_options(idempotency_key: str | None, *parts: object) -> RequestOptions:
    # Our Idempotency-Key, tied to the caller and the action, keeps a retried call to Stripe single too.
    if idempotency_key is None:
        return {}
    return {"idempotency_key": ":".join(str(part) for part in (*parts, idempotency_key.strip()))}


async def start_checkout(
    conn: asyncpg.Connection,
    state: AppState,
    *,
    user_id: UUID,
    plan_id: int,
    success_url: str,
    cancel_url: str,
    idempotency_key: str | None = None,
) -> CheckoutStarted:
    """A Stripe Checkout Session (subscription mode) for the plan's price; metadata written here only."""
    plan = await _subscribable(conn, plan_id)
    payments.check_return_url(state.settings, success_url, param="success_url")
    payments.check_return_url(state.settings, cancel_url, param="cancel_url")
    current = await plans_db.current_rows(conn, user_id=user_id)
    if any(row.stripe_subscription_id for row in current) or await subscriptions_db.has_live_subscription(
        conn, user_id=user_id
    ):
        raise Conflict(
            "You already have a subscription: change its plan or cancel it.",
            param="plan_id",
            code="subscription_exists",
        )
    metadata = {"kind": METADATA_KIND, "user_id": str(user_id), "plan_id": str(plan.id)}
    params: dict[str, Any] = {
        "mode": "subscription",
        "line_items": [{"price": plan.stripe_price_id, "quantity": 1}],
        "success_url": success_url,
        "cancel_url": cancel_url,
        "client_reference_id": str(user_id),
        "metadata": metadata,
        "subscription_data": {"metadata": metadata},
        # The user's one Stripe customer, shared with their top-ups.
        "customer": await payments.ensure_customer(state, user_id=user_id),
    }
    options = _stripe_options(idempotency_key, "subscription-checkout", user_id)
    session = await stripe_client.call(
        state, lambda c: c.v1.checkout.sessions.create_async(cast(Any, params), options)
    )
    logger.info("subscription checkout %s for plan %s", session.id, plan.id)
    return CheckoutStarted(id=session.id, url=session.url, plan_id=plan.id)


async def cancel(
    conn: asyncpg.Connection, state: AppState, *, user_id: UUID, immediately: bool
) -> SubscriptionView:
    """Cancel the caller's subscription at the end of the paid period, or now."""
    row = await _current_subscription(conn, user_id)
    assert row.stripe_subscription_id is not None
    subscription_id = row.stripe_subscription_id
    if immediately:
        updated = await stripe_client.call(state, lambda c: c.v1.subscriptions.cancel_async(subscription_id))
    else:
        updated = await stripe_client.call(
            state, lambda c: c.v1.subscriptions.update_async(subscription_id, {"cancel_at_period_end": True})
        )
    return await _stripe_view(conn, user_id=user_id, row=row, subscription=stripe_client.plain(updated))


def _monthly_price(plan: Plan) -> Decimal:
    return Decimal(plan.price_cents) / (12 if plan.billing_interval == "year" else 1)


async def change_plan(
    conn: asyncpg.Connection,
    state: AppState,
    *,
    user_id: UUID,
    plan_id: int,
    idempotency_key: str | None = None,
) -> SubscriptionView:
    """Move the caller's subscription to another plan, prorated.

    An upgrade is invoiced at once and applies only when that invoice is paid (Stripe's pending
    update); a downgrade applies now and its credit goes to the next invoice.
    """
    row = await _current_subscription(conn, user_id)
    assert row.stripe_subscription_id is not None
    plan = await _subscribable(conn, plan_id)
    if plan.id == row.plan_id:
        raise InvalidRequest("You are already on this plan.", param="plan_id", code="same_plan")
    current = await plans_service.get_plan(conn, plan_id=row.plan_id)
    subscription_id = row.stripe_subscription_id
    found = stripe_client.plain(
        await stripe_client.call(state, lambda c: c.v1.subscriptions.retrieve_async(subscription_id))
    )
    items = _items(found)
    if not items or not isinstance(items[0].get("id"), str):
        raise UpstreamError("Stripe returned a subscription without items.", code="stripe_error")
    upgrade = _monthly_price(plan) > _monthly_price(current)
    params: dict[str, Any] = {
        "items": [{"id": items[0]["id"], "price": plan.stripe_price_id}],
        "proration_behavior": "always_invoice" if upgrade else "create_prorations",
    }
    if upgrade:
        params["payment_behavior"] = "pending_if_incomplete"
    options = _stripe_options(idempotency_key, "subscription-change", user_id)
    updated = await stripe_client.call(
        state, lambda c: c.v1.subscriptions.update_async(subscription_id, cast(Any, params), options)
    )
    logger.info("subscription %s: plan %s -> %s", row.stripe_subscription_id, current.id, plan.id)
    return await _stripe_view(conn, user_id=user_id, row=row, subscription=stripe_client.plain(updated))


async def _allowances(conn: asyncpg.Connection, user_id: UUID) -> list[Grant]:
    return [
        grant for grant in await grants.live_grants(conn, user_id=user_id) if grant.source == "subscription"
    ]


async def _stripe_view(
    conn: asyncpg.Connection, *, user_id: UUID, row: UserPlan, subscription: dict[str, Any]
) -> SubscriptionView:
    """The subscription as Stripe just returned it (user_plans follows when its event arrives)."""
    plan = await _plan_for_price(conn, _subscription_price(subscription))
    if plan is None:
        plan = await plans_service.get_plan(conn, plan_id=row.plan_id)
    stripe_status = str(subscription.get("status") or "")
    start, end = _subscription_period(subscription)
    return SubscriptionView(
        id=str(subscription.get("id") or row.stripe_subscription_id),
        plan=plan,
        status=STATUS_MAP.get(stripe_status, stripe_status),
        current_period_start=start or row.current_period_start,
        current_period_end=end or row.current_period_end,
        cancel_at_period_end=bool(subscription.get("cancel_at_period_end"))
        or subscription.get("cancel_at") is not None,
        allowances=await _allowances(conn, user_id),
    )


async def get_subscription(conn: asyncpg.Connection, *, user_id: UUID) -> SubscriptionView:
    """The caller's subscription (the current one, else the latest), as the webhook events left it."""
    subscription_id = await subscriptions_db.latest_subscription_id(conn, user_id=user_id)
    row = (
        await plans_db.get_subscription(conn, stripe_subscription_id=subscription_id)
        if subscription_id is not None
        else None
    )
    if row is None or row.stripe_subscription_id is None:
        raise NotFound("You have no subscription.", code="no_subscription")
    plan = await plans_service.get_plan(conn, plan_id=row.plan_id)
    current = row.status in plans_db.CURRENT_STATUSES
    return SubscriptionView(
        id=row.stripe_subscription_id,
        plan=plan,
        status=row.status,
        current_period_start=row.current_period_start,
        current_period_end=row.current_period_end,
        cancel_at_period_end=current and not row.auto_renew,
        allowances=await _allowances(conn, user_id),
    )
