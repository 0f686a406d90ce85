"""SQL for billing analytics over a window [start, end): money in, credits granted, usage, trials.

Days are UTC calendar days. Each query reads one table through its time index (see migration
20261126001300_billing_analytics.sql).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from uuid import UUID

import asyncpg

# The UTC calendar day of a timestamptz column, whatever the session's time zone.
_DAY = "(({column} AT TIME ZONE 'UTC')::date)"


def _day(column: str) -> str:
    return _DAY.format(column=column)


@dataclass(frozen=True)
class GrantedDay:
    day: date
    source: str
    amount: Decimal
    grants: int


@dataclass(frozen=True)
class UsageDay:
    day: date
    charged: Decimal
    requests: int


@dataclass(frozen=True)
class RevenueDay:
    day: date
    kind: str
    paid_cents: int
    refunded_cents: int
    payments: int


@dataclass(frozen=True)
class Payer:
    user_id: UUID
    email: str | None
    paid_cents: int
    refunded_cents: int
    payments: int


@dataclass(frozen=True)
class Refunds:
    count: int
    amount_cents: int


@dataclass(frozen=True)
class TrialCohort:
    started: int
    converted: int


# Payments paid in the window, in one currency and Stripe mode. Refunds count against the payment
# they refund (the day it was paid), to date: Stripe reports a charge's refunded total, not when
# each part of it was refunded.
_PAID = """FROM payments p
    WHERE p.paid_at >= $1 AND p.paid_at < $2 AND lower(p.currency) = $3 AND p.livemode = $4"""


async def revenue(
    conn: asyncpg.Connection, *, start: datetime, end: datetime, currency: str, livemode: bool
) -> list[RevenueDay]:
    """Money paid per day and kind of payment, with what has been refunded of it."""
    rows = await conn.fetch(
        f"""SELECT {_day("p.paid_at")} AS day, p.kind, sum(p.amount_paid_cents)::bigint AS paid_cents,
                sum(p.refunded_cents)::bigint AS refunded_cents, count(*) AS payments
            {_PAID}
            GROUP BY 1, 2 ORDER BY 1, 2""",
        start,
        end,
        currency,
        livemode,
    )
    return [RevenueDay(**dict(row)) for row in rows]


async def top_payers(
    conn: asyncpg.Connection, *, start: datetime, end: datetime, currency: str, livemode: bool, limit: int
) -> list[Payer]:
    """The users who paid the most in the window, net of refunds."""
    rows = await conn.fetch(
        f"""SELECT t.user_id, u.email, t.paid_cents, t.refunded_cents, t.payments
            FROM (
                SELECT p.user_id, sum(p.amount_paid_cents)::bigint AS paid_cents,
                    sum(p.refunded_cents)::bigint AS refunded_cents, count(*) AS payments
                {_PAID}
                GROUP BY p.user_id
                ORDER BY sum(p.amount_paid_cents) - sum(p.refunded_cents) DESC, p.user_id
                LIMIT $5
            ) t JOIN users u ON u.id = t.user_id
            ORDER BY t.paid_cents - t.refunded_cents DESC, t.user_id""",
        start,
        end,
        currency,
        livemode,
        limit,
    )
    return [Payer(**dict(row)) for row in rows]


async def refunds(
    conn: asyncpg.Connection, *, start: datetime, end: datetime, currency: str, livemode: bool
) -> Refunds:
    """Payments of the window that were refunded (in part or in full), and the amount."""
    row = await conn.fetchrow(
        f"""SELECT count(*) FILTER (WHERE p.refunded_cents > 0) AS count,
                COALESCE(sum(p.refunded_cents), 0)::bigint AS amount_cents
            {_PAID}""",
        start,
        end,
        currency,
        livemode,
    )
    assert row is not None
    return Refunds(count=row["count"], amount_cents=row["amount_cents"])


async def credits_granted(conn: asyncpg.Connection, *, start: datetime, end: datetime) -> list[GrantedDay]:
    """Credits granted per day and source."""
    rows = await conn.fetch(
        f"""SELECT {_day("created_at")} AS day, source, sum(amount) AS amount, count(*) AS grants
            FROM credit_grants WHERE created_at >= $1 AND created_at < $2
            GROUP BY 1, 2 ORDER BY 1, 2""",
        start,
        end,
    )
    return [GrantedDay(**dict(row)) for row in rows]


async def usage(conn: asyncpg.Connection, *, start: datetime, end: datetime) -> list[UsageDay]:
    """Credits charged for usage per day, with the number of requests settled."""
    rows = await conn.fetch(
        f"""SELECT {_day("created_at")} AS day, sum(charged) AS charged, count(*) AS requests
            FROM usage_records WHERE created_at >= $1 AND created_at < $2
            GROUP BY 1 ORDER BY 1""",
        start,
        end,
    )
    return [UsageDay(**dict(row)) for row in rows]


async def trial_cohort(conn: asyncpg.Connection, *, start: datetime, end: datetime) -> TrialCohort:
    """Trials started in the window, and how many of those have converted (by now)."""
    row = await conn.fetchrow(
        """SELECT count(*) AS started, count(converted_at) AS converted
            FROM trials WHERE started_at >= $1 AND started_at < $2""",
        start,
        end,
    )
    assert row is not None
    return TrialCohort(started=row["started"], converted=row["converted"])
