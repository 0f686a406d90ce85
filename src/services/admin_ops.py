"""The operator's views and actions on accounts: search, a user's full picture, standing changes,
the ledger and usage across every user."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg

from src.db import admin_ops as admin_db
from src.db import users as users_db
from src.db.users import User
from src.errors import InvalidRequest, NotFound
from src.security.deps import Principal, RequestMeta
from src.services import api_keys as keys_service
from src.services import audit, plans
from src.services import users as users_service
from src.state import AppState

RECENT_USAGE = 20
MAX_USAGE_WINDOW = timedelta(days=366)


def _not_found() -> NotFound:
    return NotFound("No such user.", param="user_id", code="user_not_found")


def user_row(user: User) -> dict[str, Any]:
    return {
        **users_service.public_profile(user),
        "role": user.role,
        "is_active": user.is_active,
        "banned_at": user.banned_at,
        "balance": users_service.balance_of(user),
    }


async def search_users(
    conn: asyncpg.Connection,
    *,
    email: str | None,
    role: str | None,
    active: bool | None,
    limit: int,
    offset: int,
) -> tuple[list[dict[str, Any]], int]:
    rows, total = await admin_db.search_users(
        conn, email=email, role=role, active=active, limit=limit, offset=offset
    )
    users = [User(**{k: v for k, v in dict(row).items() if k != "total"}) for row in rows]
    return [user_row(user) for user in users], total


async def user_detail(conn: asyncpg.Connection, state: AppState, *, user_id: UUID) -> dict[str, Any]:
    """Profile, balance, keys (masked), plan and recent usage of one user."""
    user = await users_db.get_user(conn, user_id=user_id)
    if user is None or user.deleted_at is not None:
        raise _not_found()
    keys, _ = await keys_service.list_keys(conn, owner_id=user_id)
    plan = await plans.current_plan(conn, state.settings, user_id=user_id)
    usage = await admin_db.recent_usage(conn, user_id=user_id, limit=RECENT_USAGE)
    return {
        **user_row(user),
        "api_keys": [keys_service.public_view(key) for key in keys],
        "plan": {
            "id": plan.plan.id,
            "name": plan.plan.name,
            "status": plan.status,
            "current_period_end": plan.current_period_end,
        },
        "recent_usage": [dict(row) for row in usage],
    }


async def set_standing(
    conn: asyncpg.Connection,
    state: AppState,
    *,
    user_id: UUID,
    is_active: bool | None,
    banned: bool | None,
    reason: str | None,
    actor: Principal,
    meta: RequestMeta,
) -> dict[str, Any]:
    """Activate, deactivate, ban or unban; audited, and every cached key of the user dropped at once."""
    if is_active is None and banned is None:
        raise InvalidRequest("Nothing to change: send is_active and/or banned.", code="empty_update")
    async with conn.transaction():
        before = await users_db.get_user(conn, user_id=user_id, for_update=True)
        if before is None or before.deleted_at is not None:
            raise _not_found()
        await admin_db.set_standing(conn, user_id=user_id, is_active=is_active, banned=banned)
        after = await users_db.get_user(conn, user_id=user_id)
        assert after is not None
        await audit.record(
            conn,
            action="user.standing",
            actor=actor,
            meta=meta,
            user_id=user_id,
            subject_type="user",
            subject_id=user_id,
            before={"is_active": before.is_active, "banned": before.banned_at is not None},
            after={"is_active": after.is_active, "banned": after.banned_at is not None},
            metadata={"reason": reason} if reason else None,
        )
    await state.auth_cache.invalidate(state.redis, user_id=user_id)
    return user_row(after)


async def credit_transactions(
    conn: asyncpg.Connection,
    *,
    user_id: UUID | None,
    type: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    offset: int,
) -> tuple[list[dict[str, Any]], bool]:
    rows = await admin_db.credit_transactions(
        conn, user_id=user_id, type=type, since=since, until=until, limit=limit, offset=offset
    )
    return [dict(row) for row in rows[:limit]], len(rows) > limit


async def usage(
    conn: asyncpg.Connection,
    *,
    group_by: str,
    since: date | None,
    until: date | None,
    user_id: UUID | None,
    limit: int,
) -> dict[str, Any]:
    """Usage grouped by user, key, model, provider or day over whole days (UTC), both ends included."""
    end = until or datetime.now(UTC).date()
    start = since or end - timedelta(days=6)
    if start > end or end - start > MAX_USAGE_WINDOW:
        raise InvalidRequest(
            "The window must start before it ends and span at most 366 days.",
            param="since",
            code="invalid_window",
        )
    rows = await admin_db.usage_summary(
        conn, group_by=group_by, since=start, until=end, user_id=user_id, limit=limit
    )
    return {"group_by": group_by, "since": start, "until": end, "data": [dict(row) for row in rows]}
