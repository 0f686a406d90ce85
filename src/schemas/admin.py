"""Bodies and answers of the /admin routes. Money is Decimal, rendered as a JSON string."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, Field, StringConstraints, field_validator

from src.schemas.common import Strict
from src.schemas.users import EMAIL_PATTERN, Balance, Money

# The database stores NUMERIC(20, 10); more decimals would be rounded silently, so they are refused.
MAX_CREDIT_CHANGE = Decimal("1000000000")
# Mirrors the roles table's CHECK constraint, so a bad name is a 400 and never a database error.
ROLE_NAME_PATTERN = r"^[a-z][a-z0-9_\-]{1,39}$"

RoleName = Annotated[str, StringConstraints(pattern=ROLE_NAME_PATTERN)]
Reason = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]
Description = Annotated[str, StringConstraints(strip_whitespace=True, max_length=500)]
PermissionNames = Annotated[list[str], Field(max_length=100)]


class CreateUser(Strict):
    email: str = Field(
        max_length=254, description="The account's e-mail address.", examples=["ada@example.com"]
    )
    credits: Decimal = Field(
        Decimal("0"),
        ge=0,
        le=MAX_CREDIT_CHANGE,
        decimal_places=10,
        description="Starting credits, written to the ledger (needs `credits.write` as well).",
    )
    role: RoleName = Field("user", description="The account's role; see GET /admin/roles.")
    trial: bool = Field(
        False,
        description="Give the account a trial with the TRIAL_* settings (needs `trials.write` as well).",
    )

    @field_validator("email")
    @classmethod
    def _email_shape(cls, value: str) -> str:
        value = value.strip()
        if not EMAIL_PATTERN.match(value):
            raise ValueError("not a valid e-mail address")
        return value


class CreatedUser(BaseModel):
    user_id: UUID
    email: str
    role: str
    api_key: str = Field(description="The account's primary API key. It is shown only this once.")
    balance: Balance


class AddCredits(Strict):
    user_id: UUID
    amount: Decimal = Field(
        ge=-MAX_CREDIT_CHANGE,
        le=MAX_CREDIT_CHANGE,
        decimal_places=10,
        description="Credits to add; a negative amount removes credits (never more than are available).",
        examples=["25.00"],
    )
    reason: Reason = Field(description="Why: kept on the ledger row and in the audit log.")

    @field_validator("amount")
    @classmethod
    def _non_zero(cls, value: Decimal) -> Decimal:
        if value == 0:
            raise ValueError("must not be zero")
        return value


class CreditsAdded(BaseModel):
    user_id: UUID
    amount: Money
    balance: Balance
    transaction_id: int = Field(description="The credit transaction (ledger row) this change wrote.")


class RoleOut(BaseModel):
    name: str
    description: str
    permissions: list[str] = Field(description="Permission names; '*' grants every permission.")
    is_builtin: bool = Field(description="Built-in roles cannot be changed or deleted.")
    created_at: datetime
    updated_at: datetime


class RoleList(BaseModel):
    object: Literal["list"] = "list"
    data: list[RoleOut]


class PermissionOut(BaseModel):
    name: str
    description: str


class PermissionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PermissionOut]


class CreateRole(Strict):
    name: RoleName = Field(description="Lower-case letters, digits, '_' and '-'; 2-40 characters.")
    description: Description = ""
    permissions: PermissionNames = Field(description="Names from GET /admin/roles/permissions.")


class UpdateRole(Strict):
    description: Description | None = None
    permissions: PermissionNames | None = Field(None, description="Replaces the role's permissions.")


class RoleDeleted(BaseModel):
    name: str
    object: Literal["role"] = "role"
    deleted: bool


class AssignRole(Strict):
    user_id: UUID
    role: RoleName


class RoleAssigned(BaseModel):
    user_id: UUID
    role: str
    previous_role: str


class AuditEntry(BaseModel):
    id: int
    created_at: datetime
    actor_type: str = Field(description="'user', 'operator' (ADMIN_API_KEY), 'system' or 'anonymous'.")
    actor_id: UUID | None
    user_id: UUID | None = Field(description="The account the change concerns.")
    action: str
    subject_type: str | None
    subject_id: str | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    metadata: dict[str, Any] | None
    ip: str | None
    user_agent: str | None
    request_id: str | None


class AuditSweep(BaseModel):
    deleted: int = Field(description="How many audit rows were deleted.")
    retention_days: int


class AuthFailure(BaseModel):
    ip: str
    failures: int
    last_seen: datetime = Field(description="The start of the last minute with a failure from this IP.")


class AuthFailureList(BaseModel):
    object: Literal["list"] = "list"
    window_minutes: int
    data: list[AuthFailure]
