"""Bodies and views of the rate-limit routes: the caller's own limits and usage, and the admin limits."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from pydantic import BaseModel, Field

from src.schemas.api_keys import INT4_MAX, INT8_MAX
from src.schemas.common import Strict

# JSON integers only: "5", 5.0 and true are refused, not coerced into a limit.
RequestLimit = Annotated[int, Field(gt=0, le=INT4_MAX, strict=True)]
TokenLimit = Annotated[int, Field(gt=0, le=INT8_MAX, strict=True)]


class LimitValues(BaseModel):
    """Limits in force."""

    rpm_limit: int = Field(description="Requests per minute.", examples=[600])
    rpd_limit: int = Field(description="Requests per day.", examples=[100_000])
    tpm_limit: int = Field(description="Tokens per minute (prompt + completion).", examples=[1_000_000])
    tpd_limit: int = Field(description="Tokens per day (prompt + completion).", examples=[20_000_000])
    concurrency_limit: int = Field(description="Requests in flight at once.", examples=[50])


class LimitSettings(BaseModel):
    """Limits as set on an account or a key; null means "not set here" (the ceiling or plan applies)."""

    rpm_limit: int | None
    rpd_limit: int | None
    tpm_limit: int | None
    tpd_limit: int | None
    concurrency_limit: int | None


class LimitUsage(BaseModel):
    """What the rate limiter counts now (sliding windows; tokens are the real usage once known)."""

    rpm: int = Field(description="Requests in the last minute.")
    rpd: int = Field(description="Requests in the last day.")
    tpm: int = Field(description="Tokens in the last minute.")
    tpd: int = Field(description="Tokens in the last day.")
    concurrency: int = Field(description="Requests in flight now.")


class KeyLimitsAndUsage(BaseModel):
    id: UUID = Field(description="The calling key's id.")
    own: LimitSettings = Field(description="The key's own limits.")
    limits: LimitValues = Field(description="The key's effective limits: its own, capped by the account.")
    usage: LimitUsage


class AccountLimitsAndUsage(BaseModel):
    limits: LimitValues = Field(description="The account's ceiling, shared by all its keys.")
    usage: LimitUsage


class CallerLimits(BaseModel):
    """GET /user/limit: the limits that decide the caller's requests, and how much is used."""

    key: KeyLimitsAndUsage
    account: AccountLimitsAndUsage


class SetLimits(Strict):
    """Only the fields sent change; null clears one (the plan's limit, or the ceiling, applies again)."""

    rpm_limit: RequestLimit | None = Field(None, description="Requests per minute.")
    rpd_limit: RequestLimit | None = Field(None, description="Requests per day.")
    tpm_limit: TokenLimit | None = Field(None, description="Tokens per minute.")
    tpd_limit: TokenLimit | None = Field(None, description="Tokens per day.")
    concurrency_limit: RequestLimit | None = Field(None, description="Requests in flight at once.")

    def changes(self) -> dict[str, Any]:
        return self.model_dump(include=self.model_fields_set)


class UserLimits(BaseModel):
    """A user's ceiling: what an admin set (may be above the plan) and what is in force."""

    user_id: UUID
    admin_set: LimitSettings = Field(description="Admin-set ceilings; null fields follow the plan.")
    plan: LimitValues = Field(description="The limits of the user's current plan.")
    ceiling: LimitValues = Field(description="The ceiling in force for every key of the user.")


class KeyLimits(BaseModel):
    """A key's own limits and what is in force (its own, capped by its owner's ceiling)."""

    key_id: UUID
    user_id: UUID
    own: LimitSettings
    effective: LimitValues
    ceiling: LimitValues = Field(description="The owner's ceiling.")
