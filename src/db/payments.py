"""SQL for Stripe top-ups: payments, Stripe customers, handled webhook events and disputes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg

PAYMENT_COLUMNS = (
    "id, user_id, kind, package_id, amount_cents, discount_cents, amount_paid_cents, currency, coupon_code,"
    " credits, status, livemode, stripe_checkout_session_id, stripe_payment_intent_id, stripe_charge_id,"
    " stripe_customer_id, stripe_invoice_id, checkout_url, checkout_expires_at, refunded_cents,"
    " credits_refunded, credits_disputed, created_at, updated_at, paid_at, granted_at"
)
DISPUTE_COLUMNS = (
    "dispute_id, payment_id, amount_cents, status, credits_clawed_back, clawed_back_at, restored_at,"
    " created_at, updated_at"
)
# A decided dispute's status never changes again.
FINAL_DISPUTE_STATUSES = ("won", "lost", "warning_closed", "prevented")


@dataclass(frozen=True)
class Payment:
    id: UUID
    user_id: UUID
    kind: str
    package_id: str | None
    amount_cents: int
    discount_cents: int
    amount_paid_cents: int
    currency: str
    coupon_code: str | None
    credits: Decimal
    status: str
    livemode: bool
    stripe_checkout_session_id: str | None
    stripe_payment_intent_id: str | None
    stripe_charge_id: str | None
    stripe_customer_id: str | None
    stripe_invoice_id: str | None
    checkout_url: str | None
    checkout_expires_at: datetime | None
    refunded_cents: int
    credits_refunded: Decimal
    credits_disputed: Decimal
    created_at: datetime
    updated_at: datetime
    paid_at: datetime | None
    granted_at: datetime | None


@dataclass(frozen=True)
class Dispute:
    dispute_id: str
    payment_id: UUID
    amount_cents: int
    status: str
    credits_clawed_back: Decimal
    clawed_back_at: datetime | None
    restored_at: datetime | None
    created_at: datetime
    updated_at: datetime


def _payment(row: asyncpg.Record | None) -> Payment | None:
    return Payment(**dict(row)) if row else None


def _dispute(row: asyncpg.Record | None) -> Dispute | None:
    return Dispute(**dict(row)) if row else None


# -- payments ---------------------------------------------------------------------------------


async def insert_payment(
    conn: asyncpg.Connection,
    *,
    user_id: UUID,
    kind: str,
    package_id: str | None,
    amount_cents: int,
    currency: str,
    credits: Decimal,
    coupon_code: str | None,
    livemode: bool,
    stripe_customer_id: str | None,
) -> Payment:
    row = await conn.fetchrow(
        f"""INSERT INTO payments (user_id, kind, package_id, amount_cents, currency, credits, coupon_code,
                livemode, stripe_customer_id)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
            RETURNING {PAYMENT_COLUMNS}""",
        user_id,
        kind,
        package_id,
        amount_cents,
        currency,
        credits,
        coupon_code,
        livemode,
        stripe_customer_id,
    )
    payment = _payment(row)
    assert payment is not None
    return payment


async def set_discount(
    conn: asyncpg.Connection, *, payment_id: UUID, discount_cents: int, coupon_code: str
) -> Payment | None:
    row = await conn.fetchrow(
        f"""UPDATE payments SET discount_cents = $2, coupon_code = $3, updated_at = now()
            WHERE id = $1 RETURNING {PAYMENT_COLUMNS}""",
        payment_id,
        discount_cents,
        coupon_code,
    )
    return _payment(row)


async def attach_checkout(
    conn: asyncpg.Connection,
    *,
    payment_id: UUID,
    session_id: str,
    url: str | None,
    expires_at: datetime | None,
) -> Payment | None:
    """Record the checkout session of a payment (a webhook may have recorded it first: same id)."""
    row = await conn.fetchrow(
        f"""UPDATE payments SET stripe_checkout_session_id = $2, checkout_url = COALESCE($3, checkout_url),
                checkout_expires_at = COALESCE($4, checkout_expires_at), updated_at = now()
            WHERE id = $1 AND (stripe_checkout_session_id IS NULL OR stripe_checkout_session_id = $2)
            RETURNING {PAYMENT_COLUMNS}""",
        payment_id,
        session_id,
        url,
        expires_at,
    )
    return _payment(row)


async def get_payment(
    conn: asyncpg.Connection, *, payment_id: UUID, for_update: bool = False
) -> Payment | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = $1{lock}", payment_id)
    return _payment(row)


async def get_by_session(conn: asyncpg.Connection, *, session_id: str) -> Payment | None:
    row = await conn.fetchrow(
        f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE stripe_checkout_session_id = $1", session_id
    )
    return _payment(row)


async def get_by_charge(
    conn: asyncpg.Connection, *, charge_id: str | None, payment_intent_id: str | None
) -> Payment | None:
    """The payment of a charge, known by the charge's id or by its payment intent's."""
    row = await conn.fetchrow(
        f"""SELECT {PAYMENT_COLUMNS} FROM payments
            WHERE ($1::text IS NOT NULL AND stripe_charge_id = $1)
               OR ($2::text IS NOT NULL AND stripe_payment_intent_id = $2)
            LIMIT 1""",
        charge_id,
        payment_intent_id,
    )
    return _payment(row)


async def record_stripe_ids(
    conn: asyncpg.Connection,
    *,
    payment_id: UUID,
    payment_intent_id: str | None,
    charge_id: str | None,
    customer_id: str | None,
    invoice_id: str | None,
) -> None:
    """Fill in the Stripe ids a payment does not have yet (a known id is never replaced)."""
    await conn.execute(
        """UPDATE payments SET
                stripe_payment_intent_id = COALESCE(stripe_payment_intent_id, $2),
                stripe_charge_id = COALESCE(stripe_charge_id, $3),
                stripe_customer_id = COALESCE(stripe_customer_id, $4),
                stripe_invoice_id = COALESCE(stripe_invoice_id, $5),
                updated_at = now()
            WHERE id = $1""",
        payment_id,
        payment_intent_id,
        charge_id,
        customer_id,
        invoice_id,
    )


async def mark_granted(conn: asyncpg.Connection, *, payment_id: UUID, status: str) -> None:
    await conn.execute(
        """UPDATE payments SET status = $2, granted_at = now(), paid_at = COALESCE(paid_at, now()),
                updated_at = now()
            WHERE id = $1""",
        payment_id,
        status,
    )


async def set_status(
    conn: asyncpg.Connection, *, payment_id: UUID, status: str, only_from: tuple[str, ...]
) -> bool:
    """Move a payment to `status` if it is in one of `only_from`; False when it was not."""
    result = await conn.execute(
        "UPDATE payments SET status = $2, updated_at = now() WHERE id = $1 AND status = ANY($3::text[])",
        payment_id,
        status,
        list(only_from),
    )
    return bool(result.endswith(" 1"))


async def record_refund(
    conn: asyncpg.Connection, *, payment_id: UUID, refunded_cents: int, credits_refunded: Decimal, status: str
) -> None:
    await conn.execute(
        """UPDATE payments SET refunded_cents = $2, credits_refunded = $3, status = $4, updated_at = now()
            WHERE id = $1""",
        payment_id,
        refunded_cents,
        credits_refunded,
        status,
    )


async def record_disputed(
    conn: asyncpg.Connection, *, payment_id: UUID, credits_disputed: Decimal, status: str
) -> None:
    await conn.execute(
        "UPDATE payments SET credits_disputed = $2, status = $3, updated_at = now() WHERE id = $1",
        payment_id,
        credits_disputed,
        status,
    )


async def list_payments(
    conn: asyncpg.Connection,
    *,
    user_id: UUID | None,
    status: str | None,
    limit: int,
    offset: int,
) -> tuple[list[Payment], int]:
    """Payments newest first (of one user, and of one status, when given), and how many match."""
    where = "($1::uuid IS NULL OR user_id = $1) AND ($2::text IS NULL OR status = $2)"
    rows = await conn.fetch(
        f"""SELECT {PAYMENT_COLUMNS} FROM payments WHERE {where}
            ORDER BY created_at DESC, id DESC LIMIT $3 OFFSET $4""",
        user_id,
        status,
        limit,
        offset,
    )
    total = await conn.fetchval(f"SELECT count(*) FROM payments WHERE {where}", user_id, status)
    return [Payment(**dict(row)) for row in rows], int(total)


# -- Stripe customers -------------------------------------------------------------------------


async def get_customer(conn: asyncpg.Connection, *, user_id: UUID, livemode: bool) -> str | None:
    value: str | None = await conn.fetchval(
        "SELECT customer_id FROM stripe_customers WHERE user_id = $1 AND livemode = $2", user_id, livemode
    )
    return value


async def save_customer(conn: asyncpg.Connection, *, user_id: UUID, livemode: bool, customer_id: str) -> str:
    """Keep the user's customer; when one was saved concurrently, that one wins and is returned."""
    await conn.execute(
        """INSERT INTO stripe_customers (user_id, livemode, customer_id) VALUES ($1, $2, $3)
            ON CONFLICT DO NOTHING""",
        user_id,
        livemode,
        customer_id,
    )
    saved = await get_customer(conn, user_id=user_id, livemode=livemode)
    return saved or customer_id


