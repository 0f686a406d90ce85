"""Plans, the plan each user is on, and what a plan sets: the rate-limit ceiling of a user's keys.

A user's current plan is their `user_plans` row in status `active` or `past_due` (a past_due plan
keeps its limits while Stripe retries the payment); `cancelled` and `expired` rows are history.
An admin-assigned row lapses at its `current_period_end`; a Stripe subscription's row is moved or
ended by Stripe's events (`apply_subscription`, `set_status`). A user without a current row is on
the default (free) plan, whose limits are the settings defaults. Every change of a user's plan
drops their cached authentication records, so the new limits apply from their next request (on
every instance with Redis); see src/services/limits.py for how the ceiling is decided.

Plan (src.db.plans.Plan), one row of `plans`:
    id: int
    name: str                    unique
    description: str
    price_cents: int             the price per billing interval, in the smallest unit of `currency`
    currency: str                lower-case ISO 4217 code ("usd")
    billing_interval: str        "month" or "year"
    credits_included: Decimal    credits granted each period (they expire at the period's end)
    rpm_limit, rpd_limit, tpm_limit, tpd_limit, concurrency_limit: int | None
                                 the plan's ceilings; None: the settings default (DEFAULT_RPM, ...)
    features: dict[str, Any]     shown to users as given
    stripe_price_id: str | None  the Stripe price that subscribes to the plan (unique)
    is_default: bool             the free plan (exactly one)
    is_active: bool              offered to new subscribers (users already on it keep it)
    created_at, updated_at: datetime
    .limits -> dict[str, int | None]   the five limits above by name

UserPlan (src.db.plans.UserPlan), one row of `user_plans`:
    id: int, user_id: UUID, plan_id: int, status: "active" | "cancelled" | "past_due" | "expired",
    current_period_start: datetime, current_period_end: datetime | None, auto_renew: bool,
    stripe_subscription_id: str | None, stripe_customer_id: str | None, created_at, updated_at

UserPlanView, what `current_plan` returns:
    user_id: UUID
    plan: Plan                         the plan in force (the default plan without a current row)
    subscription: UserPlan | None      the current row; None on the default plan without one
    limits: Limits                     the plan's limits in force (None fields: settings defaults)
    status: str                        the row's status; "active" on the default plan
    current_period_start: datetime | None
    current_period_end: datetime | None
    auto_renew: bool
    source: str                        "default", "assigned" (by an admin) or "stripe"
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal
from uuid import UUID

import asyncpg

from src.config import Settings
from src.db import plans as plans_db
from src.db import users as users_db
from src.db.plans import Plan, UserPlan
from src.errors import Conflict, InvalidRequest, NotFound
from src.services import audit
from src.services import limits as limits_service
from src.services.limits import Limits

if TYPE_CHECKING:
    from src.security.deps import Principal, RequestMeta
    from src.state import AppState

__all__ = [
    "Plan",
    "PlanUsage",
    "UserPlan",
    "UserPlanView",
    "apply_subscription",
    "assign_plan",
    "create_plan",
    "current_plan",
    "deactivate_plan",
    "get_plan",
    "get_public_plan",
    "list_plans",
    "plan_and_usage",
    "plan_for_stripe_price",
    "set_status",
    "update_plan",
]

logger = logging.getLogger("gatewayz.plans")

PlanStatus = Literal["active", "cancelled", "past_due", "expired"]
STATUSES: tuple[str, ...] = ("active", "cancelled", "past_due", "expired")
CURRENT_STATUSES: tuple[str, ...] = plans_db.CURRENT_STATUSES
# Serialises changes of which plan is the default.
_DEFAULT_LOCK = "plans:default"


@dataclass(frozen=True)
class UserPlanView:
    user_id: UUID
    plan: Plan
    subscription: UserPlan | None
    limits: Limits
    status: str
    current_period_start: datetime | None
    current_period_end: datetime | None
    auto_renew: bool
    source: str


@dataclass(frozen=True)
class PlanUsage:
    """The caller's plan, the account ceiling in force, and what the limiter counts now."""

    view: UserPlanView
    ceiling: Limits
    usage: dict[str, int]


def _plan_not_found() -> NotFound:
    return NotFound("No such plan.", param="plan_id", code="plan_not_found")


def _user_lock(user_id: UUID) -> str:
    return f"user_plans:{user_id}"


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise InvalidRequest(
            f"Unknown plan status '{status}'; use one of {', '.join(STATUSES)}.",
            param="status",
            code="invalid_plan_status",
        )


async def _drop_cached(state: AppState | None, user_ids: Iterable[UUID]) -> None:
    """Cached keys carry their owner's plan limits: drop them so the next request reads the new ones."""
    if state is None:
        return
    for user_id in dict.fromkeys(user_ids):
        await state.auth_cache.invalidate(state.redis, user_id=user_id)


