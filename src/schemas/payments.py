"""Bodies and views of the Stripe top-up routes, the payments lists and admin refunds.

Amounts of money are integer cents in the configured currency; credits are decimal strings. The
credits of a top-up are decided by the server: no body accepts them (nor metadata).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, Field, StrictInt, model_validator

from src.schemas.common import Strict
from src.schemas.users import Money

PaymentStatus = Literal["pending", "paid", "partially_refunded", "refunded", "disputed", "expired", "failed"]
URL_MAX = 2048


class CreditPackageOut(BaseModel):
    object: Literal["credit_package"] = "credit_package"
    id: str = Field(description="Send it as `package_id` to buy this package.", examples=["credits_10"])
    name: str
    amount_cents: int = Field(description="The price, in cents of `currency`.", examples=[1000])
    currency: str = Field(examples=["usd"])
    credits: Money = Field(description="Credits added when it is paid.")


class CreditPackageList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CreditPackageOut]
    currency: str = Field(description="The currency of every price, and of custom amounts.")
    min_amount_cents: int = Field(description="The smallest custom amount (`amount_cents`).")
    max_amount_cents: int = Field(description="The largest custom amount (`amount_cents`).")


class CreateCheckout(Strict):
    """A top-up: a package or a custom amount; the server decides the credits."""

    package_id: str | None = Field(
        None,
        max_length=100,
        description="A package from /api/stripe/credit-packages.",
        examples=["credits_10"],
    )
    amount_cents: StrictInt | None = Field(
        None,
        ge=1,
        le=100_000_000,
        description="A custom amount in cents, within the configured bounds: 1 credit per currency unit.",
        examples=[2000],
    )
    coupon_code: str | None = Field(
        None, max_length=200, description="A discount coupon: it lowers the price, not the credits."
    )
    success_url: str = Field(
        max_length=URL_MAX,
        description="Where Stripe sends the customer after paying; on an allowed origin.",
        examples=["http://localhost:3000/billing/success?session_id={CHECKOUT_SESSION_ID}"],
    )
    cancel_url: str = Field(
        max_length=URL_MAX,
        description="Where Stripe sends the customer who gives up; on an allowed origin.",
        examples=["http://localhost:3000/billing"],
    )

    @model_validator(mode="after")
    def _one_price(self) -> CreateCheckout:
        if (self.package_id is None) == (self.amount_cents is None):
            raise ValueError("send exactly one of package_id and amount_cents")
        return self


class PaymentOut(BaseModel):
    """A top-up as its buyer sees it."""

    object: Literal["payment"] = "payment"
    id: UUID
    kind: Literal["topup", "subscription"]
    status: PaymentStatus
    package_id: str | None
    amount_cents: int = Field(description="The price before any discount.")
    discount_cents: int = Field(description="What the coupon took off.")
    amount_paid_cents: int = Field(description="What the customer pays: amount_cents - discount_cents.")
    refunded_cents: int
    currency: str
    coupon_code: str | None
    credits: Money = Field(description="Credits the payment adds, decided when the checkout was created.")
    checkout_session_id: str | None
    created_at: datetime
    paid_at: datetime | None


class CheckoutSessionOut(BaseModel):
    """A top-up checkout: where to send the customer while it is open, and its payment."""

    object: Literal["checkout.session"] = "checkout.session"
    id: str = Field(description="The Checkout Session's id (cs_...).")
    url: str | None = Field(description="Stripe's hosted checkout page, while the checkout is open.")
    expires_at: datetime | None = Field(description="When an unpaid checkout lapses.")
    granted: bool = Field(description="True once the credits are on the balance.")
    payment_id: UUID
    payment: PaymentOut


class AdminPaymentOut(PaymentOut):
    user_id: UUID
    livemode: bool
    stripe_payment_intent_id: str | None
    stripe_charge_id: str | None
    stripe_customer_id: str | None
    stripe_invoice_id: str | None
    credits_refunded: Money = Field(description="Credits clawed back for refunds.")
    credits_disputed: Money = Field(description="Credits clawed back for open or lost disputes.")
    granted_at: datetime | None
    updated_at: datetime


class RefundPayment(Strict):
    amount_cents: StrictInt | None = Field(
        None, ge=1, description="Cents to refund; default: all that is not refunded yet."
    )
    reason: Literal["duplicate", "fraudulent", "requested_by_customer"] | None = Field(
        None, description="Stripe's refund reason."
    )


class RefundOut(BaseModel):
    object: Literal["refund"] = "refund"
    id: str = Field(description="Stripe's refund id.")
    amount_cents: int
    status: str = Field(description="Stripe's refund status (succeeded, pending, ...).")
    payment: AdminPaymentOut


class WebhookReceived(BaseModel):
    received: Literal[True] = True
    id: str | None = Field(description="The event's id.")
    type: str | None
    outcome: Literal["handled", "ignored", "duplicate"] = Field(
        description="handled; ignored (not ours, or of the other mode); duplicate (handled before)."
    )
