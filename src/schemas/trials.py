"""Bodies and answers of /trial and /admin/trials."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, Field

from src.schemas.admin import MAX_CREDIT_CHANGE, Reason
from src.schemas.common import Strict
from src.schemas.users import Money

MAX_TRIAL_DAYS = 365
MAX_TRIAL_TOKENS = 10**12
MAX_TRIAL_REQUESTS = 10**9


class TrialStatus(BaseModel):
    object: Literal["trial"] = "trial"
    has_trial: bool = Field(description="False when the account never had a trial (the rest is then empty).")
    status: Literal["active", "ended", "used_up"] | None = Field(
        description="'ended': past its end; 'used_up': a token or request limit was reached first."
    )
    active: bool = Field(description="True while the trial's credits and limits apply.")
    credits_granted: Money = Field(description="Trial credits granted, extensions included.")
    credits_remaining: Money = Field(description="Trial credits left to spend (none once it is over).")
    started_at: datetime | None
    ends_at: datetime | None = Field(description="When the trial ends and its credits expire.")
    ended_at: datetime | None = Field(description="When it ended; null while it is active.")
    used_tokens: int = Field(description="Tokens (prompt and completion) counted against the trial.")
    max_tokens: int | None
    used_requests: int = Field(description="Requests counted against the trial.")
    max_requests: int | None
    converted: bool = Field(description="True once the user paid after their trial.")
    converted_at: datetime | None


class GrantTrial(Strict):
    """What is not given comes from the TRIAL_* settings."""

    credits: Decimal | None = Field(
        None, ge=0, le=MAX_CREDIT_CHANGE, decimal_places=10, description="Trial credits.", examples=["5"]
    )
    days: int | None = Field(None, ge=1, le=MAX_TRIAL_DAYS, description="How long the trial lasts.")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TRIAL_TOKENS, description="Token limit.")
    max_requests: int | None = Field(None, ge=1, le=MAX_TRIAL_REQUESTS, description="Request limit.")
    reason: Reason = Field(
        "granted by an operator", description="Kept in the audit log and on the ledger row."
    )


class ExtendTrial(Strict):
    """Each field adds to the trial; at least one must be given."""

    days: int = Field(
        0, ge=0, le=MAX_TRIAL_DAYS, description="Days added to the end (counted from now if it is over)."
    )
    credits: Decimal = Field(
        Decimal(0),
        ge=0,
        le=MAX_CREDIT_CHANGE,
        decimal_places=10,
        description="More trial credits, expiring at the new end.",
    )
    max_tokens: int = Field(0, ge=0, le=MAX_TRIAL_TOKENS, description="Tokens added to the limit.")
    max_requests: int = Field(0, ge=0, le=MAX_TRIAL_REQUESTS, description="Requests added to the limit.")
    reason: Reason = Field(
        "extended by an operator", description="Kept in the audit log and on the ledger row."
    )