# -- reading ---------------------------------------------------------------------------------


async def get_plan(conn: asyncpg.Connection, *, plan_id: int) -> Plan:
    """Any plan, active or not; NotFound when there is none."""
    plan = await plans_db.get_plan(conn, plan_id=plan_id)
    if plan is None:
        raise _plan_not_found()
    return plan


async def get_public_plan(conn: asyncpg.Connection, *, plan_id: int) -> Plan:
    """A plan on offer; a retired one is as unknown as a missing one."""
    plan = await plans_db.get_plan(conn, plan_id=plan_id)
    if plan is None or not plan.is_active:
        raise _plan_not_found()
    return plan


async def list_plans(conn: asyncpg.Connection, *, active_only: bool) -> list[Plan]:
    return await plans_db.list_plans(conn, active_only=active_only)


async def plan_for_stripe_price(conn: asyncpg.Connection, *, price_id: str) -> Plan | None:
    """The plan a Stripe price subscribes to, active or not (an existing subscription keeps it)."""
    return await plans_db.plan_for_stripe_price(conn, price_id=price_id)


def _view(settings: Settings, user_id: UUID, plan: Plan, row: UserPlan | None) -> UserPlanView:
    return UserPlanView(
        user_id=user_id,
        plan=plan,
        subscription=row,
        limits=limits_service.plan_limits(settings, plan.limits),
        status=row.status if row is not None else "active",
        current_period_start=row.current_period_start if row is not None else None,
        current_period_end=row.current_period_end if row is not None else None,
        auto_renew=row.auto_renew if row is not None else False,
        source="default" if row is None else ("stripe" if row.stripe_subscription_id else "assigned"),
    )


async def current_plan(conn: asyncpg.Connection, settings: Settings, *, user_id: UUID) -> UserPlanView:
    """The user's plan in force: their current user_plans row's plan, or the free default."""
    plan, row = await plans_db.current_plan(conn, user_id=user_id)
    if plan is None:  # the migration seeds a default and it can be moved but never removed
        raise _plan_not_found()
    return _view(settings, user_id, plan, row)


async def plan_and_usage(
    conn: asyncpg.Connection, state: AppState, *, user_id: UUID, key_id: UUID
) -> PlanUsage:
    """GET /user/plan: the plan, the account's ceiling and what the rate limiter counts for it."""
    view = await current_plan(conn, state.settings, user_id=user_id)
    found = await limits_service.caller_limits(conn, state, user_id=user_id, key_id=key_id)
    return PlanUsage(view=view, ceiling=found.account.limits, usage=found.account.usage)


# -- Stripe subscriptions --------------------------------------------------------------------


async def apply_subscription(
    conn: asyncpg.Connection,
    state_or_none: AppState | None,
    *,
    user_id: UUID,
    plan_id: int,
    status: str,
    period_start: datetime | None,
    period_end: datetime | None,
    stripe_subscription_id: str,
    stripe_customer_id: str | None,
    auto_renew: bool,
) -> None:
    """Create or update the user_plans row of a Stripe subscription (keyed by its id).

    A current status (active, past_due) ends any other current plan of the user (an admin
    assignment, an older subscription). None for a period bound or the customer keeps what the row
    has. Runs in the caller's transaction when there is one (as a savepoint); the user's cached
    keys are dropped at the end, so with `state_or_none` the new limits apply at once (run outside
    a transaction, or expect a lookup racing the commit to keep the old limits for at most
    AUTH_CACHE_TTL_SECONDS); without it, within AUTH_CACHE_TTL_SECONDS.
    """
    _check_status(status)
    async with conn.transaction():
        await get_plan(conn, plan_id=plan_id)
        await users_db.lock_identity(conn, name=_user_lock(user_id))
        existing = await plans_db.get_subscription(
            conn, stripe_subscription_id=stripe_subscription_id, for_update=True
        )
        # A subscription belongs to the user it was created for: never move it to another one.
        owner = existing.user_id if existing is not None else user_id
        if owner != user_id:
            logger.warning("subscription event for another user than the subscription's; kept its owner")
            await users_db.lock_identity(conn, name=_user_lock(owner))
        ended: list[UserPlan] = []
        if status in CURRENT_STATUSES:
            ended = await plans_db.end_current(
                conn, user_id=owner, status="cancelled", keep_subscription=stripe_subscription_id
            )
        row = await plans_db.upsert_subscription(
            conn,
            user_id=owner,
            plan_id=plan_id,
            status=status,
            period_start=period_start,
            period_end=period_end,
            stripe_subscription_id=stripe_subscription_id,
            stripe_customer_id=stripe_customer_id,
            auto_renew=auto_renew,
        )
        before, after = _row_audit(existing), _row_audit(row)
        if before != after or ended:  # a replayed event changes nothing and is not recorded again
            await audit.record(
                conn,
                action="plan.subscription",
                actor=None,
                meta=None,
                actor_type="system",
                user_id=owner,
                subject_type="user_plan",
                subject_id=str(row.id),
                before=before,
                after={**(after or {}), "ended": [r.id for r in ended]},
            )
    await _drop_cached(state_or_none, [owner])


