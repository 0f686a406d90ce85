"""Bodies and views of the coupon routes: redemption, what a user may use, and administration.

A coupon's `value` is credits (kind `credits`), a percentage 0-100 (`discount`, `percent`) or cents
(`discount`, `fixed`), rendered as a decimal string. Codes are compared trimmed and upper-cased.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    PlainSerializer,
    StrictBool,
    StringConstraints,
    field_validator,
    model_validator,
)

from src.schemas.api_keys import INT4_MAX
from src.schemas.common import Strict
from src.schemas.users import Money

MAX_VALUE = Decimal("1000000000")

Kind = Literal["credits", "discount"]
DiscountType = Literal["percent", "fixed"]
CouponValue = Annotated[
    Decimal,
    PlainSerializer(lambda value: format(value.normalize(), "f"), return_type=str, when_used="json"),
    Field(
        description="Credits (credits), percent off 0-100 (percent) or cents off (fixed).", examples=["10"]
    ),
]
CODE_PATTERN = re.compile(r"[A-Z0-9][A-Z0-9_-]{0,63}")


def _code(value: str) -> str:
    """Trimmed and upper-cased: ' save10 ' is SAVE10."""
    code = value.strip().upper()
    if not value.isascii() or not CODE_PATTERN.fullmatch(code):
        raise ValueError("a code is 1 to 64 letters, digits, '-' or '_', starting with a letter or digit")
    return code


CodeIn = Annotated[
    str,
    StringConstraints(max_length=200),
    AfterValidator(_code),
    Field(description="Letters, digits, '-' and '_'; stored upper-case.", examples=["SAVE10"]),
]
ValueIn = Annotated[Decimal, Field(gt=0, le=MAX_VALUE, decimal_places=10)]
MaxUses = Annotated[int, Field(ge=1, le=INT4_MAX, strict=True)]
MaxUsesPerUser = Annotated[int, Field(ge=1, le=1000, strict=True)]
Description = Annotated[str, StringConstraints(strip_whitespace=True, max_length=500)]


def _utc(value: datetime | None) -> datetime | None:
    """A time without an offset is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class RedeemCoupon(Strict):
    code: str = Field(
        max_length=200, description="The coupon code; case and surrounding spaces do not matter."
    )


class CouponOut(BaseModel):
    """A coupon the caller may use."""

    object: Literal["coupon"] = "coupon"
    id: int
    code: str = Field(examples=["SAVE10"])
    kind: Kind = Field(description="credits: redeem for credits; discount: apply to a top-up checkout.")
    value: CouponValue
    discount_type: DiscountType | None = Field(description="For a discount: percent or fixed (cents).")
    description: str
    valid_until: datetime | None = Field(description="When the coupon expires; null: never.")
    max_uses_per_user: int


class CouponList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CouponOut]


class AdminCoupon(CouponOut):
    max_uses: int | None = Field(description="Uses in all; null: unlimited.")
    uses: int = Field(description="Uses taken (a released checkout discount gives its use back).")
    valid_from: datetime
    is_active: bool
    assigned_user_id: UUID | None = Field(description="Only this user may use it; null: anyone.")
    created_by: str
    created_at: datetime
    updated_at: datetime


class RedemptionOut(BaseModel):
    """One use of a coupon."""

    object: Literal["coupon_redemption"] = "coupon_redemption"
    id: int
    coupon_id: int
    code: str
    kind: Kind
    use_number: int = Field(description="Which of the user's uses of this coupon it is (from 1).")
    credits_granted: Money | None = Field(description="Credits added (credits coupons).")
    discount_cents: int | None = Field(description="Cents taken off the checkout (discount coupons).")
    reference: str | None = Field(description="The checkout a discount applied to.")
    released_at: datetime | None = Field(
        description="When a discount's checkout lapsed and its use was given back."
    )
    created_at: datetime


class Redeemed(RedemptionOut):
    balance: Money = Field(description="The account's balance right after the credits were added.")


class AdminRedemption(RedemptionOut):
    user_id: UUID


class CreateCoupon(Strict):
    code: CodeIn
    kind: Kind
    value: ValueIn = Field(description="Credits (credits), percent off 0-100 (percent) or cents off (fixed).")
    discount_type: DiscountType | None = Field(
        None, description="Required for a discount, absent for credits."
    )
    max_uses: MaxUses | None = Field(None, description="Uses in all; null: unlimited.")
    max_uses_per_user: MaxUsesPerUser = 1
    valid_from: datetime | None = Field(None, description="From when it may be used (default: now).")
    valid_until: datetime | None = Field(None, description="When it expires; null: never.")
    is_active: StrictBool = True
    assigned_user_id: UUID | None = Field(None, description="Only this user may use it.")
    description: Description = ""

    @field_validator("valid_from", "valid_until")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return _utc(value)

    def values(self) -> dict[str, object]:
        return self.model_dump()


# Fields that take null to mean "not set" (unlimited, never expires, anyone, no discount type);
# the others must have a value when sent.
_NULLABLE = {"max_uses", "valid_until", "assigned_user_id", "discount_type"}


class UpdateCoupon(Strict):
    """Only the fields sent change; a coupon's kind never does."""

    code: CodeIn | None = None
    value: ValueIn | None = None
    discount_type: DiscountType | None = None
    max_uses: MaxUses | None = None
    max_uses_per_user: MaxUsesPerUser | None = None
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    is_active: StrictBool | None = None
    assigned_user_id: UUID | None = None
    description: Description | None = None

    @field_validator("valid_from", "valid_until")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return _utc(value)

    @model_validator(mode="after")
    def _no_null_for_required(self) -> UpdateCoupon:
        for name in sorted(self.model_fields_set - _NULLABLE):
            if getattr(self, name) is None:
                raise ValueError(f"'{name}' may not be null")
        return self

    def changes(self) -> dict[str, object]:
        return self.model_dump(include=self.model_fields_set)
