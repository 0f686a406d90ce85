"""The answer of GET /admin/transactions/analytics.

Money received is in the smallest unit of the Stripe currency (cents), as Stripe reports it;
credits are Decimal strings (1 credit = 1 USD).
"""

from __future__ import annotations

from datetime import date
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, Field

from src.schemas.users import Money


class Revenue(BaseModel):
    paid_cents: int = Field(description="What the payments paid in the window (or on the day) brought in.")
    refunded_cents: int = Field(description="What has been refunded of those payments, to date.")
    net_cents: int = Field(description="paid_cents - refunded_cents.")
    payments: int = Field(description="How many payments were paid.")


class RevenueDay(Revenue):
    date: date
    kind: str = Field(description="What was paid for: 'topup' or 'subscription'.")


class CreditsGranted(BaseModel):
    total: Money
    by_source: dict[str, Money] = Field(description="Credits granted per grant source.")


class CreditsGrantedDay(BaseModel):
    date: date
    source: str = Field(
        description="purchase, subscription, trial, coupon, referral, admin, refund_reversal."
    )
    amount: Money
    grants: int


class Usage(BaseModel):
    charged: Money = Field(description="Credits charged for usage.")
    requests: int = Field(description="Requests settled.")


class UsageDay(Usage):
    date: date


class TopPayer(BaseModel):
    user_id: UUID
    email: str | None
    paid_cents: int
    refunded_cents: int
    net_cents: int
    payments: int


class Refunds(BaseModel):
    count: int = Field(description="Payments of the window refunded, in part or in full.")
    amount_cents: int = Field(description="What has been refunded of them.")


class TrialConversion(BaseModel):
    started: int = Field(description="Trials started in the window.")
    converted: int = Field(description="How many of those have converted (paid) since.")
    conversion_rate: float | None = Field(
        description="converted / started, rounded to 4 decimals; null when no trial started."
    )


class BillingAnalytics(BaseModel):
    object: Literal["billing.analytics"] = "billing.analytics"
    start: date = Field(description="The first day of the window (UTC).")
    end: date = Field(description="The last day of the window (UTC), included.")
    currency: str = Field(description="The currency of every *_cents figure.")
    revenue: Revenue
    revenue_by_day: list[RevenueDay] = Field(description="Days without payments or refunds are left out.")
    credits_granted: CreditsGranted
    credits_granted_by_day: list[CreditsGrantedDay] = Field(description="Days without grants are left out.")
    usage: Usage
    usage_by_day: list[UsageDay] = Field(description="Days without usage are left out.")
    top_payers: list[TopPayer] = Field(description="Users who paid the most (net of refunds) in the window.")
    refunds: Refunds
    trials: TrialConversion