async def user_of_customer(conn: asyncpg.Connection, *, customer_id: str) -> UUID | None:
    value: UUID | None = await conn.fetchval(
        "SELECT user_id FROM stripe_customers WHERE customer_id = $1", customer_id
    )
    return value


# -- webhook events ---------------------------------------------------------------------------


async def claim_event(
    conn: asyncpg.Connection,
    *,
    event_id: str,
    type: str,
    livemode: bool,
    object_id: str | None,
    created_at: datetime | None,
) -> bool:
    """Record an event as being handled; False when it was handled before.

    A concurrent delivery of the same event waits here until the first one's transaction ends.
    """
    row = await conn.fetchrow(
        """INSERT INTO stripe_webhook_events (event_id, type, livemode, object_id, created_at)
            VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (event_id) DO NOTHING RETURNING event_id""",
        event_id,
        type,
        livemode,
        object_id,
        created_at,
    )
    return row is not None


async def finish_event(conn: asyncpg.Connection, *, event_id: str, outcome: str) -> None:
    await conn.execute(
        "UPDATE stripe_webhook_events SET outcome = $2, processed_at = now() WHERE event_id = $1",
        event_id,
        outcome,
    )


async def get_event(conn: asyncpg.Connection, *, event_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        """SELECT event_id, type, livemode, object_id, outcome, created_at, received_at, processed_at
            FROM stripe_webhook_events WHERE event_id = $1""",
        event_id,
    )
    return dict(row) if row else None


