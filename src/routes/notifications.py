"""Routes: the caller's notification preferences and e-mails, the admin outbox, Resend's webhook.

Nothing here sends mail: every route queues or reads outbox rows, and the worker delivers them.
The admin routes take `authenticate` as a router-level dependency, so no caller is answered
before it is known (see src/routes/admin.py).
"""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request

from src.db.notifications import OutboxRow
from src.deps import AppSettings, Conn, Pool, State
from src.schemas.common import Page, Paging
from src.schemas.notifications import (
    AdminNotification,
    Announcement,
    AnnouncementQueued,
    DeliveryStatus,
    NotificationPreferences,
    NotificationType,
    SendTest,
    UpdatePreferences,
    UserNotification,
    WebhookReceived,
)
from src.security.deps import CurrentUser, Principal, authenticate, request_meta, require_permission
from src.services import notifications as notifications_service

NotificationsReader = Annotated[Principal, Depends(require_permission("notifications.read"))]
NotificationsWriter = Annotated[Principal, Depends(require_permission("notifications.write"))]

Responses = dict[int | str, dict[str, Any]]
UNAUTHENTICATED: Responses = {
    401: {"description": "Missing or invalid API key."},
    403: {"description": "The key may not do this, the account is disabled, or it is the operator key."},
}
DENIED: Responses = {
    401: {"description": "Missing or invalid credentials."},
    403: {"description": "The caller's role lacks the permission, or the key's scopes exclude /admin."},
}
INVALID: Responses = {400: {"description": "An unknown field or an invalid value; `param` names it."}}

user_router = APIRouter(prefix="/user/notifications", tags=["user"])
admin_router = APIRouter(prefix="/admin/notifications", tags=["admin"], dependencies=[Depends(authenticate)])
webhook_router = APIRouter(tags=["webhooks"])


def _preferences(view: notifications_service.PreferencesView) -> NotificationPreferences:
    return NotificationPreferences.model_validate(view, from_attributes=True)


@user_router.get("/preferences", responses=UNAUTHENTICATED)
async def get_preferences(user: CurrentUser, conn: Conn) -> NotificationPreferences:
    """Which e-mails the caller gets, and the low-balance threshold."""
    assert user.user_id is not None
    return _preferences(await notifications_service.get_preferences(conn, user_id=user.user_id))


@user_router.put("/preferences", responses={**INVALID, **UNAUTHENTICATED})
async def update_preferences(
    body: UpdatePreferences, user: CurrentUser, conn: Conn, state: State, request: Request
) -> NotificationPreferences:
    """Turn e-mail types on or off and set the low-balance threshold; receipts cannot be turned off."""
    view = await notifications_service.update_preferences(
        conn,
        principal=user,
        meta=request_meta(request, state),
        types={str(name): enabled for name, enabled in (body.types or {}).items()},
        low_balance_threshold=body.low_balance_threshold,
    )
    return _preferences(view)


@user_router.get("", responses={**INVALID, **UNAUTHENTICATED})
async def list_my_notifications(user: CurrentUser, conn: Conn, paging: Paging) -> Page[UserNotification]:
    """The e-mails sent (or queued) to the caller, newest first."""
    assert user.user_id is not None
    rows, total = await notifications_service.list_for_user(
        conn, user_id=user.user_id, limit=paging.limit, offset=paging.offset
    )
    return Page[UserNotification](
        data=[UserNotification.model_validate(row, from_attributes=True) for row in rows],
        total=total,
        limit=paging.limit,
        offset=paging.offset,
    )


def _admin_view(row: OutboxRow) -> AdminNotification:
    return AdminNotification.model_validate(row, from_attributes=True)


@admin_router.get("", responses={**INVALID, **DENIED})
async def list_notifications(
    actor: NotificationsReader,
    conn: Conn,
    paging: Paging,
    status: Annotated[DeliveryStatus | None, Query(description="Only messages in this state.")] = None,
    notification_type: Annotated[
        NotificationType | None, Query(alias="type", description="Only messages of this type.")
    ] = None,
    user_id: Annotated[UUID | None, Query(description="Only this user's messages.")] = None,
    to: Annotated[str | None, Query(max_length=254, description="Only messages to this address.")] = None,
) -> Page[AdminNotification]:
    """Every e-mail in the outbox with its delivery status, newest first."""
    rows, total = await notifications_service.list_all(
        conn,
        limit=paging.limit,
        offset=paging.offset,
        status=status,
        type=notification_type,
        user_id=user_id,
        to_email=to,
    )
    return Page[AdminNotification](
        data=[_admin_view(row) for row in rows], total=total, limit=paging.limit, offset=paging.offset
    )


@admin_router.post(
    "/test",
    status_code=202,
    responses={**INVALID, **DENIED, 409: {"description": "The address is suppressed (a hard bounce)."}},
)
async def send_test(
    actor: NotificationsWriter, body: SendTest, conn: Conn, state: State, request: Request
) -> AdminNotification:
    """Queue a test e-mail to an address; its delivery status shows in GET /admin/notifications."""
    row = await notifications_service.queue_test(
        conn, to_email=body.to, actor=actor, meta=request_meta(request, state)
    )
    return _admin_view(row)


@admin_router.post("/announcement", status_code=202, responses={**INVALID, **DENIED})
async def send_announcement(
    actor: NotificationsWriter, body: Announcement, conn: Conn, state: State, request: Request
) -> AnnouncementQueued:
    """Queue an announcement to every active user with an e-mail address, or to the listed users."""
    announcement_id, queued = await notifications_service.queue_announcement(
        conn,
        subject=body.subject,
        body=body.body,
        user_ids=body.user_ids,
        actor=actor,
        meta=request_meta(request, state),
    )
    return AnnouncementQueued(announcement_id=announcement_id, queued=queued)


@webhook_router.post(
    "/webhooks/resend",
    responses={
        400: {"description": "The Svix signature is missing, wrong or stale."},
        503: {"description": "RESEND_WEBHOOK_SECRET is not set."},
    },
)
async def resend_webhook(request: Request, pool: Pool, settings: AppSettings) -> WebhookReceived:
    """Resend's delivery events (signed by Svix): delivered, bounced, complained, failed."""
    outcome = await notifications_service.handle_webhook(
        pool, settings, payload=await request.body(), headers=request.headers
    )
    return WebhookReceived(duplicate=outcome.duplicate)


router = APIRouter()
router.include_router(user_router)
router.include_router(admin_router)
router.include_router(webhook_router)
