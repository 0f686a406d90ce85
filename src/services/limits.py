"""Which limits apply to a user and a key: the one place the limiter and the key routes read.

The effective limit of a request is the minimum of the key's own limit and its owner's ceiling.
The ceiling is, limit by limit, the admin-set ceiling of that user where there is one (it may be
above the plan), else the limit of the user's current plan, else (the plan leaves it NULL, as the
free plan does) the settings default (DEFAULT_RPM, ...). A user's current plan is their active or
past_due plan; without one (never subscribed, cancelled, expired) it is the default free plan.
A user may set a key's limits only at or below the ceiling; an admin may set either (audited), and
the change applies to the user's keys at once (their cached records are dropped). The limiter
reads the ceiling through `ceiling()` from the cached authentication record, which carries both
the admin-set limits and the plan's, so it costs no database round trip.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

import asyncpg

from src.config import Settings
from src.db import limits as limits_db
from src.db import plans as plans_db
from src.errors import NotFound

if TYPE_CHECKING:
    from src.security.deps import Principal, RequestMeta
    from src.state import AppState

LIMIT_NAMES = limits_db.LIMIT_COLUMNS


@dataclass(frozen=True)
class Limits:
    rpm_limit: int
    rpd_limit: int
    tpm_limit: int
    tpd_limit: int
    concurrency_limit: int


def default_limits(settings: Settings) -> Limits:
    return Limits(
        rpm_limit=settings.default_rpm,
        rpd_limit=settings.default_rpd,
        tpm_limit=settings.default_tpm,
        tpd_limit=settings.default_tpd,
        concurrency_limit=settings.default_concurrency,
    )


def plan_limits(settings: Settings, plan: dict[str, int | None] | None) -> Limits:
    """A plan's limits in force: its own, the settings default where it sets none."""
    defaults = default_limits(settings)
    if not plan:
        return defaults
    return Limits(**{name: plan.get(name) or getattr(defaults, name) for name in LIMIT_NAMES})


def ceiling(
    settings: Settings,
    admin_set: dict[str, int | None] | None,
    plan: dict[str, int | None] | None = None,
) -> Limits:
    """A user's ceiling: their admin-set limits, else their plan's, else the settings defaults."""
    under = plan_limits(settings, plan)
    if not admin_set:
        return under
    return Limits(**{name: admin_set.get(name) or getattr(under, name) for name in LIMIT_NAMES})


async def user_ceiling(conn: asyncpg.Connection, settings: Settings, *, user_id: UUID) -> Limits:
    """The most any key of this user may be allowed."""
    found = await limits_db.ceiling_inputs(conn, user_id=user_id)
    return ceiling(settings, *found) if found is not None else default_limits(settings)


def effective_key_limits(own: dict[str, int | None], ceiling: Limits) -> Limits:
    """A key's limits: its own where set, never above its owner's ceiling."""

    def pick(name: str) -> int:
        cap: int = getattr(ceiling, name)
        value = own.get(name)
        return cap if value is None else min(value, cap)

    return Limits(**{name: pick(name) for name in LIMIT_NAMES})


@dataclass(frozen=True)
class SubjectLimits:
    """One rate-limit subject (a key or an account): its limits and what it uses of them now."""

    limits: Limits
    usage: dict[str, int]


@dataclass(frozen=True)
class CallerLimits:
    key_id: UUID
    key_own: dict[str, int | None]
    key: SubjectLimits
    account: SubjectLimits


@dataclass(frozen=True)
class UserCeiling:
    user_id: UUID
    admin_set: dict[str, int | None]
    plan: Limits
    ceiling: Limits


@dataclass(frozen=True)
class KeyLimits:
    key_id: UUID
    user_id: UUID
    own: dict[str, int | None]
    effective: Limits
    ceiling: Limits


def _user_not_found() -> NotFound:
    return NotFound("No such user.", param="user_id", code="user_not_found")


def _key_not_found() -> NotFound:
    return NotFound("No such API key.", param="key_id", code="api_key_not_found")