async def set_status(
    conn: asyncpg.Connection, state_or_none: AppState | None, *, stripe_subscription_id: str, status: str
) -> UUID | None:
    """Set the status of a Stripe subscription's row; its user's id, or None when there is no row."""
    _check_status(status)
    async with conn.transaction():
        existing = await plans_db.get_subscription(conn, stripe_subscription_id=stripe_subscription_id)
        if existing is None:
            return None
        await users_db.lock_identity(conn, name=_user_lock(existing.user_id))
        if status in CURRENT_STATUSES:
            await plans_db.end_current(
                conn, user_id=existing.user_id, status="cancelled", keep_subscription=stripe_subscription_id
            )
        row = await plans_db.set_subscription_status(
            conn, stripe_subscription_id=stripe_subscription_id, status=status
        )
        assert row is not None
        if row.status != existing.status:
            await audit.record(
                conn,
                action="plan.subscription_status",
                actor=None,
                meta=None,
                actor_type="system",
                user_id=row.user_id,
                subject_type="user_plan",
                subject_id=str(row.id),
                before={"status": existing.status},
                after={"status": row.status},
            )
    await _drop_cached(state_or_none, [row.user_id])
    return row.user_id


def _row_audit(row: UserPlan | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "user_plan_id": row.id,
        "plan_id": row.plan_id,
        "status": row.status,
        "current_period_start": row.current_period_start.isoformat(),
        "current_period_end": row.current_period_end.isoformat() if row.current_period_end else None,
        "stripe_subscription_id": row.stripe_subscription_id,
    }


# -- administration --------------------------------------------------------------------------


def _plan_audit(plan: Plan) -> dict[str, Any]:
    values = asdict(plan)
    values["credits_included"] = format(plan.credits_included, "f")
    for name in ("created_at", "updated_at"):
        values.pop(name)
    return values


def _unique_conflict(exc: asyncpg.UniqueViolationError) -> Conflict:
    if exc.constraint_name == "plans_stripe_price_id_key":
        return Conflict(
            "Another plan has this Stripe price.", param="stripe_price_id", code="stripe_price_taken"
        )
    return Conflict("A plan with this name exists.", param="name", code="plan_name_taken")


def _limits_changed(before: Plan | None, after: Plan) -> bool:
    return before is None or before.limits != after.limits or before.is_default != after.is_default


async def _apply_limits_change(conn: asyncpg.Connection, state: AppState, plan: Plan, was: Plan) -> None:
    """Drop the cached keys whose limits came from this plan (after the change committed)."""
    if plan.is_default or was.is_default:
        # Everyone without a plan of their own follows the default: too many users to name, so
        # this instance starts from an empty cache; others follow within AUTH_CACHE_TTL_SECONDS.
        state.auth_cache.clear()
    await _drop_cached(state, await plans_db.users_on_plan(conn, plan_id=plan.id))


async def create_plan(
    conn: asyncpg.Connection,
    state: AppState,
    *,
    values: dict[str, Any],
    actor: Principal,
    meta: RequestMeta,
) -> Plan:
    """A new plan, audited; made the default (in place of the old one) when `is_default` is set."""
    values = {"currency": state.settings.stripe_currency.lower(), **values}
    if values.get("is_default") and values.get("is_active") is False:
        raise _default_must_stay_active()
    old_default: Plan | None = None
    try:
        async with conn.transaction():
            if values.get("is_default"):
                await users_db.lock_identity(conn, name=_DEFAULT_LOCK)
                old_default = await plans_db.get_default_plan(conn, for_update=True)
                await plans_db.clear_default(conn)
            plan = await plans_db.insert_plan(conn, values=values)
            await audit.record(
                conn,
                action="plan.create",
                actor=actor,
                meta=meta,
                subject_type="plan",
                subject_id=str(plan.id),
                after=_plan_audit(plan),
            )
    except asyncpg.UniqueViolationError as exc:
        raise _unique_conflict(exc) from exc
    if old_default is not None:
        await _apply_limits_change(conn, state, plan, old_default)
    return plan


def _default_must_stay_active() -> Conflict:
    return Conflict("The default plan cannot be retired.", param="is_active", code="default_plan")


