"""Bodies and answers of /referral."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints

from src.schemas.common import Strict
from src.schemas.users import Money

# Loose on purpose: a code is trimmed and upper-cased before lookup, and an unknown one is simply
# not valid; only absurd input is refused with 400.
ReferralCodeInput = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]


class ReferralCode(BaseModel):
    code: str = Field(description="The caller's referral code, to share; created on first request.")


class ValidateCode(Strict):
    code: ReferralCodeInput = Field(description="A referral code (case and surrounding spaces ignored).")


class CodeValidity(BaseModel):
    valid: bool = Field(description="Whether a new account can sign up with this code now.")
    reason: Literal["not_found", "max_uses_reached"] | None = Field(
        description="Why it is not valid: no such usable code, or it has reached its maximum referrals."
    )
    reward: Money = Field(description="Credits the new account gets after its first qualifying purchase.")
    min_purchase: Money = Field(description="The credits the first paid purchase must reach for the rewards.")


class ReferralStats(BaseModel):
    code: str | None = Field(description="The caller's code; null until GET /referral/code creates it.")
    referred: int = Field(description="Accounts that signed up with the caller's code.")
    pending: int = Field(description="Referred accounts that have not made their first paid purchase yet.")
    rewarded: int = Field(description="Referrals rewarded (and not reversed).")
    reversed: int = Field(description="Referrals whose rewards were taken back (the purchase was refunded).")
    refused: int = Field(
        description="Referrals that earned nothing: the first purchase was below the minimum, or it was"
        " paid by the caller's own Stripe customer."
    )
    rewards_earned: Money = Field(description="Credits the caller earned from rewarded referrals.")
    max_uses: int = Field(description="How many accounts one code may refer.")
    remaining_uses: int = Field(description="How many more accounts the caller's code may refer.")
    reward_referrer: Money = Field(description="Credits the caller gets per rewarded referral.")
    reward_referred: Money = Field(description="Credits the referred account gets when rewarded.")
    min_purchase: Money = Field(
        description="The credits the referred account's first paid purchase must reach."
    )