async def caller_limits(
    conn: asyncpg.Connection, state: AppState, *, user_id: UUID, key_id: UUID
) -> CallerLimits:
    """The calling key's effective limits, its owner's ceiling, and the limiter's counts for both."""
    # Imported here: the limiter's module imports this one for `Limits`.
    from src.services.rate_limit import Subject

    found = await limits_db.key_limits(conn, key_id=key_id)
    inputs = await limits_db.ceiling_inputs(conn, user_id=user_id)
    if found is None or inputs is None:  # revoked or deleted since it authenticated
        raise _key_not_found()
    own = found[1]
    account = ceiling(state.settings, *inputs)
    key = effective_key_limits(own, account)
    key_usage, account_usage = await asyncio.gather(
        state.limiter.usage(Subject(kind="k", id=str(key_id), limits=key)),
        state.limiter.usage(Subject(kind="u", id=str(user_id), limits=account)),
    )
    return CallerLimits(
        key_id=key_id,
        key_own=own,
        key=SubjectLimits(limits=key, usage=key_usage),
        account=SubjectLimits(limits=account, usage=account_usage),
    )


async def get_user_ceiling(conn: asyncpg.Connection, settings: Settings, *, user_id: UUID) -> UserCeiling:
    found = await limits_db.ceiling_inputs(conn, user_id=user_id)
    if found is None:
        raise _user_not_found()
    admin_set, plan = found
    return UserCeiling(
        user_id=user_id,
        admin_set=admin_set,
        plan=plan_limits(settings, plan),
        ceiling=ceiling(settings, admin_set, plan),
    )


async def set_user_ceiling(
    conn: asyncpg.Connection,
    state: AppState,
    *,
    user_id: UUID,
    changes: dict[str, int | None],
    actor: Principal,
    meta: RequestMeta,
) -> UserCeiling:
    """Set (or, with None, clear) admin ceilings of a user, audited; applies to their keys at once."""
    from src.services import audit  # audit -> security.deps -> the limiter -> this module

    async with conn.transaction():
        before = await limits_db.user_limits(conn, user_id=user_id, for_update=True)
        if before is None:
            raise _user_not_found()
        after = {**before, **changes}
        plan = await plans_db.plan_limits(conn, user_id=user_id)
        if after != before:
            await limits_db.set_user_limits(conn, user_id=user_id, limits=changes)
            await audit.record(
                conn,
                action="limits.user_update",
                actor=actor,
                meta=meta,
                user_id=user_id,
                subject_type="user",
                subject_id=user_id,
                before=before,
                after=after,
            )
    # Cached keys carry their owner's ceiling: drop them so the next request reads the new one.
    await state.auth_cache.invalidate(state.redis, user_id=user_id)
    return UserCeiling(
        user_id=user_id,
        admin_set=after,
        plan=plan_limits(state.settings, plan),
        ceiling=ceiling(state.settings, after, plan),
    )


async def _key_view(
    conn: asyncpg.Connection, settings: Settings, key_id: UUID, user_id: UUID, own: dict[str, int | None]
) -> KeyLimits:
    cap = await user_ceiling(conn, settings, user_id=user_id)
    return KeyLimits(
        key_id=key_id, user_id=user_id, own=own, effective=effective_key_limits(own, cap), ceiling=cap
    )


async def get_key_limits(conn: asyncpg.Connection, settings: Settings, *, key_id: UUID) -> KeyLimits:
    found = await limits_db.key_limits(conn, key_id=key_id)
    if found is None:
        raise _key_not_found()
    return await _key_view(conn, settings, key_id, *found)


async def set_key_limits(
    conn: asyncpg.Connection,
    state: AppState,
    *,
    key_id: UUID,
    changes: dict[str, int | None],
    actor: Principal,
    meta: RequestMeta,
) -> KeyLimits:
    """Set (or clear) a key's own limits as an admin, audited; the owner's ceiling still caps them."""
    from src.services import audit  # see set_user_ceiling

    async with conn.transaction():
        found = await limits_db.key_limits(conn, key_id=key_id, for_update=True)
        if found is None:
            raise _key_not_found()
        user_id, before = found
        after: dict[str, Any] = {**before, **changes}
        if after != before:
            await limits_db.set_key_limits(conn, key_id=key_id, limits=changes)
            await audit.record(
                conn,
                action="limits.key_update",
                actor=actor,
                meta=meta,
                user_id=user_id,
                subject_type="api_key",
                subject_id=key_id,
                before=before,
                after=after,
            )
        view = await _key_view(conn, state.settings, key_id, user_id, after)
    await state.auth_cache.invalidate(state.redis, user_id=user_id)
    return view
