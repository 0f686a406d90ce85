"""Routes: the operator's monitor, and views of every account (users, the ledger, usage).

The guard order of src/routes/admin.py applies: authentication, then the permission, before any
parameter or body is looked at.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request
from pydantic import Field

from src.deps import Conn, State
from src.routes.path_ids import UserID
from src.schemas.common import Page, Paging, Strict
from src.security.deps import Principal, authenticate, request_meta, require_permission
from src.services import admin_ops
from src.services import monitor as monitor_service

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(authenticate)])

MonitorReader = Annotated[Principal, Depends(require_permission("metrics.read"))]
UsersReader = Annotated[Principal, Depends(require_permission("users.read"))]
UsersWriter = Annotated[Principal, Depends(require_permission("users.write"))]
BillingReader = Annotated[Principal, Depends(require_permission("billing.read"))]

Responses = dict[int | str, dict[str, Any]]
DENIED: Responses = {
    401: {"description": "Missing or invalid credentials."},
    403: {"description": "The caller's role lacks the permission, or the key's scopes exclude /admin."},
}
INVALID: Responses = {400: {"description": "An unknown field or an invalid value; `param` names it."}}
NOT_FOUND: Responses = {404: {"description": "No such user."}}


class Standing(Strict):
    is_active: bool | None = Field(None, description="Deactivate (false) or reactivate (true) the account.")
    banned: bool | None = Field(None, description="Ban (true) or lift a ban (false).")
    reason: str | None = Field(None, max_length=500, description="Kept in the audit log.")


@router.get("/monitor", responses=DENIED)
async def get_monitor(actor: MonitorReader, state: State) -> dict[str, Any]:
    """Uptime, version, database pool, Redis, providers, request figures over 5 min / 1 h / 24 h
    (inference requests), credits spent today, open holds, today's top users and models."""
    return await monitor_service.monitor(state)


@router.get("/users", responses={**DENIED, **INVALID})
async def list_users(
    actor: UsersReader,
    conn: Conn,
    paging: Paging,
    email: Annotated[str | None, Query(max_length=320, description="Verified e-mail prefix.")] = None,
    role: Annotated[str | None, Query(max_length=64)] = None,
    active: Annotated[
        bool | None, Query(description="Only active (true) or inactive/banned (false).")
    ] = None,
) -> Page[dict[str, Any]]:
    """Users, newest first, searched by e-mail prefix, role and standing."""
    users, total = await admin_ops.search_users(
        conn, email=email, role=role, active=active, limit=paging.limit, offset=paging.offset
    )
    return Page(data=users, total=total, limit=paging.limit, offset=paging.offset)


@router.get("/users/{user_id}", responses={**DENIED, **NOT_FOUND})
async def get_user(actor: UsersReader, user_id: UserID, conn: Conn, state: State) -> dict[str, Any]:
    """Profile, balance, keys (masked), plan and the last 20 requests of one user."""
    return await admin_ops.user_detail(conn, state, user_id=user_id)


@router.put("/users/{user_id}", responses={**DENIED, **NOT_FOUND, **INVALID})
async def update_user(
    actor: UsersWriter,
    user_id: UserID,
    body: Standing,
    conn: Conn,
    state: State,
    request: Request,
) -> dict[str, Any]:
    """Activate, deactivate, ban or unban a user (audited; their keys stop working at once)."""
    return await admin_ops.set_standing(
        conn,
        state,
        user_id=user_id,
        is_active=body.is_active,
        banned=body.banned,
        reason=body.reason,
        actor=actor,
        meta=request_meta(request, state),
    )


@router.get("/credit-transactions", responses={**DENIED, **INVALID})
async def list_credit_transactions(
    actor: BillingReader,
    conn: Conn,
    paging: Paging,
    user_id: Annotated[UUID | None, Query()] = None,
    transaction_type: Annotated[str | None, Query(alias="type", max_length=64)] = None,
    since: Annotated[datetime | None, Query(description="From this time (inclusive).")] = None,
    until: Annotated[datetime | None, Query(description="Before this time.")] = None,
) -> dict[str, Any]:
    """Every user's ledger rows, newest first, with `has_more` instead of a total (no full count)."""
    rows, has_more = await admin_ops.credit_transactions(
        conn,
        user_id=user_id,
        type=transaction_type,
        since=since,
        until=until,
        limit=paging.limit,
        offset=paging.offset,
    )
    return {
        "object": "list",
        "data": rows,
        "has_more": has_more,
        "limit": paging.limit,
        "offset": paging.offset,
    }


@router.get("/usage", responses={**DENIED, **INVALID})
async def usage(
    actor: BillingReader,
    conn: Conn,
    group_by: Annotated[Literal["user", "key", "model", "provider", "day"], Query()] = "day",
    since: Annotated[
        date | None, Query(description="First day (UTC); default: 6 days before `until`.")
    ] = None,
    until: Annotated[date | None, Query(description="Last day (UTC), included; default: today.")] = None,
    user_id: Annotated[UUID | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """Requests, tokens, spend, shortfall and errors grouped by user, key, model, provider or day."""
    return await admin_ops.usage(
        conn, group_by=group_by, since=since, until=until, user_id=user_id, limit=limit
    )