# -- disputes ---------------------------------------------------------------------------------


async def lock_dispute(
    conn: asyncpg.Connection, *, dispute_id: str, payment_id: UUID, amount_cents: int, status: str
) -> Dispute:
    """The dispute's row, created if new, locked for this transaction, with Stripe's latest status.

    Events arrive out of order: once a dispute is decided, an older event cannot reopen it.
    """
    row = await conn.fetchrow(
        f"""INSERT INTO payment_disputes AS d (dispute_id, payment_id, amount_cents, status)
            VALUES ($1, $2, $3, $4)
            ON CONFLICT (dispute_id) DO UPDATE
            SET status = CASE WHEN d.status = ANY($5::text[]) THEN d.status ELSE EXCLUDED.status END,
                amount_cents = EXCLUDED.amount_cents, updated_at = now()
            RETURNING {DISPUTE_COLUMNS}""",
        dispute_id,
        payment_id,
        amount_cents,
        status,
        list(FINAL_DISPUTE_STATUSES),
    )
    dispute = _dispute(row)
    assert dispute is not None
    return dispute


async def record_dispute_clawback(conn: asyncpg.Connection, *, dispute_id: str, credits: Decimal) -> None:
    await conn.execute(
        """UPDATE payment_disputes SET credits_clawed_back = $2, clawed_back_at = now(), updated_at = now()
            WHERE dispute_id = $1""",
        dispute_id,
        credits,
    )


async def record_dispute_restored(conn: asyncpg.Connection, *, dispute_id: str) -> None:
    await conn.execute(
        "UPDATE payment_disputes SET restored_at = now(), updated_at = now() WHERE dispute_id = $1",
        dispute_id,
    )


async def open_disputes(conn: asyncpg.Connection, *, payment_id: UUID) -> int:
    value = await conn.fetchval(
        """SELECT count(*) FROM payment_disputes
            WHERE payment_id = $1 AND credits_clawed_back > 0 AND restored_at IS NULL""",
        payment_id,
    )
    return int(value)