async def update_plan(
    conn: asyncpg.Connection,
    state: AppState,
    *,
    plan_id: int,
    changes: dict[str, Any],
    actor: Principal,
    meta: RequestMeta,
) -> Plan:
    """Change a plan, audited. Users on it get its new limits from their next request."""
    try:
        async with conn.transaction():
            if changes.get("is_default"):
                await users_db.lock_identity(conn, name=_DEFAULT_LOCK)
            before = await plans_db.get_plan(conn, plan_id=plan_id, for_update=True)
            if before is None:
                raise _plan_not_found()
            will_be_default = changes.get("is_default", before.is_default)
            if before.is_default and not will_be_default:
                raise Conflict(
                    "A plan stops being the default only when another plan is made the default.",
                    param="is_default",
                    code="default_plan",
                )
            if will_be_default and not changes.get("is_active", before.is_active):
                raise _default_must_stay_active()
            if will_be_default and not before.is_default:
                await plans_db.clear_default(conn)
            plan = await plans_db.update_plan(conn, plan_id=plan_id, changes=changes)
            assert plan is not None
            if plan != before:
                await audit.record(
                    conn,
                    action="plan.update",
                    actor=actor,
                    meta=meta,
                    subject_type="plan",
                    subject_id=str(plan.id),
                    before=_plan_audit(before),
                    after=_plan_audit(plan),
                )
    except asyncpg.UniqueViolationError as exc:
        raise _unique_conflict(exc) from exc
    if _limits_changed(before, plan):
        await _apply_limits_change(conn, state, plan, before)
    return plan


async def deactivate_plan(
    conn: asyncpg.Connection, state: AppState, *, plan_id: int, actor: Principal, meta: RequestMeta
) -> Plan:
    """Retire a plan: no longer offered; users already on it keep it. The default plan stays."""
    async with conn.transaction():
        before = await plans_db.get_plan(conn, plan_id=plan_id, for_update=True)
        if before is None:
            raise _plan_not_found()
        if before.is_default:
            raise _default_must_stay_active()
        if not before.is_active:
            return before
        plan = await plans_db.update_plan(conn, plan_id=plan_id, changes={"is_active": False})
        assert plan is not None
        await audit.record(
            conn,
            action="plan.deactivate",
            actor=actor,
            meta=meta,
            subject_type="plan",
            subject_id=str(plan.id),
            before={"is_active": True},
            after={"is_active": False},
        )
    return plan


def _assignment_audit(view: UserPlanView) -> dict[str, Any]:
    return {
        "plan_id": view.plan.id,
        "plan_name": view.plan.name,
        "status": view.status,
        "source": view.source,
        "current_period_end": view.current_period_end.isoformat() if view.current_period_end else None,
    }


async def assign_plan(
    conn: asyncpg.Connection,
    state: AppState,
    *,
    user_id: UUID,
    plan_id: int,
    period_end: datetime | None,
    actor: Principal,
    meta: RequestMeta,
) -> UserPlanView:
    """Put a user on a plan (until `period_end`, or with no end), audited; applies at once.

    Assigning the default plan ends the user's plan. A plan a Stripe subscription pays for is
    changed through the subscription, not here (its next event would undo the change).
    """
    if period_end is not None:
        if period_end.tzinfo is None:
            period_end = period_end.replace(tzinfo=UTC)
        if period_end <= datetime.now(UTC):
            raise InvalidRequest(
                "The period must end in the future.", param="current_period_end", code="invalid_period_end"
            )
    async with conn.transaction():
        user = await users_db.get_user(conn, user_id=user_id)
        if user is None or user.deleted_at is not None:
            raise NotFound("No such user.", param="user_id", code="user_not_found")
        plan = await plans_db.get_plan(conn, plan_id=plan_id)
        if plan is None:
            raise _plan_not_found()
        if not plan.is_active:
            raise InvalidRequest("This plan is retired.", param="plan_id", code="plan_inactive")
        await users_db.lock_identity(conn, name=_user_lock(user_id))
        before = await current_plan(conn, state.settings, user_id=user_id)
        if any(row.stripe_subscription_id for row in await plans_db.current_rows(conn, user_id=user_id)):
            raise Conflict(
                "This user's plan is paid by a Stripe subscription: change or cancel the subscription.",
                param="user_id",
                code="plan_managed_by_subscription",
            )
        await plans_db.end_current(conn, user_id=user_id, status="cancelled")
        if not plan.is_default:
            await plans_db.insert_user_plan(
                conn,
                user_id=user_id,
                plan_id=plan.id,
                status="active",
                period_end=period_end,
                auto_renew=False,
            )
        after = await current_plan(conn, state.settings, user_id=user_id)
        await audit.record(
            conn,
            action="plan.assign",
            actor=actor,
            meta=meta,
            user_id=user_id,
            subject_type="user",
            subject_id=user_id,
            before=_assignment_audit(before),
            after=_assignment_audit(after),
        )
    await _drop_cached(state, [user_id])
    return after
