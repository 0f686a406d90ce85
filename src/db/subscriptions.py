"""SQL for Stripe subscriptions: the ordering record of their events, and their allowance grants.

The plan rows themselves (user_plans) belong to src/db/plans.py.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

import asyncpg

# Stripe statuses a subscription never leaves.
FINAL_STATUSES = ("canceled", "incomplete_expired")


async def record_event(
    conn: asyncpg.Connection,
    *,
    stripe_subscription_id: str,
    user_id: UUID,
    stripe_status: str,
    event_at: datetime,
) -> UUID | None:
    """Note a subscription event unless it is stale; the subscription's owner, or None if stale.

    Stale: older than the newest event applied, or bringing a subscription back from a final
    status. Locks the subscription's row until the transaction ends.
    """
    owner: UUID | None = await conn.fetchval(
        """INSERT INTO stripe_subscriptions AS s (stripe_subscription_id, user_id, stripe_status, last_event_at)
            VALUES ($1, $2, $3, $4)
            ON CONFLICT (stripe_subscription_id) DO UPDATE
            SET stripe_status = EXCLUDED.stripe_status, last_event_at = EXCLUDED.last_event_at,
                updated_at = now()
            WHERE s.last_event_at <= EXCLUDED.last_event_at
              AND (s.stripe_status <> ALL($5::text[]) OR EXCLUDED.stripe_status = ANY($5::text[]))
            RETURNING s.user_id""",
        stripe_subscription_id,
        user_id,
        stripe_status,
        event_at,
        list(FINAL_STATUSES),
    )
    return owner


async def record_payment_failure(
    conn: asyncpg.Connection, *, stripe_subscription_id: str, event_at: datetime
) -> UUID | None:
    """Note a failed payment of a known, live subscription unless stale; its owner, or None."""
    owner: UUID | None = await conn.fetchval(
        """UPDATE stripe_subscriptions
            SET stripe_status = 'past_due', last_event_at = $2, updated_at = now()
            WHERE stripe_subscription_id = $1 AND last_event_at <= $2 AND stripe_status <> ALL($3::text[])
            RETURNING user_id""",
        stripe_subscription_id,
        event_at,
        list(FINAL_STATUSES),
    )
    return owner


async def subscription_owner(conn: asyncpg.Connection, *, stripe_subscription_id: str) -> UUID | None:
    """The user a subscription was created for, as its events recorded it."""
    owner: UUID | None = await conn.fetchval(
        "SELECT user_id FROM stripe_subscriptions WHERE stripe_subscription_id = $1", stripe_subscription_id
    )
    return owner


async def earlier_allowances(
    conn: asyncpg.Connection, *, user_id: UUID, ending_by: datetime, except_reference: str
) -> list[str]:
    """References (invoice ids) of the user's live subscription grants whose period ends by `ending_by`."""
    rows = await conn.fetch(
        """SELECT reference FROM credit_grants
            WHERE user_id = $1 AND source = 'subscription' AND live
              AND expires_at IS NOT NULL AND expires_at <= $2 AND reference <> $3
            ORDER BY expires_at, id""",
        user_id,
        ending_by,
        except_reference,
    )
    return [row["reference"] for row in rows]


async def latest_subscription_id(conn: asyncpg.Connection, *, user_id: UUID) -> str | None:
    """The id of the user's Stripe subscription: the current one, else the most recent."""
    found: str | None = await conn.fetchval(
        """SELECT stripe_subscription_id FROM user_plans
            WHERE user_id = $1 AND stripe_subscription_id IS NOT NULL
            ORDER BY status IN ('active', 'past_due') DESC, id DESC
            LIMIT 1""",
        user_id,
    )
    return found


async def has_live_subscription(conn: asyncpg.Connection, *, user_id: UUID) -> bool:
    """Whether the user has a subscription that Stripe has not ended (incomplete ones included)."""
    return bool(
        await conn.fetchval(
            """SELECT EXISTS (SELECT 1 FROM stripe_subscriptions
                WHERE user_id = $1 AND stripe_status <> ALL($2::text[]))""",
            user_id,
            list(FINAL_STATUSES),
        )
    )
