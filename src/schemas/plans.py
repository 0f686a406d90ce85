"""Bodies and views of the plan routes: public plans, the caller's plan, and their administration.

Money is Decimal, rendered as a JSON string. A plan's limits are shown in force (null fields
filled with the settings defaults); admin views show the plan's own settings as well.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal
from uuid import UUID

import orjson
from pydantic import BaseModel, Field, StrictBool, StringConstraints, field_validator, model_validator

from src.schemas.api_keys import INT4_MAX, INT8_MAX
from src.schemas.common import Strict
from src.schemas.limits import LimitSettings, LimitUsage, LimitValues, RequestLimit, TokenLimit
from src.schemas.users import Money

MAX_FEATURES_BYTES = 16 * 1024
MAX_CREDITS_INCLUDED = Decimal("1000000000")

PlanName = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$"),
]
PlanDescription = Annotated[str, StringConstraints(strip_whitespace=True, max_length=2000)]
Currency = Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^[A-Za-z]{3}$")]
StripePriceId = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_\-]+$")]
PriceCents = Annotated[int, Field(ge=0, le=INT4_MAX, strict=True)]
PlanId = Annotated[int, Field(gt=0, le=INT8_MAX, strict=True)]
Interval = Literal["month", "year"]
CreditsIncluded = Annotated[Decimal, Field(ge=0, le=MAX_CREDITS_INCLUDED, decimal_places=10)]
PlanStatus = Literal["active", "cancelled", "past_due", "expired"]


class PlanOut(BaseModel):
    """A plan as offered: its price, the credits each period brings, and its limits."""

    object: Literal["plan"] = "plan"
    id: int
    name: str = Field(examples=["Pro"])
    description: str
    price_cents: int = Field(description="The price per billing interval, in cents.", examples=[2000])
    currency: str = Field(description="Lower-case ISO 4217 code.", examples=["usd"])
    billing_interval: Interval
    credits_included: Money = Field(description="Credits granted each period; they expire at its end.")
    limits: LimitValues = Field(description="The rate limits of every key on this plan.")
    features: dict[str, Any]
    is_default: bool = Field(description="The free plan: what every user without a plan is on.")


class AdminPlan(PlanOut):
    limit_settings: LimitSettings = Field(description="The plan's own limits; null: the settings default.")
    stripe_price_id: str | None = Field(description="The Stripe price that subscribes to this plan.")
    is_active: bool = Field(description="Offered to new subscribers; users already on it keep it.")
    created_at: datetime
    updated_at: datetime


class PlanList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PlanOut]


class AdminPlanList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdminPlan]


def _features_fit(value: dict[str, Any]) -> dict[str, Any]:
    if len(orjson.dumps(value)) > MAX_FEATURES_BYTES:
        raise ValueError(f"must be at most {MAX_FEATURES_BYTES} bytes of JSON")
    return value


class CreatePlan(Strict):
    name: PlanName = Field(description="Unique.", examples=["Pro"])
    description: PlanDescription = ""
    price_cents: PriceCents = Field(0, description="The price per billing interval, in cents.")
    currency: Currency | None = Field(None, description="ISO 4217 code; default: STRIPE_CURRENCY.")
    billing_interval: Interval = "month"
    credits_included: CreditsIncluded = Field(Decimal("0"), description="Credits granted each period.")
    rpm_limit: RequestLimit | None = Field(None, description="Requests per minute; null: the default.")
    rpd_limit: RequestLimit | None = Field(None, description="Requests per day; null: the default.")
    tpm_limit: TokenLimit | None = Field(None, description="Tokens per minute; null: the default.")
    tpd_limit: TokenLimit | None = Field(None, description="Tokens per day; null: the default.")
    concurrency_limit: RequestLimit | None = Field(None, description="Requests in flight; null: the default.")
    features: dict[str, Any] = Field(default_factory=dict, description="Shown to users as given.")
    stripe_price_id: StripePriceId | None = Field(None, description="The Stripe price of the plan.")
    is_default: StrictBool = Field(False, description="Make this the free plan, in place of the current one.")
    is_active: StrictBool = True

    @field_validator("features")
    @classmethod
    def _features(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _features_fit(value)

    @field_validator("currency")
    @classmethod
    def _lower(cls, value: str | None) -> str | None:
        return value.lower() if value is not None else None

    def values(self) -> dict[str, Any]:
        values = self.model_dump()
        if values["currency"] is None:
            del values["currency"]  # the service's default
        return values


# Fields that take null to mean "not set" (the settings default, no Stripe price); the others must
# have a value when sent.
_NULLABLE = {"rpm_limit", "rpd_limit", "tpm_limit", "tpd_limit", "concurrency_limit", "stripe_price_id"}


class UpdatePlan(Strict):
    """Only the fields sent change; null clears a limit (the default applies) or the Stripe price."""

    name: PlanName | None = None
    description: PlanDescription | None = None
    price_cents: PriceCents | None = None
    currency: Currency | None = None
    billing_interval: Interval | None = None
    credits_included: CreditsIncluded | None = None
    rpm_limit: RequestLimit | None = None
    rpd_limit: RequestLimit | None = None
    tpm_limit: TokenLimit | None = None
    tpd_limit: TokenLimit | None = None
    concurrency_limit: RequestLimit | None = None
    features: dict[str, Any] | None = None
    stripe_price_id: StripePriceId | None = None
    is_default: StrictBool | None = Field(
        None, description="true makes this the free plan; the default changes only that way."
    )
    is_active: StrictBool | None = None

    @field_validator("features")
    @classmethod
    def _features(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _features_fit(value) if value is not None else None

    @field_validator("currency")
    @classmethod
    def _lower(cls, value: str | None) -> str | None:
        return value.lower() if value is not None else None

    @model_validator(mode="after")
    def _no_null_for_required(self) -> UpdatePlan:
        for name in sorted(self.model_fields_set - _NULLABLE):
            if getattr(self, name) is None:
                raise ValueError(f"'{name}' may not be null")
        return self

    def changes(self) -> dict[str, Any]:
        return self.model_dump(include=self.model_fields_set)


class AssignPlan(Strict):
    user_id: UUID
    plan_id: PlanId
    current_period_end: datetime | None = Field(
        None, description="When the plan ends (ISO 8601, UTC without an offset); null: no end."
    )


class UserPlanOut(BaseModel):
    """A user's plan in force."""

    user_id: UUID
    plan: PlanOut
    status: PlanStatus = Field(description="past_due keeps the plan while the payment is retried.")
    source: Literal["default", "assigned", "stripe"] = Field(
        description="default: no plan of their own; assigned: by an admin; stripe: a subscription."
    )
    current_period_start: datetime | None
    current_period_end: datetime | None = Field(description="When the period ends; null: no end.")
    auto_renew: bool


class PlanUsage(UserPlanOut):
    """GET /user/plan: the caller's plan, and how much of its limits the account uses now."""

    ceiling: LimitValues = Field(
        description="The account's limits in force: the plan's, unless an admin set others for it."
    )
    usage: LimitUsage
