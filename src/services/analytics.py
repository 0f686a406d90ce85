"""Billing analytics for operators: money in, credits granted, usage spend, refunds and trials.

The window is whole UTC days, `start` to `end` included (default: the last 30 days, today
included; at most MAX_WINDOW_DAYS). Revenue is what paid payments brought in, in the configured
Stripe currency and the mode (live or test) of the configured key, on the day each was paid;
refunds count against the payment they refund, so a day's net figure is what that day's
payments are still worth. Trial conversion is a cohort: of the trials started in the window, how
many have converted since.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

import asyncpg

from src.config import Settings
from src.db import analytics as analytics_db
from src.errors import InvalidRequest
from src.services import stripe_client

DEFAULT_WINDOW_DAYS = 30
MAX_WINDOW_DAYS = 366
# NUMERIC(20, 10)'s zero, so an empty sum renders like every other amount.
ZERO = Decimal("0E-10")


@dataclass(frozen=True)
class Revenue:
    paid_cents: int
    refunded_cents: int
    payments: int

    @property
    def net_cents(self) -> int:
        return self.paid_cents - self.refunded_cents


@dataclass(frozen=True)
class RevenueDay(Revenue):
    date: date
    kind: str


@dataclass(frozen=True)
class GrantedDay:
    date: date
    source: str
    amount: Decimal
    grants: int


@dataclass(frozen=True)
class Usage:
    charged: Decimal
    requests: int


@dataclass(frozen=True)
class UsageDay(Usage):
    date: date


@dataclass(frozen=True)
class TopPayer(analytics_db.Payer):
    @property
    def net_cents(self) -> int:
        return self.paid_cents - self.refunded_cents


@dataclass(frozen=True)
class TrialConversion:
    started: int
    converted: int

    @property
    def conversion_rate(self) -> float | None:
        return round(self.converted / self.started, 4) if self.started else None


@dataclass(frozen=True)
class CreditsGranted:
    total: Decimal
    by_source: dict[str, Decimal]


@dataclass(frozen=True)
class Report:
    start: date
    end: date
    currency: str
    revenue: Revenue
    revenue_by_day: list[RevenueDay]
    credits_granted: CreditsGranted
    credits_granted_by_day: list[GrantedDay]
    usage: Usage
    usage_by_day: list[UsageDay]
    top_payers: list[TopPayer]
    refunds: analytics_db.Refunds
    trials: TrialConversion


def window(start: date | None, end: date | None, *, today: date | None = None) -> tuple[date, date]:
    """The window's first and last day, defaults applied and bounds checked."""
    today = today or datetime.now(UTC).date()
    end = end or (today if start is None else min(today, start + timedelta(days=DEFAULT_WINDOW_DAYS - 1)))
    start = start or end - timedelta(days=DEFAULT_WINDOW_DAYS - 1)
    if end < start:
        raise InvalidRequest("'end' must not be before 'start'.", param="end", code="invalid_range")
    if (end - start).days + 1 > MAX_WINDOW_DAYS:
        raise InvalidRequest(
            f"The window may span at most {MAX_WINDOW_DAYS} days.", param="start", code="window_too_large"
        )
    return start, end


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


async def report(
    conn: asyncpg.Connection, settings: Settings, *, start: date | None, end: date | None, top: int
) -> Report:
    """Every figure of the window, read in one snapshot."""
    first, last = window(start, end)
    since, until = _midnight(first), _midnight(last + timedelta(days=1))
    currency = settings.stripe_currency.lower()
    livemode = stripe_client.key_is_live(settings)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        paid = await analytics_db.revenue(conn, start=since, end=until, currency=currency, livemode=livemode)
        payers = await analytics_db.top_payers(
            conn, start=since, end=until, currency=currency, livemode=livemode, limit=top
        )
        refunds = await analytics_db.refunds(
            conn, start=since, end=until, currency=currency, livemode=livemode
        )
        granted = await analytics_db.credits_granted(conn, start=since, end=until)
        usage = await analytics_db.usage(conn, start=since, end=until)
        cohort = await analytics_db.trial_cohort(conn, start=since, end=until)
    by_source: dict[str, Decimal] = defaultdict(lambda: ZERO)
    for grant in granted:
        by_source[grant.source] += grant.amount
    return Report(
        start=first,
        end=last,
        currency=currency,
        revenue=Revenue(
            paid_cents=sum(row.paid_cents for row in paid),
            refunded_cents=sum(row.refunded_cents for row in paid),
            payments=sum(row.payments for row in paid),
        ),
        revenue_by_day=[
            RevenueDay(
                date=row.day,
                kind=row.kind,
                paid_cents=row.paid_cents,
                refunded_cents=row.refunded_cents,
                payments=row.payments,
            )
            for row in paid
        ],
        credits_granted=CreditsGranted(
            total=sum(by_source.values(), ZERO), by_source=dict(sorted(by_source.items()))
        ),
        credits_granted_by_day=[
            GrantedDay(date=row.day, source=row.source, amount=row.amount, grants=row.grants)
            for row in granted
        ],
        usage=Usage(
            charged=sum((row.charged for row in usage), ZERO), requests=sum(row.requests for row in usage)
        ),
        usage_by_day=[UsageDay(date=row.day, charged=row.charged, requests=row.requests) for row in usage],
        top_payers=[TopPayer(**vars(payer)) for payer in payers],
        refunds=refunds,
        trials=TrialConversion(started=cohort.started, converted=cohort.converted),
    )
