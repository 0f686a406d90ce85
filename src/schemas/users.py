"""Bodies and answers of /auth and /user.

Money is Decimal end to end and rendered as a JSON string ("5.0000000000"), so no amount ever
passes through a float.
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal
from uuid import UUID

import orjson
from pydantic import BaseModel, Field, PlainSerializer, StringConstraints, field_validator

from src.schemas.common import Strict

MAX_PREFERENCES_BYTES = 16 * 1024
MAX_TOKEN_LENGTH = 16 * 1024
# Deliberately simple: the address is only ever a contact hint, never verified or trusted.
EMAIL_PATTERN = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s.]+$")

# Plain notation always: a zero NUMERIC(20, 10) would otherwise render as "0E-10".
Money = Annotated[
    Decimal,
    PlainSerializer(lambda value: format(value, "f"), return_type=str, when_used="json"),
    Field(description="An amount of credits (1 credit = 1 USD), as a decimal string."),
]
Username = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$"),
]


class PrivyLogin(Strict):
    access_token: str | None = Field(
        None,
        max_length=MAX_TOKEN_LENGTH,
        description="The Privy access token; may be sent as 'Authorization: Bearer <token>' instead.",
    )
    identity_token: str | None = Field(
        None,
        max_length=MAX_TOKEN_LENGTH,
        description="The Privy identity token; its verified e-mail is attached to a new account.",
    )
    referral_code: str | None = Field(
        None,
        max_length=64,
        description="A referral code, attached only when this login creates the account.",
        examples=["K7QX2MPA"],
    )


class Balance(BaseModel):
    balance: Money = Field(description="Credits on the account: the ledger's sum.")
    held: Money = Field(description="Credits held by requests in flight.")
    available: Money = Field(description="What new requests may spend: balance - held.")


class BalanceGrant(BaseModel):
    source: Literal["purchase", "subscription", "trial", "coupon", "referral", "admin", "refund_reversal"]
    amount: Money = Field(description="Credits the grant added.")
    remaining: Money = Field(description="What is left of it (usage spends the soonest-expiring first).")
    expires_at: datetime | None = Field(description="When what is left expires; null: never.")
    created_at: datetime


class AccountBalance(Balance):
    grants: list[BalanceGrant] = Field(
        description="The grants with credits left, soonest-expiring first; expired ones are not listed."
    )


class Profile(BaseModel):
    id: UUID
    email: str | None = Field(description="The verified e-mail (from Privy or set by an admin).")
    contact_email: str | None = Field(
        description="The e-mail the user typed into their profile; not verified."
    )
    username: str | None
    role: str
    is_active: bool
    referral_code: str | None
    preferences: dict[str, Any]
    created_at: datetime


class LoginResponse(BaseModel):
    user: Profile
    balance: Balance
    api_key: str = Field(description="The account's primary API key; keep it secret.")
    is_new_user: bool = Field(description="True when this login created the account.")
    referral: (
        Literal["attached", "unknown_code", "self_referral", "max_uses_reached", "existing_account"] | None
    ) = Field(
        None,
        description="What became of `referral_code`: attached, or why not (a code is attached only when"
        " the account is created). Null when no code was sent.",
    )


class ProfileUpdate(Strict):
    """Only these fields may change; any other field (credits, role, ...) is refused."""

    username: Username | None = Field(None, description="A display name (1-64 characters); null clears it.")
    email: str | None = Field(
        None,
        max_length=254,
        description="A contact e-mail, stored as `contact_email`; it is never verified. Null clears it.",
        examples=["ada@example.com"],
    )
    preferences: dict[str, Any] = Field(
        default_factory=dict,
        description="Free-form settings, replaced as a whole (at most 16 KB as JSON).",
    )

    @field_validator("email")
    @classmethod
    def _email_shape(cls, value: str | None) -> str | None:
        if value is not None and not EMAIL_PATTERN.match(value.strip()):
            raise ValueError("not a valid e-mail address")
        return value.strip() if value is not None else None

    @field_validator("preferences")
    @classmethod
    def _preferences_size(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            size = len(orjson.dumps(value))
        except TypeError as exc:  # integers beyond 64 bits, for one
            raise ValueError("preferences must be plain JSON") from exc
        if size > MAX_PREFERENCES_BYTES:
            raise ValueError(f"preferences may not exceed {MAX_PREFERENCES_BYTES} bytes as JSON")
        return value


class DeleteAccount(Strict):
    confirm: Literal["DELETE"] = Field(description="Must be exactly 'DELETE'.")


class AccountDeleted(BaseModel):
    deleted: bool


class CreditTransaction(BaseModel):
    id: int
    amount: Money = Field(description="Positive when credits were added, negative when spent or removed.")
    balance_after: Money
    type: str = Field(description="What moved the credits: usage, purchase, admin_adjustment, ...")
    reason: str | None
    reference: str | None = Field(description="The request, payment, coupon or referral it belongs to.")
    request_id: str | None
    created_at: datetime
