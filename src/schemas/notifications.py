"""Bodies and answers of the notification routes: preferences, the outbox lists, admin sends."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal
from uuid import UUID

from pydantic import BaseModel, Field, StringConstraints, field_validator

from src.schemas.common import Strict
from src.schemas.users import EMAIL_PATTERN, Money

NotificationType = Literal[
    "welcome",
    "api_key_created",
    "low_balance",
    "payment_confirmation",
    "trial_expiring",
    "trial_ended",
    "announcement",
    "test",
]
PreferenceType = Literal[
    "low_balance", "trial_expiring", "trial_ended", "announcement", "payment_confirmation", "api_key_created"
]
DeliveryStatus = Literal["queued", "sending", "sent", "delivered", "bounced", "failed"]
MAX_THRESHOLD = Decimal("1000000000")
MAX_ANNOUNCEMENT_RECIPIENTS = 10_000

Subject = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Body = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=20_000)]


class NotificationPreferences(BaseModel):
    types: dict[str, bool] = Field(
        description="Each e-mail type and whether it is sent; the `always_on` types cannot be turned off.",
        examples=[{"low_balance": True, "announcement": False, "payment_confirmation": True}],
    )
    always_on: list[str] = Field(description="Receipts and security notices, always sent.")
    low_balance_threshold: Money = Field(
        description="The low-balance e-mail goes out when the balance falls below this many credits."
    )


class UpdatePreferences(Strict):
    """Only what is sent changes; `types` is merged into the current settings."""

    types: dict[PreferenceType, Annotated[bool, Field(strict=True)]] | None = Field(
        None, description="Types to turn on (true) or off (false).", examples=[{"announcement": False}]
    )
    low_balance_threshold: Decimal | None = Field(
        None,
        ge=0,
        le=MAX_THRESHOLD,
        decimal_places=10,
        description="Credits below which the low-balance e-mail is sent (0: never).",
        examples=["5.00"],
    )


class UserNotification(BaseModel):
    """A message as its recipient sees it."""

    id: int
    type: NotificationType
    subject: str | None = Field(description="The subject (queued messages: the one they will have).")
    status: DeliveryStatus
    created_at: datetime
    sent_at: datetime | None
    delivered_at: datetime | None


class AdminNotification(UserNotification):
    """A message with its delivery record."""

    user_id: UUID | None
    to_email: str
    attempts: int = Field(description="Delivery attempts so far.")
    next_attempt_at: datetime = Field(description="When a queued message is tried next.")
    last_error: str | None = Field(description="Why the last attempt failed, or how it bounced.")
    provider_message_id: str | None = Field(description="The provider's id of the sent message.")
    dedupe_key: str | None = Field(description="The event the message belongs to.")
    updated_at: datetime


def _email(value: str) -> str:
    value = value.strip()
    if len(value) > 254 or not EMAIL_PATTERN.match(value):
        raise ValueError("not a valid e-mail address")
    return value


class SendTest(Strict):
    to: str = Field(max_length=254, description="Where the test message goes.", examples=["ops@example.com"])

    @field_validator("to")
    @classmethod
    def _email_shape(cls, value: str) -> str:
        return _email(value)


class Announcement(Strict):
    subject: Subject = Field(description="The e-mail's subject.", examples=["New models available"])
    body: Body = Field(description="Plain text; blank lines separate paragraphs.")
    user_ids: list[UUID] | None = Field(
        None,
        max_length=MAX_ANNOUNCEMENT_RECIPIENTS,
        description="Only these users; omitted: every active user with an e-mail address.",
    )


class AnnouncementQueued(BaseModel):
    announcement_id: UUID
    queued: int = Field(
        description="Messages queued (users without an address, who opted out or are suppressed get none)."
    )


class WebhookReceived(BaseModel):
    received: bool = True
    duplicate: bool = Field(description="True when this delivery was processed before.")
