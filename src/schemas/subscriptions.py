"""Bodies and answers of the subscription routes (/api/stripe/subscription...)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field, StrictBool

from src.schemas.common import Strict
from src.schemas.plans import PlanId, PlanOut
from src.schemas.users import Money

ReturnUrl = Annotated[
    str,
    Field(
        min_length=1,
        max_length=2048,
        description="Where Stripe sends the browser back; it must be on an allowed checkout origin.",
        examples=["https://app.gatewayz.ai/billing/done"],
    ),
]


class SubscriptionCheckoutRequest(Strict):
    plan_id: PlanId = Field(description="The plan to subscribe to.", examples=[2])
    success_url: ReturnUrl
    cancel_url: ReturnUrl


class SubscriptionCheckout(BaseModel):
    object: Literal["checkout.session"] = "checkout.session"
    id: str = Field(description="The Stripe Checkout Session id.", examples=["cs_test_a1b2c3"])
    url: str | None = Field(description="The Stripe-hosted page where the customer subscribes.")
    plan_id: int


class CancelSubscription(Strict):
    immediately: StrictBool = Field(
        False, description="End the subscription now instead of at the end of the paid period."
    )


class ChangeSubscription(Strict):
    plan_id: PlanId = Field(
        description="The plan to move to; the price difference is prorated.", examples=[3]
    )


class Allowance(BaseModel):
    invoice: str = Field(description="The Stripe invoice that paid for the period.")
    amount: Money = Field(description="Credits the period brought.")
    remaining: Money = Field(description="What is left of them.")
    expires_at: datetime | None = Field(description="The end of the period: what is left expires then.")


class SubscriptionOut(BaseModel):
    """The caller's subscription: its plan, status and period, and the allowance left."""

    object: Literal["subscription"] = "subscription"
    id: str = Field(description="The Stripe subscription id.", examples=["sub_1Nq2"])
    plan: PlanOut
    status: str = Field(
        description="active, past_due (a payment failed; Stripe retries), cancelled, expired,"
        " or incomplete (waiting for its first payment).",
        examples=["active"],
    )
    current_period_start: datetime | None
    current_period_end: datetime | None
    cancel_at_period_end: bool = Field(description="The subscription ends at the end of this period.")
    allowances: list[Allowance] = Field(description="Subscription credits not yet spent or expired.")
